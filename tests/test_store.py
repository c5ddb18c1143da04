"""The ledger store on SQLite and the real PostgreSQL: migrations, dedup, the evidence chain."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import Engine, MetaData, Table, delete, inspect, select, text, update
from sqlalchemy.dialects.sqlite import DATETIME
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite as sqlite_dialect

from tests import payloads as p
from waconsent.connectors.whatsapp import parse_payload
from waconsent.domain import NO_ACTIVITY, Activity, Event, EventKind, Signal
from waconsent.errors import RunLockHeld
from waconsent.store import activity as activity_store
from waconsent.store import events as event_store
from waconsent.store import evidence as evidence_store
from waconsent.store import identity
from waconsent.store import runs as run_store
from waconsent.store.engine import among, open_engine, reading
from waconsent.store.tables import UtcDateTime, evidence, phone_index
from waconsent.store.tables import events as events_table
from waconsent.sync.matching import event_keys

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
NOW = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)


def stop_events(count: int = 3) -> tuple:
    changes = [
        p.message(f"4915123456{i:03d}", T0 + timedelta(minutes=i), "STOP") for i in range(count)
    ]
    return parse_payload(p.payload(*changes)).events


def test_migrations_create_every_table_from_empty(engine: Engine) -> None:
    """An empty database is migrated on first use, on SQLite and PostgreSQL."""
    names = set(inspect(engine).get_table_names())
    assert {
        "events",
        "evidence",
        "evidence_head",
        "phone_index",
        "contacts",
        "runs",
        "outbox",
        "locks",
        "replies",
        "alembic_version",
    } <= names
    with engine.connect() as connection:
        assert (
            connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0009"
        )


def test_upgrade_from_first_revision_keeps_data(store_url: str) -> None:
    """A store at revision 0001 upgrades in place on first use and keeps its rows."""
    from alembic import command

    from waconsent.store.engine import _alembic_config

    bare = open_engine(store_url, run_migrations=False)
    config = _alembic_config()
    with bare.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
    with bare.begin() as connection:  # what the code of revision 0001 stored
        old_events = Table("events", MetaData(), autoload_with=connection)
        rows = [event_store._row(event, "test", NOW) for event in stop_events(2)]
        connection.execute(
            old_events.insert(),
            [{k: v for k, v in row.items() if k in old_events.c} for row in rows],
        )
        evidence_store.append(
            connection,
            [evidence_store.EvidenceEntry("event", {"event_key": row["key"]}) for row in rows],
            NOW,
        )
    bare.dispose()
    upgraded = open_engine(store_url)
    indexes = {ix["name"] for ix in inspect(upgraded).get_indexes("contacts")}
    assert "ix_contacts_modified_id" in indexes and "ix_contacts_modified_at" not in indexes
    with upgraded.connect() as connection:
        assert event_store.newest_id(connection) == 2
        assert evidence_store.verify(connection) == []
    upgraded.dispose()


def test_reopening_is_a_no_op(store_url: str) -> None:
    """Opening a migrated store again changes nothing and keeps the data."""
    first = open_engine(store_url)
    with first.begin() as connection:
        event_store.ingest(connection, stop_events(1), "test", NOW)
    first.dispose()
    second = open_engine(store_url)
    with second.connect() as connection:
        assert event_store.newest_id(connection) == 1
    second.dispose()


def test_sqlite_pragmas(sqlite_url: str) -> None:
    """SQLite runs in WAL mode with foreign keys on."""
    engine = open_engine(sqlite_url)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def test_ingest_is_idempotent(engine: Engine) -> None:
    """The same events twice are stored once, with their evidence once."""
    batch = stop_events(3)
    with engine.begin() as connection:
        first = event_store.ingest(connection, batch, "test", NOW)
    with engine.begin() as connection:
        second = event_store.ingest(connection, batch, "test", NOW)
    assert (first.stored, first.duplicates) == (3, 0)
    assert (second.stored, second.duplicates) == (0, 3)
    with engine.connect() as connection:
        assert evidence_store.chain_length(connection) == 3


def test_concurrent_identical_ingest_stores_once(engine: Engine) -> None:
    """Identical batches from several threads at once: one row each, a clean chain."""
    batch = stop_events(5)
    errors: list[Exception] = []

    def worker() -> None:
        try:
            with engine.begin() as connection:
                event_store.ingest(connection, batch, "test", NOW)
        except Exception as exc:  # noqa: BLE001 - pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with engine.connect() as connection:
        assert event_store.newest_id(connection) >= 5
        assert len(list(event_store.in_range(connection, 0, 10**9))) == 5
        assert evidence_store.verify(connection) == []
        assert evidence_store.chain_length(connection) == 5


def test_activity_found_by_canonical_key_and_user_id(engine: Engine) -> None:
    """A record's events are found by the E.164 key of their wa_id and by user id, and an
    event under both counts once."""
    batch = parse_payload(p.payload(p.message("4915123456789", T0, "hi", user_id="US.7"))).events
    with engine.begin() as connection:
        event_store.ingest(connection, batch, "test", NOW)
    with engine.connect() as connection:
        found = activity_store.activity_of(
            connection,
            {
                "both": {"+4915123456789", "uid:US.7"},
                "number": {"+4915123456789"},
                "user": {"uid:US.7"},
                "none": {"+4915100000000"},
            },
        )
    assert set(found) == {"both", "number", "user"}
    assert found["both"].event_count == 1 and found["both"].last_inbound == T0
    assert found["both"].newest_user_id == (T0, "US.7")


def _random_events(rnd: random.Random, count: int) -> list[Event]:
    """Events over three numbers and two user ids, every kind the rules look at, with
    shared seconds so the tie-breaks are exercised."""
    numbers, users = ["4915100000001", "4915100000002", "5215512345678"], [None, "US.1", "US.2"]
    made = []
    for index in range(count):
        signal = rnd.choice(
            [
                Signal.NONE,
                Signal.NONE,
                Signal.OPT_IN,
                Signal.OPT_OUT,
                Signal.RESUME,
                Signal.USER_ID_CHANGED,
            ]
        )
        made.append(
            Event(
                key=f"k{index:03d}",
                kind=rnd.choice(list(EventKind)),
                occurred_at=T0 + timedelta(seconds=rnd.randrange(5), microseconds=rnd.randrange(3)),
                wa_id=rnd.choice(numbers),
                user_id=rnd.choice(users),
                message_id=f"wamid.{index}",
                signal=signal,
                keyword="STOP" if signal is Signal.OPT_OUT else None,
                opens_session=rnd.random() < 0.5,
                window_expires_at=(
                    T0 + timedelta(hours=rnd.randrange(1, 72)) if rnd.random() < 0.3 else None
                ),
                new_user_id=(
                    rnd.choice(["US.2", "US.3"]) if signal is Signal.USER_ID_CHANGED else None
                ),
            )
        )
    return made


def linked(keys: set[str], made: list[Event]) -> set[str]:
    """The reference closure: keys joined by an event carrying a number and a user id, or
    by an announced user-id change, followed to the end."""
    edges = [tuple(event_keys(e)) for e in made if len(event_keys(e)) == 2]
    edges += [pair for e in made for pair in identity.links_of(e)]
    found = set(keys)
    while grown := {b for a, b in edges if a in found} | {a for a, b in edges if b in found}:
        if grown <= found:
            return found
        found |= grown
    return found


@pytest.mark.parametrize(("seed", "keys_per_query"), [(s, 2_000) for s in range(4)] + [(9, 1)])
def test_activity_aggregates_equal_the_rules_reduction(
    engine: Engine, seed: int, keys_per_query: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's SQL aggregates answer exactly `Activity.of` over the matching events,
    for any set of keys (number only, user id only, both, several numbers), also when the
    keys are spread over several queries and one group comes back from two of them."""
    monkeypatch.setattr(activity_store, "_KEYS_PER_QUERY", keys_per_query)
    rnd = random.Random(seed)
    made = _random_events(rnd, 40)
    with engine.begin() as connection:
        event_store.ingest(connection, made, "test", NOW)
    key_sets = {
        "a": {"+4915100000001"},
        "ab": {"+4915100000001", "+4915100000002"},
        "u1": {"uid:US.1"},
        "a-u2": {"+4915100000001", "uid:US.2"},
        "mx": {"+5215512345678", "uid:US.1", "uid:US.2"},
    }
    with engine.connect() as connection:
        found = activity_store.activity_of(connection, key_sets)
    for record_id, keys in key_sets.items():
        reach = linked(keys, made)
        expected = Activity.of(e for e in made if set(event_keys(e)) & reach)
        assert found.get(record_id, NO_ACTIVITY) == expected, record_id


def test_chain_detects_altered_row(engine: Engine) -> None:
    """Changing any evidence row's content is detected."""
    with engine.begin() as connection:
        event_store.ingest(connection, stop_events(3), "test", NOW)
        assert evidence_store.verify(connection) == []
        connection.execute(
            update(evidence).where(evidence.c.id == 2).values(body='{"signal":"opt_in"}')
        )
    with engine.connect() as connection:
        problems = evidence_store.verify(connection)
    assert [(pr.row_id, "altered" in pr.problem) for pr in problems] == [(2, True)]


def test_chain_detects_deleted_middle_row(engine: Engine) -> None:
    """Deleting a row in the middle breaks its successor's link."""
    with engine.begin() as connection:
        event_store.ingest(connection, stop_events(3), "test", NOW)
        connection.execute(delete(evidence).where(evidence.c.id == 2))
    with engine.connect() as connection:
        problems = evidence_store.verify(connection)
    assert any(pr.row_id == 3 and "deleted" in pr.problem for pr in problems)


def test_chain_detects_deleted_newest_row(engine: Engine) -> None:
    """Deleting the newest row is caught by the chain head."""
    with engine.begin() as connection:
        event_store.ingest(connection, stop_events(3), "test", NOW)
        newest = connection.execute(select(evidence.c.id).order_by(evidence.c.id.desc())).first()
        assert newest is not None
        connection.execute(delete(evidence).where(evidence.c.id == newest[0]))
    with engine.connect() as connection:
        problems = evidence_store.verify(connection)
    assert any("newest row" in pr.problem for pr in problems)
    assert any("counts 3 rows" in pr.problem for pr in problems)


def test_run_lock_is_exclusive_and_expires(engine: Engine) -> None:
    """One holder at a time per CRM; a dead holder's lease is taken over after it expires."""
    run_store.acquire_lock(engine, "crm-a", "node-1", NOW)
    with pytest.raises(RunLockHeld, match="node-1"):
        run_store.acquire_lock(engine, "crm-a", "node-2", NOW + timedelta(minutes=1))
    run_store.acquire_lock(engine, "crm-b", "node-2", NOW)  # another CRM is independent
    run_store.acquire_lock(engine, "crm-a", "node-2", NOW + timedelta(minutes=11))
    run_store.release_lock(engine, "crm-a", "node-1")  # not the holder any more: no effect
    with pytest.raises(RunLockHeld, match="node-2"):
        run_store.acquire_lock(engine, "crm-a", "node-3", NOW + timedelta(minutes=12))
    run_store.release_lock(engine, "crm-a", "node-2")
    run_store.acquire_lock(engine, "crm-a", "node-3", NOW + timedelta(minutes=12))


def test_verify_ignores_rows_appended_after_it_read_the_head(engine: Engine) -> None:
    """Rows committed while verify walks the chain are outside its snapshot, not tampering."""
    with engine.begin() as connection:
        event_store.ingest(connection, stop_events(3), "test", NOW)
    with reading(engine) as connection:
        real_execute = connection.execute
        appended = []

        def execute_then_append(statement, *args, **kwargs):  # type: ignore[no-untyped-def]
            result = real_execute(statement, *args, **kwargs)
            if not appended:  # right after the head was read, another node appends
                appended.append(True)
                with engine.begin() as other:
                    more = parse_payload(p.payload(p.message("4915199999999", T0, "STOP"))).events
                    event_store.ingest(other, more, "test", NOW)
            return result

        connection.execute = execute_then_append  # type: ignore[method-assign]
        assert evidence_store.verify(connection) == []
    with engine.connect() as connection:
        assert evidence_store.verify(connection) == []
        assert evidence_store.chain_length(connection) == 4


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 11, 1, tzinfo=UTC),  # no microseconds
        datetime(5, 1, 2, 3, 4, 5, 6, tzinfo=UTC),  # a short year
        datetime(2026, 3, 1, 1, 2, 3, 999999, tzinfo=timezone(timedelta(hours=2))),  # an offset
    ],
)
def test_sqlite_datetimes_are_stored_in_sqlalchemy_format_and_read_back(moment: datetime) -> None:
    """The ledger's one-step SQLite conversion writes exactly SQLAlchemy's text (so stored
    values keep comparing in time order against anything else SQLAlchemy wrote) and reads
    back the same instant, aware UTC."""
    dialect = sqlite_dialect()
    ours = UtcDateTime()
    stored = ours.bind_processor(dialect)(moment)
    assert stored == DATETIME().bind_processor(dialect)(moment.astimezone(UTC).replace(tzinfo=None))
    back = ours.result_processor(dialect, None)(stored)
    assert back == moment and back.tzinfo is UTC
    with pytest.raises(ValueError, match="naive"):
        ours.bind_processor(dialect)(moment.replace(tzinfo=None))


@pytest.mark.parametrize(
    ("text", "moment"),
    [
        ("2026-03-01 01:02:03", datetime(2026, 3, 1, 1, 2, 3, tzinfo=UTC)),  # no fraction
        ("2026-03-01 01:02:03+02:00", datetime(2026, 2, 28, 23, 2, 3, tzinfo=UTC)),
        ("2026-03-01T01:02:03.12345Z", datetime(2026, 3, 1, 1, 2, 3, 123450, tzinfo=UTC)),
        ("2026-03-01 01:02:03+020000", datetime(2026, 2, 28, 23, 2, 3, tzinfo=UTC)),
    ],
)
def test_sqlite_datetimes_in_other_spellings_are_read_as_utc(text: str, moment: datetime) -> None:
    """Text the ledger did not write itself (an older release, a hand-edited row), even of
    the stored format's length, is still read as the instant it names."""
    back = UtcDateTime().result_processor(sqlite_dialect(), None)(text)
    assert back == moment and back.tzinfo is UTC


def test_among_matches_whole_values_only(engine: Engine) -> None:
    """The one-parameter list lookup: exact matches only (an over-long value never matches
    its prefix, as a cast to the column's varchar(n) would make it), nothing for an empty
    list, and integer ids as well as strings."""
    long_id = "R" * 100
    with engine.begin() as connection:
        connection.execute(
            phone_index.insert(),
            [
                {"crm": "ledger", "key": "+491511", "record_id": long_id, "field": "phone"},
                {"crm": "ledger", "key": "+491512", "record_id": "R2", "field": "phone"},
            ],
        )

    def record_ids(values: list[str]) -> set[str]:
        with engine.connect() as connection:
            return set(
                connection.execute(
                    select(phone_index.c.record_id).where(
                        among(connection, phone_index.c.record_id, values)
                    )
                ).scalars()
            )

    assert record_ids([long_id, "R2"]) == {long_id, "R2"}
    assert record_ids([long_id + "-other"]) == set()
    assert record_ids([]) == set()
    with engine.begin() as connection:
        event_store.ingest(connection, stop_events(3), "test", NOW)
    with engine.connect() as connection:
        ids = (
            connection.execute(
                select(events_table.c.id).where(among(connection, events_table.c.id, [1, 3, 99]))
            )
            .scalars()
            .all()
        )
    assert sorted(ids) == [1, 3]

"""The pre-send check (issue 16): each reason against a ledger built to produce it, the STOP
that arrived after the last sync, several records per number, BR/MX spellings, user ids,
and `waconsent audience check` as a user runs it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, func, select

from tests import payloads as p
from tests.test_run import NOW, T0, clock, deliver, loaded, opted_in
from waconsent.cli import main
from waconsent.config import LoadedConfig
from waconsent.consent_check import ConsentChecker
from waconsent.store.contacts import upsert_contacts
from waconsent.store.snapshot import SnapshotRow, digest_of
from waconsent.store.tables import consent_snapshot
from waconsent.sync.audience import Answer
from waconsent.sync.ingest import ingest_payload, keyword_rules
from waconsent.sync.run import run_once

A_NUMBER, B_NUMBER, C_NUMBER = "4915111111111", "4915122222222", "4915133333333"


def check(
    engine: Engine, cfg: LoadedConfig, *values: str, purpose: str = "marketing", now: datetime = NOW
) -> list[Answer]:
    checker = ConsentChecker(engine, cfg.settings.crm_name, cfg.settings.mapping.default_region)
    return checker.check(list(values), purpose, now)


def reasons(answers: list[Answer]) -> list[tuple[bool, str]]:
    return [(a.may_send, a.reason) for a in answers]


@pytest.fixture
def ledger(engine: Engine, store_url: str) -> LoadedConfig:
    """One record per reason, synced once."""
    cfg = loaded(store_url)
    upsert_contacts(
        engine,
        [
            opted_in("A", "+49 151 11111111"),
            {"id": "B", "name": "B", "mobile_phone": "0151 22222222"},  # never asked
            opted_in("C", "0151 33333333"),  # sends STOP
            {
                "id": "D",
                "mobile_phone": "0151 44444444",
                "opt_in": True,
                "opt_in_date": T0 - timedelta(days=3),
            },  # no source, no IP
            {"id": "E", "mobile_phone": "0151 55555555"},  # wrote an hour ago
        ],
        NOW,
    )
    deliver(
        engine,
        cfg,
        p.message(C_NUMBER, T0, "STOP"),
        p.message("4915155555555", NOW - timedelta(hours=1), "hello?"),
    )
    run_once(cfg, engine=engine, clock=clock)
    return cfg


def test_each_marketing_reason(engine: Engine, ledger: LoadedConfig) -> None:
    """opted_in, no_consent, revoked, proof_missing, no_record and unparseable_number, each
    from the record built to produce it; the records are named."""
    answers = check(
        engine, ledger, A_NUMBER, B_NUMBER, C_NUMBER, "+49 151 44444444", "+49 170 9999999", "n/a"
    )
    assert reasons(answers) == [
        (True, "opted_in"),
        (False, "no_consent"),
        (False, "revoked"),
        (False, "proof_missing"),
        (False, "no_record"),
        (False, "unparseable_number"),
    ]
    assert [a.records for a in answers] == [("A",), ("B",), ("C",), ("D",), (), ()]


def test_service_reasons_and_the_window_end(engine: Engine, ledger: LoadedConfig) -> None:
    """Service: session_open until the user's message + 24 h; session_closed without one;
    no_record for a number nobody carries and that never wrote."""
    answers = check(engine, ledger, "4915155555555", A_NUMBER, "4917099999999", purpose="service")
    assert reasons(answers) == [
        (True, "session_open"),
        (False, "session_closed"),
        (False, "no_record"),
    ]
    assert answers[0].session_open_until == NOW + timedelta(hours=23)
    later = check(engine, ledger, "4915155555555", purpose="service", now=NOW + timedelta(hours=24))
    assert reasons(later) == [(False, "session_closed")]


def test_a_stop_after_the_last_sync_answers_no_at_once(
    engine: Engine, ledger: LoadedConfig
) -> None:
    """A STOP, a user_preferences stop and a 131050 received after the sync revoke before
    any sync runs."""
    upsert_contacts(engine, [opted_in("F", "0151 66666666"), opted_in("G", "0151 77777777")], NOW)
    run_once(ledger, engine=engine, clock=clock)
    numbers = [A_NUMBER, "4915166666666", "4915177777777"]
    assert reasons(check(engine, ledger, *numbers)) == [(True, "opted_in")] * 3
    deliver(
        engine,
        ledger,
        p.message(A_NUMBER, NOW - timedelta(minutes=1), "Stop"),
        p.preference("4915166666666", NOW - timedelta(minutes=1), "stop"),
        p.status("4915177777777", NOW - timedelta(minutes=1), "failed", codes=(131050,)),
    )
    assert reasons(check(engine, ledger, *numbers)) == [(False, "revoked")] * 3


def test_a_start_after_the_last_sync_is_consent_with_its_proof(
    engine: Engine, ledger: LoadedConfig
) -> None:
    """An opt-in keyword typed after the sync is consent at once (its message id is proof);
    a plain message is not."""
    deliver(
        engine,
        ledger,
        p.message(B_NUMBER, NOW - timedelta(minutes=2), "START"),
        p.message("4915144444444", NOW - timedelta(minutes=2), "yes please"),
    )
    assert reasons(check(engine, ledger, B_NUMBER, "4915144444444")) == [
        (True, "opted_in"),
        (False, "proof_missing"),
    ]


def test_a_number_on_two_records_one_revoked(engine: Engine, store_url: str) -> None:
    """Allowed only if none of its records is revoked."""
    cfg = loaded(store_url)
    upsert_contacts(
        engine,
        [
            opted_in("H1", "0151 88888888"),
            {
                "id": "H2",
                "phone": "+49 151 88888888",
                "opt_in": False,
                "opt_out_date": T0 - timedelta(days=1),
            },
            opted_in("J1", "0151 99999999"),
            {"id": "J2", "phone": "0151 99999999"},
        ],
        NOW,
    )
    run_once(cfg, engine=engine, clock=clock)
    answers = check(engine, cfg, "4915188888888", "4915199999999")
    assert reasons(answers) == [(False, "revoked"), (True, "opted_in")]
    assert answers[0].records == ("H1", "H2") and answers[1].records == ("J1", "J2")


def test_brazil_mexico_spellings_user_ids_and_a_trunk_zero(engine: Engine, store_url: str) -> None:
    """The wa_id spellings WhatsApp uses find the CRM's numbers; a user id finds its record,
    and a stop sent under the user id alone after the sync revokes it."""
    cfg = loaded(store_url)
    upsert_contacts(
        engine,
        [
            opted_in("BR", "+55 11 98765 4321"),
            opted_in("MX", "+52 55 1234 5678"),
            opted_in("U", "", whatsapp_user_id="US.13491208655302741918"),
            opted_in("DE", "+49 151 23456789"),
        ],
        NOW,
    )
    run_once(cfg, engine=engine, clock=clock)
    values = [
        "551187654321",
        "+55 (11) 8765-4321",
        "5215512345678",
        "+52 1 55 1234 5678",
        "US.13491208655302741918",
        "+49 (0)151 2345 6789",
        "0151 23456789",
    ]
    answers = check(engine, cfg, *values)
    assert reasons(answers) == [(True, "opted_in")] * len(values)
    assert [a.records[0] for a in answers] == ["BR", "BR", "MX", "MX", "U", "DE", "DE"]
    deliver(
        engine,
        cfg,
        p.user_preference("US.13491208655302741918", NOW - timedelta(minutes=1), "stop"),
    )
    assert reasons(check(engine, cfg, "US.13491208655302741918")) == [(False, "revoked")]


def test_a_stop_by_user_id_reaches_the_number_it_came_with(engine: Engine, store_url: str) -> None:
    """A record known by number only: its number wrote with a user id before the sync, so a
    later stop carrying only that user id still answers no for the number."""
    cfg = loaded(store_url)
    upsert_contacts(engine, [{**opted_in("K", "0151 12121212")}], NOW)
    deliver(engine, cfg, p.message("4915112121212", T0, "hi", user_id="DE.777"))
    run_once(cfg, engine=engine, clock=clock)
    deliver(engine, cfg, p.user_preference("DE.777", NOW - timedelta(minutes=1), "stop"))
    assert reasons(check(engine, cfg, "4915112121212")) == [(False, "revoked")]


@pytest.mark.parametrize(
    "link",
    [
        p.message("4915112121212", NOW - timedelta(minutes=2), "hi", user_id="DE.778"),
        p.status("4915112121212", NOW - timedelta(minutes=2), recipient_user_id="DE.778"),
        p.user_id_update("4915112121212", NOW - timedelta(minutes=2), None, "DE.778"),
        p.user_id_update(None, NOW - timedelta(minutes=2), "DE.777", "DE.778"),
        p.user_id_update(None, NOW - timedelta(days=2), "DE.777", "DE.778"),
    ],
    ids=[
        "message with both",
        "status with both",
        "user id update",
        "update of the user id alone",
        "that update delivered late",
    ],
)
def test_a_stop_by_a_user_id_linked_after_the_last_sync(
    engine: Engine, store_url: str, link: dict[str, Any]
) -> None:
    """The number was joined to a user id only after the last sync (by a message or a
    status carrying both, or by a user-id change, also one Meta delivers days after it
    happened), then a stop carried only that id: the check follows the new link at once, as
    the next sync will."""
    cfg = loaded(store_url)
    upsert_contacts(engine, [opted_in("K", "0151 12121212", whatsapp_user_id="DE.777")], NOW)
    run_once(cfg, engine=engine, clock=clock)
    assert reasons(check(engine, cfg, "4915112121212")) == [(True, "opted_in")]
    deliver(engine, cfg, link)
    assert reasons(check(engine, cfg, "4915112121212")) == [(True, "opted_in")]
    deliver(engine, cfg, p.user_preference("DE.778", NOW - timedelta(minutes=1), "stop"))
    assert reasons(check(engine, cfg, "4915112121212")) == [(False, "revoked")]
    run_once(cfg, engine=engine, clock=clock)
    assert reasons(check(engine, cfg, "4915112121212", "DE.778")) == [
        (False, "revoked"),
        (False, "revoked"),
    ]


def test_a_stop_by_a_user_id_before_the_sync_joined_after_it(
    engine: Engine, store_url: str
) -> None:
    """Meta delivered the user-id change late: the STOP by the new id arrived before the
    sync (which could not tie it to the record), the change after. The check applies the
    new id's whole history at once, as the next sync will."""
    cfg = loaded(store_url)
    upsert_contacts(engine, [opted_in("K", "0151 12121212", whatsapp_user_id="DE.777")], NOW)
    early = NOW - timedelta(hours=2)
    ingest_payload(
        engine,
        p.payload(p.user_preference("DE.778", early, "stop")),
        keyword_rules(cfg.settings),
        "test",
        lambda: early,
    )
    run_once(cfg, engine=engine, clock=lambda: NOW - timedelta(hours=1))
    assert reasons(check(engine, cfg, "4915112121212")) == [(True, "opted_in")]
    deliver(engine, cfg, p.user_id_update(None, NOW - timedelta(hours=3), "DE.777", "DE.778"))
    assert reasons(check(engine, cfg, "4915112121212")) == [(False, "revoked")]
    run_once(cfg, engine=engine, clock=clock)
    assert reasons(check(engine, cfg, "4915112121212")) == [(False, "revoked")]


def snapshot_rows(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(select(func.count()).select_from(consent_snapshot)).scalar_one()
        )


def test_the_snapshot_follows_the_ledger(engine: Engine, store_url: str) -> None:
    """An idle full sync rewrites nothing; a deleted record leaves the snapshot at the next
    full sync; a dry run writes no snapshot."""
    cfg = loaded(store_url)
    upsert_contacts(engine, [opted_in("A", "0151 11111111"), opted_in("B", "0151 22222222")], NOW)
    run_once(cfg, dry_run=True, engine=engine, clock=clock)
    assert snapshot_rows(engine) == 0
    run_once(cfg, engine=engine, clock=clock)
    assert snapshot_rows(engine) == 2
    with engine.connect() as connection:
        before = connection.execute(select(consent_snapshot.c.synced_at)).scalars().all()
    run_once(cfg, full=True, engine=engine, clock=lambda: NOW + timedelta(hours=1))
    with engine.connect() as connection:
        assert connection.execute(select(consent_snapshot.c.synced_at)).scalars().all() == before
    from waconsent.store.tables import contacts

    with engine.begin() as connection:
        connection.execute(contacts.delete().where(contacts.c.id == "B"))
    run_once(cfg, full=True, engine=engine, clock=clock)
    assert snapshot_rows(engine) == 1
    assert reasons(check(engine, cfg, B_NUMBER)) == [(False, "no_record")]


def test_a_changed_record_and_a_row_without_digest_are_rewritten_once(
    engine: Engine, store_url: str
) -> None:
    """A full sync rewrites the snapshot of a record whose consent changed in the CRM, and
    a row kept before digests existed (migration 0009) once; then nothing again."""
    cfg = loaded(store_url)
    upsert_contacts(engine, [opted_in("A", "0151 11111111"), opted_in("B", "0151 22222222")], NOW)
    run_once(cfg, engine=engine, clock=clock)
    later = NOW + timedelta(hours=1)
    upsert_contacts(engine, [opted_in("A", "0151 11111111", opt_in=False)], later)
    with engine.begin() as connection:
        connection.execute(
            consent_snapshot.update().where(consent_snapshot.c.record_id == "B").values(digest=None)
        )
    run_once(cfg, full=True, engine=engine, clock=lambda: later)
    assert synced_at(engine) == {"A": later, "B": later}
    assert reasons(check(engine, cfg, A_NUMBER, B_NUMBER, now=later)) == [
        (False, "no_consent"),
        (True, "opted_in"),
    ]
    run_once(cfg, full=True, engine=engine, clock=lambda: later + timedelta(hours=1))
    assert synced_at(engine) == {"A": later, "B": later}


def synced_at(engine: Engine) -> dict[str, datetime]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(consent_snapshot.c.record_id, consent_snapshot.c.synced_at)
        )
        return {record_id: moment for record_id, moment in rows}


def test_the_snapshot_digest_sees_every_consent_field_to_the_second() -> None:
    """Equal digests mean equal snapshots (a sync skips the write): every field and key
    counts, a microsecond does not (the CRMs keep seconds), nor does the sync's own time."""
    moment = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
    row = SnapshotRow("R", frozenset({"+491511"}), True, moment, None, True, None, moment)
    same = [
        row._replace(opt_in_date=moment.replace(microsecond=999_999)),
        row._replace(synced_at=moment + timedelta(days=1)),
        row._replace(opt_in_date=moment.astimezone(timezone(timedelta(hours=2)))),
    ]
    different = [
        row._replace(keys=frozenset({"+491511", "uid:US.1"})),
        row._replace(opt_in=None),
        row._replace(opt_in=False),
        row._replace(opt_in_date=moment + timedelta(seconds=1)),
        row._replace(opt_out_date=moment),
        row._replace(proof_complete=False),
        row._replace(session_expires=moment),
    ]
    assert {digest_of(other) for other in same} == {digest_of(row)}
    assert len({digest_of(other) for other in [row, *different]}) == len(different) + 1


def test_the_snapshot_digest_is_exact_at_the_edges() -> None:
    """A second apart near the year 9999 (where a float timestamp rounds) and a key holding
    the characters that could join two keys are different snapshots."""
    last = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
    row = SnapshotRow("R", frozenset({"+491511"}), True, last, None, True, None, last)
    before = row._replace(opt_in_date=last - timedelta(microseconds=1))
    assert digest_of(before) != digest_of(row)
    one = row._replace(keys=frozenset({"uid:a\x1fuid:b"}))
    two = row._replace(keys=frozenset({"uid:a", "uid:b"}))
    assert digest_of(one) != digest_of(two)


# ---------------------------------------------------------------- the command


@pytest.fixture
def cli_config(tmp_path: Path, sqlite_url: str) -> Path:
    path = tmp_path / "waconsent.toml"
    path.write_text(f'[store]\nurl = "{sqlite_url}"\n\n[crm]\nkind = "ledger"\n', encoding="utf-8")
    return path


def run(config: Path, *args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(
        main, ["--config", str(config), *args], input=stdin, catch_exceptions=False
    )


@pytest.fixture
def synced(cli_config: Path, sqlite_url: str) -> tuple[Engine, LoadedConfig]:
    from waconsent.store.engine import open_engine

    engine = open_engine(sqlite_url)
    cfg = loaded(sqlite_url)
    upsert_contacts(
        engine,
        [opted_in("A", "+49 151 11111111"), {"id": "B", "mobile_phone": "0151 22222222"}],
        NOW,
    )
    run_once(cfg, engine=engine, clock=clock)
    return engine, cfg


def test_cli_keeps_every_column_and_adds_the_answer(
    cli_config: Path, synced: Any, tmp_path: Path
) -> None:
    """CSV in, CSV out: every input column kept (spreadsheet-safe), the four columns added;
    an unparseable number costs only its own row."""
    listing = tmp_path / "list.csv"
    listing.write_text(
        f"name,phone,segment\r\nAnna,+49 151 11111111,=vip\r\nBen,n/a,x\r\nCem,{B_NUMBER},y\r\n",
        encoding="utf-8",
    )
    result = run(cli_config, "audience", "check", str(listing))
    assert result.exit_code == 0, result.output
    lines = result.stdout_bytes.decode().split("\r\n")
    assert lines[0] == "name,phone,segment,may_send,reason,session_open_until,records"
    assert lines[1] == "Anna,'+49 151 11111111,'=vip,true,opted_in,,A"
    assert lines[2] == "Ben,n/a,x,false,unparseable_number,,"
    assert lines[3] == f"Cem,{B_NUMBER},y,false,no_consent,,B"
    assert "3 numbers for marketing: 1 may be sent" in result.stderr


def test_cli_stop_after_sync_only_allowed_json_and_stdin(cli_config: Path, synced: Any) -> None:
    """A STOP received after the last sync answers no at once; --only-allowed drops the
    rest; --format json is a list of objects; - reads standard input; --column picks."""
    engine, cfg = synced
    listing = f"number\n{A_NUMBER}\n{B_NUMBER}\n"
    first = run(
        cli_config,
        "audience",
        "check",
        "-",
        "--column",
        "number",
        "--only-allowed",
        "--format",
        "json",
        stdin=listing,
    )
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout) == [
        {
            "number": A_NUMBER,
            "may_send": True,
            "reason": "opted_in",
            "session_open_until": None,
            "records": ["A"],
        }
    ]
    ingest_payload(
        engine,
        p.payload(p.message(A_NUMBER, datetime.now(UTC), "STOP")),
        keyword_rules(cfg.settings),
        "test",
        lambda: datetime.now(UTC),
    )
    again = run(
        cli_config,
        "audience",
        "check",
        "-",
        "--column",
        "number",
        "--format",
        "json",
        stdin=listing,
    )
    assert [row["reason"] for row in json.loads(again.stdout)] == ["revoked", "no_consent"]
    service = run(
        cli_config,
        "audience",
        "check",
        "-",
        "--column",
        "number",
        "--purpose",
        "service",
        stdin=listing,
    )
    second_line = service.stdout_bytes.decode().split("\r\n")[1]
    assert second_line.startswith(f"{A_NUMBER},true,session_open,")


def test_cli_names_a_missing_column(cli_config: Path, synced: Any) -> None:
    """A list without the column exits 1 and names the columns it has."""
    result = run(cli_config, "audience", "check", "-", stdin="mobile\n123\n")
    assert result.exit_code == 1
    assert "no column 'phone'" in result.output and "mobile" in result.output


def test_cli_long_list_in_worker_processes_keeps_order(
    cli_config: Path, synced: Any, tmp_path: Path
) -> None:
    """A list of more than ten batches is checked in worker processes; every row comes back
    in its place with its own answer."""
    numbers = [A_NUMBER, B_NUMBER, "n/a", "+49 170 1234567"]
    expected = ["opted_in", "no_consent", "unparseable_number", "no_record"]
    listing = tmp_path / "long.csv"
    listing.write_text(
        "n,phone\n" + "".join(f"{i},{numbers[i % 4]}\n" for i in range(12_001)), encoding="utf-8"
    )
    result = run(cli_config, "audience", "check", str(listing), "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["n"] for row in rows] == [str(i) for i in range(12_001)]
    assert [row["reason"] for row in rows] == [expected[i % 4] for i in range(12_001)]


def test_cli_malformed_csv_names_the_line(cli_config: Path, synced: Any, tmp_path: Path) -> None:
    """A row the csv module cannot read (a cell over its size limit) is skipped naming its
    line, its neighbours are answered, and the exit code is 1; bytes that are not UTF-8
    cost only their own row, and come back as they were."""
    bad = tmp_path / "bad.csv"
    bad.write_bytes(
        b"phone,note\n"
        + A_NUMBER.encode()
        + b",ok\nx,"
        + b"a" * 200_000
        + b"\n"
        + A_NUMBER.encode()
        + b",after\n"
    )
    result = run(cli_config, "audience", "check", str(bad))
    assert result.exit_code == 1
    assert f"{bad}:3: not readable as CSV" in result.stderr
    assert "field larger than field limit" in result.stderr
    answered = result.stdout.splitlines()
    assert answered[1].startswith(f"{A_NUMBER},ok,true,opted_in")
    assert answered[2].startswith(f"{A_NUMBER},after,true,opted_in")
    odd = tmp_path / "odd.csv"
    odd.write_bytes(b"phone,note\n" + A_NUMBER.encode() + b",\xff\xfe\n\xff,x\n")
    lines = run(cli_config, "audience", "check", str(odd)).stdout_bytes.split(b"\r\n")
    assert lines[1] == A_NUMBER.encode() + b",\xff\xfe,true,opted_in,,A"
    assert lines[2] == b"\xff,x,false,unparseable_number,,"

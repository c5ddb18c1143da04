"""The sync run end to end on the built-in ledger, on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sqlalchemy import Engine, func, select

from tests import payloads as p
from waconsent import config
from waconsent.config import LoadedConfig, Secrets
from waconsent.connectors.ledger import LedgerCrm
from waconsent.domain import WriteRequest, WriteResult
from waconsent.errors import ConnectionFailed, RunLockHeld
from waconsent.phones import mask
from waconsent.store import evidence as evidence_store
from waconsent.store import outbox as outbox_store
from waconsent.store import runs as run_store
from waconsent.store.contacts import upsert_contacts
from waconsent.store.tables import contacts, evidence, locks
from waconsent.sync.ingest import ingest_payload, keyword_rules
from waconsent.sync.run import run_once

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[1]


def loaded(url: str, **sync: Any) -> LoadedConfig:
    raw: dict[str, Any] = {"store": {"url": url}, "crm": {"kind": "ledger"}}
    if sync:
        raw["sync"] = sync
    return LoadedConfig(config.parse(raw), Secrets(), None)


def opted_in(record_id: str, mobile: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": record_id,
        "name": record_id,
        "mobile_phone": mobile,
        "opt_in": True,
        "opt_in_date": T0 - timedelta(days=30),
        "opt_in_ip": "203.0.113.1",
        "opt_in_source": "web-form",
        **extra,
    }


def deliver(engine: Engine, cfg: LoadedConfig, *changes: dict[str, Any]) -> None:
    ingest_payload(engine, p.payload(*changes), keyword_rules(cfg.settings), "test", lambda: NOW)


def contact(engine: Engine, record_id: str) -> Any:
    with engine.connect() as connection:
        return connection.execute(select(contacts).where(contacts.c.id == record_id)).one()


def clock() -> datetime:
    return NOW


def test_stop_reaches_every_record_with_the_number(engine: Engine, store_url: str) -> None:
    """A STOP revokes every record carrying the number in any phone field and spelling."""
    cfg = loaded(store_url)
    upsert_contacts(
        engine,
        [
            opted_in("A", "0151 23456789"),
            {**opted_in("B", ""), "phone": "+49 151 234 567 89"},
            opted_in("C", "0170 1112233"),
        ],
        NOW,
    )
    deliver(engine, cfg, p.message("4915123456789", T0, "Stop!"))
    report = run_once(cfg, engine=engine, clock=clock)
    assert report.revocations == 2 and report.writes_sent == 2 and report.writes_failed == 0
    for record_id in ("A", "B"):
        row = contact(engine, record_id)
        assert row.opt_in is False and row.opt_out_date == T0
    assert contact(engine, "C").opt_in is True


def test_second_run_with_nothing_new_writes_nothing(engine: Engine, store_url: str) -> None:
    """Idempotence end to end: the next sync sends zero writes."""
    cfg = loaded(store_url)
    upsert_contacts(
        engine,
        [
            opted_in("A", "0151 23456789"),
            {"id": "B", "mobile_phone": "0170 1"},
            {"id": "D", "mobile_phone": "+43 664 1234567", "opt_in": True},
        ],
        NOW,
    )
    deliver(
        engine, cfg, p.message("4915123456789", T0, "STOP"), p.message("436641234567", T0, "hi")
    )
    first = run_once(cfg, engine=engine, clock=clock)
    assert first.writes_sent == 2
    second = run_once(cfg, engine=engine, clock=clock)
    assert (second.mode, second.writes_sent, second.writes_queued) == ("incremental", 0, 0)
    full = run_once(cfg, full=True, engine=engine, clock=clock)
    assert full.writes_sent == 0


def test_incremental_run_reads_changed_and_active_records(engine: Engine, store_url: str) -> None:
    """Incremental: records changed since the watermark plus those whose numbers had activity."""
    cfg = loaded(store_url, lookback_seconds=0)
    upsert_contacts(
        engine, [opted_in(f"R{i}", f"0151 2345{i:04d}") for i in range(50)], T0 - timedelta(days=3)
    )
    upsert_contacts(engine, [opted_in("Z", "0170 1112233")], T0 - timedelta(days=2))
    run_once(cfg, engine=engine, clock=clock)
    deliver(engine, cfg, p.message("4915123450007", T0, "STOP"))
    report = run_once(cfg, engine=engine, clock=clock)
    assert report.mode == "incremental"
    # Z sits on the watermark (>= re-reads the boundary, harmlessly); R7 had activity
    assert report.records_read == 2 and report.revocations == 1 and report.writes_sent == 1
    assert contact(engine, "R7").opt_in is False


def test_dry_run_writes_nothing_anywhere(engine: Engine, store_url: str) -> None:
    """--dry-run shows the field-level diff and leaves CRM, outbox, runs and evidence alone."""
    cfg = loaded(store_url)
    upsert_contacts(engine, [opted_in("A", "0151 23456789")], NOW)
    deliver(engine, cfg, p.message("4915123456789", T0, "STOP"))
    seen: list[tuple[str, str, Any]] = []
    with engine.connect() as connection:
        chain_before = evidence_store.chain_length(connection)
    report = run_once(
        cfg,
        dry_run=True,
        engine=engine,
        clock=clock,
        on_decision=lambda r, d: seen.extend((r.record_id, c.field, c.new) for c in d.changes),
    )
    assert ("A", "opt_in", False) in seen and report.revocations == 1
    assert contact(engine, "A").opt_in is True
    with engine.connect() as connection:
        assert outbox_store.count(connection, cfg.settings.crm_name) == 0
        assert run_store.history(connection) == []
        assert evidence_store.chain_length(connection) == chain_before


def test_unparseable_phone_is_reported_not_fatal(engine: Engine, store_url: str) -> None:
    """A junk phone value is reported masked with record and field; the run goes on."""
    cfg = loaded(store_url)
    upsert_contacts(
        engine, [{"id": "J", "mobile_phone": "n/a Tom"}, opted_in("A", "0151 23456789")], NOW
    )
    deliver(engine, cfg, p.message("4915123456789", T0, "STOP"))
    report = run_once(cfg, engine=engine, clock=clock)
    assert report.phone_problems == [
        {
            "record_id": "J",
            "field": "mobile_phone",
            "value": "****Tom",
            "reason": report.phone_problems[0]["reason"],
        }
    ]
    assert report.revocations == 1


def test_unmatched_numbers_are_counted_never_created(engine: Engine, store_url: str) -> None:
    """Activity from a number without a record is listed (masked) and no record is invented."""
    cfg = loaded(store_url)
    upsert_contacts(engine, [opted_in("A", "0151 23456789")], NOW)
    deliver(
        engine,
        cfg,
        p.message("4917099999999", T0, "START"),
        p.message("4915123456789", T0, "hi", user_id="US.1"),
    )
    report = run_once(cfg, engine=engine, clock=clock)
    assert report.unmatched_numbers == 1 and report.unmatched == [mask("+4917099999999")]
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(contacts)).scalar() == 1


def test_number_change_is_reported_and_moves_nothing(engine: Engine, store_url: str) -> None:
    """user_changed_number is reported for the admin and changes no consent."""
    cfg = loaded(store_url)
    upsert_contacts(engine, [opted_in("A", "0151 23456789")], NOW)
    deliver(
        engine,
        cfg,
        p.message(
            "4915123456789",
            T0,
            None,
            type_="system",
            system={"type": "user_changed_number", "wa_id": "4915199999999", "body": "x"},
        ),
    )
    report = run_once(cfg, engine=engine, clock=clock)
    assert report.number_changes[0]["to"] == "**********999"
    assert report.writes_sent == 0 and contact(engine, "A").opt_in is True


def test_conflict_is_reported_and_crm_stands(engine: Engine, store_url: str) -> None:
    """A CRM re-subscription newer than a STOP stands; the report names the conflict."""
    cfg = loaded(store_url)
    upsert_contacts(
        engine, [opted_in("A", "0151 23456789", opt_in_date=T0 + timedelta(days=1))], NOW
    )
    deliver(engine, cfg, p.message("4915123456789", T0, "STOP"))
    report = run_once(cfg, engine=engine, clock=clock)
    assert len(report.conflicts) == 1 and contact(engine, "A").opt_in is True


def test_failed_write_stays_queued_and_revocations_go_first(engine: Engine, store_url: str) -> None:
    """A failed write stays in the outbox; the next run sends revocations before others."""
    cfg = loaded(store_url)
    upsert_contacts(
        engine, [opted_in("A", "0151 23456789"), {"id": "B", "mobile_phone": "0170 1112233"}], NOW
    )
    deliver(
        engine,
        cfg,
        p.message("4917011122 33".replace(" ", ""), T0, "START"),
        p.message("4915123456789", T0, "STOP"),
    )

    class Flaky(LedgerCrm):
        calls: ClassVar[list[list[str]]] = []

        def write(self, writes: Any) -> list[WriteResult]:
            self.calls.append([w.record_id for w in writes])
            if len(self.calls) == 1:
                return [
                    WriteResult(w.record_id, False, "UNABLE_TO_LOCK_ROW", "LOCK") for w in writes
                ]
            return super().write(writes)

    flaky = Flaky(engine)
    first = run_once(cfg, engine=engine, clock=clock, connector=flaky)
    assert first.writes_failed == 2 and first.status == "partial"
    with engine.connect() as connection:
        assert outbox_store.count(connection, cfg.settings.crm_name) == 2
    second = run_once(cfg, engine=engine, clock=clock, connector=flaky)
    assert flaky.calls[0] == ["A", "B"] and flaky.calls[1] == ["A", "B"]  # revocation first
    assert second.writes_sent == 2
    assert contact(engine, "A").opt_in is False and contact(engine, "B").opt_in is True


def test_one_run_at_a_time(engine: Engine, store_url: str) -> None:
    """A second run while the lock is held by a live node fails with RunLockHeld."""
    cfg = loaded(store_url)
    run_store.acquire_lock(engine, cfg.settings.crm_name, "other-host:1:x", NOW)
    with pytest.raises(RunLockHeld):
        run_once(cfg, engine=engine, clock=clock)


CRASHING_RUN = textwrap.dedent("""
    import os, signal, sys
    from datetime import datetime, UTC
    from waconsent import config
    from waconsent.config import LoadedConfig, Secrets
    from waconsent.connectors.ledger import LedgerCrm
    from waconsent.store.engine import open_engine
    from waconsent.sync.run import run_once

    url, kill_at = sys.argv[1], int(sys.argv[2])
    cfg = LoadedConfig(config.parse({"store": {"url": url}, "crm": {"kind": "ledger"}}),
                       Secrets(), None)
    engine = open_engine(url)

    class Dying(LedgerCrm):
        write_batch_size = 3
        calls = 0
        def write(self, writes):
            Dying.calls += 1
            if Dying.calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().write(writes)

    run_once(cfg, engine=engine, connector=Dying(engine))
""")


def crash(url: str, kill_at: int) -> int:
    result = subprocess.run(
        [sys.executable, "-c", CRASHING_RUN, url, str(kill_at)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result.returncode


def test_sigkill_never_loses_a_revocation(engine: Engine, store_url: str) -> None:
    """Killed after the outbox is written, then halfway through sending: nothing is lost."""
    cfg = loaded(store_url)
    upsert_contacts(engine, [opted_in(f"R{i}", f"0151 2345{i:04d}") for i in range(10)], NOW)
    deliver(engine, cfg, *[p.message(f"4915123450{i:03d}", T0, "STOP") for i in range(10)])
    assert crash(store_url, kill_at=1) == -9  # dies before the first write is sent
    with engine.connect() as connection:
        assert outbox_store.count(connection, cfg.settings.crm_name) == 10
    assert all(contact(engine, f"R{i}").opt_in is True for i in range(10))
    assert crash(store_url, kill_at=2) == -9  # dies after one batch of three was confirmed
    with engine.connect() as connection:
        assert outbox_store.count(connection, cfg.settings.crm_name) == 7
    report = run_once(cfg, engine=engine)
    assert report.writes_sent == 7
    assert all(contact(engine, f"R{i}").opt_in is False for i in range(10))
    with engine.connect() as connection:
        writes = (
            connection.execute(select(evidence.c.record_id).where(evidence.c.kind == "write"))
            .scalars()
            .all()
        )
        assert sorted(writes) == sorted(f"R{i}" for i in range(10))  # each exactly once
        assert evidence_store.verify(connection) == []
        assert outbox_store.count(connection, cfg.settings.crm_name) == 0


def test_report_json_has_the_documented_keys(engine: Engine, store_url: str) -> None:
    """The JSON report carries every count the README documents."""
    cfg = loaded(store_url)
    report = run_once(cfg, engine=engine, clock=clock).as_dict()
    for key in (
        "records_read",
        "events_considered",
        "revocations",
        "opt_ins",
        "sessions_updated",
        "proof_missing",
        "proof_cleared",
        "conflicts",
        "unmatched_numbers",
        "writes_sent",
        "writes_failed",
        "api_calls",
    ):
        assert key in report
    json.dumps(report)


def test_writes_request_only_changed_fields(engine: Engine, store_url: str) -> None:
    """The connector receives only the fields that change."""
    cfg = loaded(store_url)
    upsert_contacts(engine, [opted_in("A", "0151 23456789")], NOW)
    deliver(engine, cfg, p.message("4915123456789", T0, "STOP"))
    sent: list[WriteRequest] = []

    class Recording(LedgerCrm):
        def write(self, writes: Any) -> list[WriteResult]:
            sent.extend(writes)
            return super().write(writes)

    run_once(cfg, engine=engine, clock=clock, connector=Recording(engine))
    assert set(sent[0].values) == {"opt_in", "opt_out_date", "last_inbound", "session_expires"}


def test_read_failure_mid_run_fails_cleanly(engine: Engine, store_url: str) -> None:
    """A CRM read that fails after some pages ends the run as failed, keeps what was queued,
    moves no watermark and releases the lock."""
    cfg = loaded(store_url, read_chunk_size=2)
    upsert_contacts(engine, [opted_in(f"R{i}", f"0151 2345{i:04d}") for i in range(6)], NOW)
    deliver(engine, cfg, p.message("4915123450000", T0, "STOP"))

    class Breaking(LedgerCrm):
        def read_all(self) -> Any:
            for index, record in enumerate(super().read_all()):
                if index == 4:
                    raise ConnectionFailed("CRM went away")
                yield record

    with pytest.raises(ConnectionFailed, match="went away"):
        run_once(cfg, engine=engine, clock=clock, connector=Breaking(engine, read_chunk_size=2))
    with engine.connect() as connection:
        history = run_store.history(connection)
        assert [(r.mode, r.status) for r in history] == [("full", "failed")]
        assert run_store.last_watermarks(connection, cfg.settings.crm_name).records is None
        assert outbox_store.count(connection, cfg.settings.crm_name) == 1  # R0's revocation
    again = run_once(cfg, engine=engine, clock=clock)  # the lock was released
    assert again.writes_sent == 1 and contact(engine, "R0").opt_in is False


def test_queued_write_is_never_sent_over_a_newer_crm_change(engine: Engine, store_url: str) -> None:
    """A queued opt-in that failed is dropped, not sent, once an agent records an opt-out in
    the CRM afterwards; the CRM's newer change stands."""
    cfg = loaded(store_url)
    upsert_contacts(engine, [{"id": "A", "mobile_phone": "0151 23456789", "opt_in": False}], NOW)
    deliver(engine, cfg, p.message("4915123456789", T0, "START"))

    class Failing(LedgerCrm):
        def write(self, writes: Any) -> list[WriteResult]:
            return [WriteResult(w.record_id, False, "locked", "UNABLE_TO_LOCK_ROW") for w in writes]

    assert run_once(cfg, engine=engine, clock=clock, connector=Failing(engine)).writes_failed == 1
    upsert_contacts(
        engine, [{"id": "A", "opt_in": False, "opt_out_date": T0 + timedelta(hours=2)}], NOW
    )  # the agent
    report = run_once(cfg, engine=engine, clock=clock)
    assert report.writes_superseded == 1 and report.superseded == ["A"]
    row = contact(engine, "A")
    assert row.opt_in is False and row.opt_out_date == T0 + timedelta(hours=2)
    with engine.connect() as connection:
        assert outbox_store.count(connection, cfg.settings.crm_name) == 0


def test_write_the_crm_already_holds_is_confirmed_without_sending(
    engine: Engine, store_url: str
) -> None:
    """A run killed between the CRM's answer and the commit: the next run sees the values in
    the CRM, confirms the row without sending it again, and records its evidence once."""
    cfg = loaded(store_url)
    upsert_contacts(engine, [opted_in("A", "0151 23456789")], NOW)
    deliver(engine, cfg, p.message("4915123456789", T0, "STOP"))
    sent: list[str] = []

    class ApplyButForget(LedgerCrm):
        def write(self, writes: Any) -> list[WriteResult]:
            super().write(writes)
            raise ConnectionFailed("the answer was lost")

    class Recording(LedgerCrm):
        def write(self, writes: Any) -> list[WriteResult]:
            sent.extend(w.record_id for w in writes)
            return super().write(writes)

    with pytest.raises(ConnectionFailed):
        run_once(cfg, engine=engine, clock=clock, connector=ApplyButForget(engine))
    assert contact(engine, "A").opt_in is False  # the CRM got it
    report = run_once(cfg, engine=engine, clock=clock, connector=Recording(engine))
    assert sent == [] and report.writes_sent == 1
    with engine.connect() as connection:
        writes = (
            connection.execute(select(evidence.c.record_id).where(evidence.c.kind == "write"))
            .scalars()
            .all()
        )
        assert writes == ["A"] and outbox_store.count(connection, cfg.settings.crm_name) == 0


def test_permanent_failure_is_reported_once_not_retried_every_run(
    engine: Engine, store_url: str
) -> None:
    """A write the CRM refuses for good stays in the outbox, marked, and is not resent while
    the decision is the same."""
    cfg = loaded(store_url)
    upsert_contacts(engine, [opted_in("A", "0151 23456789")], NOW)
    deliver(engine, cfg, p.message("4915123456789", T0, "STOP"))
    attempts: list[str] = []

    class Refusing(LedgerCrm):
        def write(self, writes: Any) -> list[WriteResult]:
            attempts.extend(w.record_id for w in writes)
            return [
                WriteResult(w.record_id, False, "bad field", "INVALID_FIELD", permanent=True)
                for w in writes
            ]

    first = run_once(cfg, engine=engine, clock=clock, connector=Refusing(engine))
    second = run_once(cfg, full=True, engine=engine, clock=clock, connector=Refusing(engine))
    assert first.writes_failed == 1 and second.writes_failed == 0 and attempts == ["A"]
    with engine.connect() as connection:
        assert outbox_store.count(connection, cfg.settings.crm_name) == 1


def test_lost_lease_stops_the_run(engine: Engine, store_url: str) -> None:
    """A run whose lock was taken over (its lease expired) stops instead of writing on."""
    cfg = loaded(store_url)
    upsert_contacts(engine, [opted_in(f"R{i}", f"0151 2345{i:04d}") for i in range(4)], NOW)
    deliver(engine, cfg, *[p.message(f"4915123450{i:03d}", T0, "STOP") for i in range(4)])

    class Slow(LedgerCrm):
        write_batch_size = 2

        def write(self, writes: Any) -> list[WriteResult]:
            with engine.begin() as connection:  # another node takes the expired lease
                connection.execute(locks.update().values(holder="other-host:1:x"))
            return super().write(writes)

    with pytest.raises(RunLockHeld, match="other-host"):
        run_once(cfg, engine=engine, clock=clock, connector=Slow(engine))
    assert sum(contact(engine, f"R{i}").opt_in is False for i in range(4)) == 2


def test_event_committed_late_below_the_watermark_is_not_missed(
    engine: Engine, store_url: str
) -> None:
    """A delivery whose row id lies below the last run's event watermark (it committed after
    the run read the newest id, as PostgreSQL allows) is still picked up incrementally."""
    from sqlalchemy import insert

    from waconsent.connectors.whatsapp import parse_payload
    from waconsent.store import events as event_store
    from waconsent.store.tables import events

    cfg = loaded(store_url)
    upsert_contacts(
        engine,
        [opted_in("A", "0151 23456789"), opted_in("B", "0170 1112233")],
        NOW - timedelta(days=1),
    )
    upsert_contacts(engine, [opted_in("C", "0170 9998877")], NOW - timedelta(hours=1))
    early, late = (
        parse_payload(p.payload(p.message(wa, T0, "STOP"))).events[0]
        for wa in ("491701112299", "4915123456789")
    )
    with engine.begin() as connection:
        connection.execute(insert(events).values(id=1000, **event_store._row(early, "t", NOW)))
    run_once(cfg, engine=engine, clock=clock)  # watermark: event id 1000
    with engine.begin() as connection:  # the late commit: id 500, received just now
        connection.execute(insert(events).values(id=500, **event_store._row(late, "t", NOW)))
    report = run_once(cfg, engine=engine, clock=lambda: NOW + timedelta(seconds=30))
    assert report.mode == "incremental" and report.revocations == 1
    assert report.records_read == 2  # C on the watermark, A found through its late event
    assert contact(engine, "A").opt_in is False


def test_collector_freeze_spans_overlapping_runs(engine: Engine, store_url: str) -> None:
    """A run keeps the garbage collector off pre-existing objects; with two runs in one
    process (as under `serve`), the first to end must not unfreeze the other's, and the
    last to end unfreezes everything."""
    cfg = loaded(store_url)
    upsert_contacts(engine, [opted_in("A", "0151 23456789"), opted_in("B", "0170 1112233")], NOW)
    assert gc.get_freeze_count() == 0
    seen: list[tuple[str, bool]] = []

    def inner(_record: Any, _decision: Any) -> None:
        seen.append(("inner", gc.get_freeze_count() > 0))

    def outer(_record: Any, _decision: Any) -> None:
        seen.append(("outer", gc.get_freeze_count() > 0))
        if len(seen) == 1:
            run_once(cfg, dry_run=True, engine=engine, clock=clock, on_decision=inner)

    run_once(cfg, full=True, engine=engine, clock=clock, on_decision=outer)
    assert seen == [("outer", True), ("inner", True), ("inner", True), ("outer", True)]
    assert gc.get_freeze_count() == 0


def test_failed_leftovers_do_not_hold_back_new_writes(engine: Engine, store_url: str) -> None:
    """Queued writes that fail again fill whole send batches; the run still goes past them
    and sends what it decided itself (here a new STOP), instead of stopping at a batch that
    holds only rows it already tried."""
    cfg = loaded(store_url)
    upsert_contacts(
        engine,
        [opted_in(name, f"0151 2345678{n}") for n, name in enumerate("ABCD")],
        NOW - timedelta(days=1),
    )
    upsert_contacts(engine, [opted_in("E", "0170 1112233")], NOW)  # the records watermark
    ingest_payload(
        engine,
        p.payload(*[p.message(f"491512345678{n}", T0, "STOP") for n in range(3)]),
        keyword_rules(cfg.settings),
        "test",
        lambda: NOW - timedelta(hours=2),
    )

    class Locked(LedgerCrm):
        write_batch_size = 2

        def write(self, writes: Any) -> list[WriteResult]:
            if any(w.record_id in "ABC" for w in writes):
                return [
                    WriteResult(w.record_id, False, "UNABLE_TO_LOCK_ROW", "LOCK") for w in writes
                ]
            return super().write(writes)

    first = run_once(cfg, engine=engine, clock=clock, connector=Locked(engine))
    assert first.writes_failed == 3
    deliver(engine, cfg, p.message("4915123456783", T0 + timedelta(hours=1), "STOP"))
    second = run_once(cfg, engine=engine, clock=clock, connector=Locked(engine))
    assert second.mode == "incremental" and second.writes_failed == 3
    assert second.writes_sent == 1 and contact(engine, "D").opt_in is False

"""`waconsent serve`: targeted write-back of revocations, the dispatcher and the schedule."""

from __future__ import annotations

import json
import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from tests import payloads as p
from tests.serving import free_port, ledger_serve_config, start_serve
from tests.test_run import NOW, T0, clock, contact, deliver, loaded, opted_in
from waconsent.config import parse
from waconsent.connectors.webhook_signature import sign
from waconsent.errors import RunLockHeld
from waconsent.store import runs as run_store
from waconsent.store.contacts import upsert_contacts
from waconsent.store.engine import open_engine
from waconsent.store.tables import contacts
from waconsent.sync.run import run_once
from waconsent.sync.scheduler import RevocationDispatcher, build_scheduler, revocation_keys

ROOT = Path(__file__).resolve().parents[1]


def test_targeted_run_reads_only_those_records_and_keeps_watermarks(
    engine: Engine, store_url: str
) -> None:
    """A targeted run revokes the number's records only and moves no watermark."""
    cfg = loaded(store_url, lookback_seconds=0)
    upsert_contacts(
        engine, [opted_in(f"R{i}", f"0151 2345{i:04d}") for i in range(20)], T0 - timedelta(days=3)
    )
    run_once(cfg, engine=engine, clock=clock)
    with engine.connect() as connection:
        before = run_store.last_watermarks(connection, cfg.settings.crm_name)
    deliver(engine, cfg, p.message("4915123450003", T0, "STOP"))
    report = run_once(cfg, engine=engine, clock=clock, only_keys={"+4915123450003"})
    assert (report.mode, report.records_read, report.writes_sent) == ("targeted", 1, 1)
    assert contact(engine, "R3").opt_in is False
    with engine.connect() as connection:
        assert run_store.last_watermarks(connection, cfg.settings.crm_name) == before
    follow_up = run_once(cfg, engine=engine, clock=clock)
    assert follow_up.mode == "incremental" and follow_up.writes_sent == 0


def test_revocation_keys_only_from_opt_outs() -> None:
    """Only opt-out events start a targeted write-back."""
    from waconsent.connectors.whatsapp import parse_payload

    events = parse_payload(
        p.payload(
            p.message("4915123456789", T0, "STOP", user_id="US.1"),
            p.message("4915123456788", T0, "hello"),
        )
    ).events
    assert revocation_keys(events) == {"+4915123456789", "uid:US.1"}


def test_dispatcher_batches_a_burst_and_retries_while_locked() -> None:
    """A burst of revocations is one run; a held lock is retried, then the run goes through."""
    calls: list[set[str]] = []
    done = threading.Event()

    def run(keys: set[str]) -> None:
        calls.append(keys)
        if len(calls) == 1:
            raise RunLockHeld("ledger", "other")
        done.set()

    from waconsent.connectors.whatsapp import parse_payload

    dispatcher = RevocationDispatcher(run, debounce=0.05, retry_after=0.05)
    dispatcher.start()
    for n in range(3):
        dispatcher.submit_events(
            parse_payload(p.payload(p.message(f"491512345670{n}", T0, "STOP"))).events
        )
    assert done.wait(5)
    dispatcher.stop()
    assert calls[0] == calls[1] == {f"+491512345670{n}" for n in range(3)}


def test_schedule_wiring() -> None:
    """Nightly full run on the cron in its time zone, incremental every N minutes."""
    schedule = parse(
        {
            "schedule": {
                "nightly": "0 2 * * *",
                "timezone": "Europe/Berlin",
                "incremental_minutes": 15,
            }
        }
    ).schedule
    scheduler = build_scheduler(schedule, lambda: None, lambda: None)
    jobs = {job.id: job for job in scheduler.get_jobs()}
    now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    nightly = jobs["nightly-full"].trigger.get_next_fire_time(None, now)
    assert nightly.astimezone(UTC) == datetime(2026, 11, 29, 1, 0, tzinfo=UTC)  # 02:00 CET
    assert jobs["incremental"].trigger.interval == timedelta(minutes=15)
    assert all(job.max_instances == 1 for job in jobs.values())


@pytest.mark.parametrize(
    "created_after_sync",
    [False, True],
    ids=["indexed contact", "contact created after the last sync"],
)
def test_serve_writes_a_revocation_back_within_seconds(
    tmp_path: Path, created_after_sync: bool
) -> None:
    """Under `waconsent serve`, a signed STOP reaches the ledger record within 5 s, not at
    the next scheduled run, also for a contact the last sync has not seen (found by its
    number in the CRM); SIGTERM stops it cleanly."""
    port = free_port()
    cfg, url = ledger_serve_config(tmp_path, port)
    engine = open_engine(url)
    upsert_contacts(engine, [opted_in("B", "0170 1112233")], NOW)
    if not created_after_sync:
        upsert_contacts(engine, [opted_in("A", "0151 23456789")], NOW)
    run_once(loaded(url), engine=engine)  # the phone index knows B (and A)
    if created_after_sync:
        upsert_contacts(engine, [opted_in("A", "+49 (0)151-234 567 89")], NOW)
    process, base = start_serve(
        cfg, port, {"WHATSAPP_APP_SECRET": "app-secret", "WHATSAPP_VERIFY_TOKEN": "vt"}
    )
    try:
        body = json.dumps(
            p.payload(p.message("4915123456789", datetime.now(UTC).replace(microsecond=0), "STOP"))
        ).encode()
        sent = time.monotonic()
        answer = httpx.post(
            f"{base}/webhooks/whatsapp",
            content=body,
            timeout=10,
            headers={
                "X-Hub-Signature-256": sign(body, "app-secret"),
                "Content-Type": "application/json",
            },
        )
        assert answer.status_code == 200
        revoked_after: float | None = None
        while time.monotonic() - sent < 15:
            with engine.connect() as connection:
                row: Any = connection.execute(
                    select(contacts.c.opt_in).where(contacts.c.id == "A")
                ).one()
            if row.opt_in is False:
                revoked_after = time.monotonic() - sent
                break
            time.sleep(0.1)
        assert revoked_after is not None and revoked_after < 5
        assert contact(engine, "B").opt_in is True
    finally:
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
        engine.dispose()
    assert process.returncode == 0, err[-2000:]
    assert "serve.scheduler_started" in err


def test_dispatcher_survives_unexpected_errors_and_a_steady_trickle() -> None:
    """A database error does not kill the worker, and STOPs arriving every 0.1 s still get a
    write-back within max_wait instead of waiting for a pause."""
    from sqlalchemy.exc import OperationalError

    from waconsent.connectors.whatsapp import parse_payload

    calls: list[tuple[float, set[str]]] = []
    started = time.monotonic()

    def run(keys: set[str]) -> None:
        calls.append((time.monotonic() - started, keys))
        if len(calls) == 1:
            raise OperationalError("UPDATE", {}, Exception("database is locked"))

    dispatcher = RevocationDispatcher(run, debounce=0.2, max_wait=0.5, retry_after=0.05)
    dispatcher.start()
    for n in range(20):  # 2 s of STOPs, 0.1 s apart: never a quiet 0.2 s
        dispatcher.submit_events(
            parse_payload(p.payload(p.message(f"49151234567{n:02d}", T0, "STOP"))).events
        )
        time.sleep(0.1)
    dispatcher.stop()
    assert dispatcher.alive is False
    assert calls[0][0] < 1.0  # the first write-back did not wait for the trickle to end
    assert len(calls) >= 3
    assert set().union(*(keys for _, keys in calls[1:])) >= calls[0][1]  # retried after error


def test_nightly_run_retries_when_an_incremental_run_holds_the_lock() -> None:
    """A nightly full run that meets the lock is rescheduled five minutes later, not lost."""
    schedule = parse({}).schedule

    def locked() -> None:
        raise RunLockHeld("ledger", "incremental run")

    scheduler = build_scheduler(schedule, locked, lambda: None)
    nightly = {job.id: job for job in scheduler.get_jobs()}["nightly-full"]
    before = datetime.now(UTC)
    nightly.func()
    retry = {job.id: job for job in scheduler.get_jobs()}["nightly-full-retry"]
    fire = retry.trigger.get_next_fire_time(None, before)
    assert timedelta(minutes=4) < fire - before < timedelta(minutes=6)

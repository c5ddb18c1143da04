"""Whole sync runs (`run_once`) against the fake Dataverse: records, writes and API calls."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import pytest
import responses
from sqlalchemy import Engine

from tests import payloads as p
from tests.fakes.dynamics import (
    AUTHORITY_HOST,
    CLIENT_ID,
    CLIENT_SECRET,
    ORG_URL,
    TENANT_ID,
    FakeDataverse,
)
from waconsent.config import LoadedConfig, Secrets, parse
from waconsent.connectors.dynamics import DynamicsConnector
from waconsent.connectors.http import RetryPolicy
from waconsent.sync.ingest import ingest_payload, keyword_rules
from waconsent.sync.run import run_once

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)  # the newest CRM edit before the first run
STOP_AT = T0 + timedelta(hours=3)
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
CONTACTS = 12_000
STOPS = 300
METADATA_CALLS = 3  # preflight each run: entity, attributes, string lengths


def config_for(store_url: str, **sync: Any) -> LoadedConfig:
    raw = tomllib.loads(
        resources.files("waconsent.config").joinpath("presets/dynamics.toml").read_text("utf-8")
    )
    raw["store"] = {"url": store_url}
    raw["dynamics"].update(
        {
            "url": ORG_URL,
            "tenant_id": TENANT_ID,
            "client_id": CLIENT_ID,
            "authority_host": AUTHORITY_HOST,
        }
    )
    if sync:
        raw["sync"] = sync
    return LoadedConfig(parse(raw), Secrets({"DYNAMICS_CLIENT_SECRET": CLIENT_SECRET}), None)


def clock() -> datetime:
    return NOW


@contextmanager
def dataverse_with_contacts() -> Iterator[FakeDataverse]:
    """The fake Dataverse with 12,000 contacts, opted in with complete proof, edited over
    the 12,000 minutes before T0."""
    # Not strict: the fake registers every route of the service and a test uses a few.
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        fake = FakeDataverse(clock=clock).install(mock)
        for n in range(CONTACTS):
            fake.add_contact(
                record_id=f"00000000-0000-4000-8000-{n:012d}",
                modified=T0 - timedelta(minutes=n),
                fullname=f"Contact {n}",
                mobilephone=f"+4915100{n:06d}",
                new_whatsappoptin=True,
                new_whatsappoptindate=T0 - timedelta(days=30),
                new_whatsappoptinip="203.0.113.7",
                new_whatsappoptinsource="web form",
                new_whatsappproofmissing=False,
            )
        yield fake


@pytest.fixture
def fake() -> Iterator[FakeDataverse]:
    with dataverse_with_contacts() as populated:
        yield populated


def stop_messages(engine: Engine, cfg: LoadedConfig, numbers: range) -> None:
    changes = [p.message(f"4915100{n:06d}", STOP_AT, "STOP") for n in numbers]
    ingest_payload(engine, p.payload(*changes), keyword_rules(cfg.settings), "test", lambda: NOW)


def run(
    cfg: LoadedConfig, engine: Engine, waits: list[float] | None = None, **kwargs: Any
) -> tuple[Any, DynamicsConnector]:
    connector = DynamicsConnector.from_config(
        cfg, policy=RetryPolicy(sleep=(waits if waits is not None else []).append)
    )
    try:
        return run_once(cfg, engine=engine, clock=clock, connector=connector, **kwargs), connector
    finally:
        connector.close()


def test_full_run_of_twelve_thousand_contacts_with_three_hundred_stops(
    fake: FakeDataverse, engine: Engine, store_url: str
) -> None:
    """12,000 contacts and 300 STOPs: 3 query pages, 1 $batch, 300 revocations written."""
    cfg = config_for(store_url)
    stop_messages(engine, cfg, range(0, CONTACTS, CONTACTS // STOPS))
    report, _ = run(cfg, engine)
    assert report.status == "ok"
    assert report.records_read == CONTACTS
    assert (report.revocations, report.writes_sent, report.writes_failed) == (STOPS, STOPS, 0)
    assert fake.calls["query"] == 3 and fake.calls["batch"] == 1
    assert fake.batch_sizes == [STOPS]
    assert report.api_calls == METADATA_CALLS + 3 + 1 == fake.calls["api"]
    assert report.api_usage["query_pages"] == 3 and report.api_usage["batches"] == 1
    assert fake.calls["token"] == 1
    revoked = fake.records["00000000-0000-4000-8000-000000000040"]
    assert revoked["new_whatsappoptin"] is False
    assert revoked["new_whatsappoptoutdate"] == STOP_AT
    assert revoked["modifiedon"] == NOW
    assert set(fake.patched[0]) <= {
        "new_whatsappoptin",
        "new_whatsappoptoutdate",
        "new_whatsapplastinbound",
        "new_whatsappsessionexpires",
    }
    untouched = fake.records["00000000-0000-4000-8000-000000000041"]
    assert untouched["new_whatsappoptin"] is True and untouched["modifiedon"] < T0


def test_next_incremental_run_reads_one_page_and_writes_nothing(
    fake: FakeDataverse, engine: Engine, store_url: str
) -> None:
    """After write-back, the records we touched cost one page and zero writes, not a loop."""
    cfg = config_for(store_url)
    stop_messages(engine, cfg, range(0, CONTACTS, CONTACTS // STOPS))
    run(cfg, engine)
    calls_before = fake.calls.copy()
    report, _ = run(cfg, engine)
    assert report.mode == "incremental"
    assert (report.writes_sent, report.writes_failed) == (0, 0)
    assert fake.calls["query"] - calls_before["query"] == 1
    assert fake.calls["batch"] == calls_before["batch"]
    # the 300 written records (modifiedon = NOW) plus the two others inside the 2-minute
    # lookback of T0: edited at T0 - 1 min and at exactly T0 - 2 min (kept by `ge`)
    assert report.records_read == STOPS + 2
    assert report.api_calls == METADATA_CALLS + 1
    [*_, incremental] = fake.filters
    assert [(c.attribute, c.operator, c.value) for c in incremental] == [
        ("modifiedon", "ge", T0 - timedelta(seconds=120))
    ]


def test_run_survives_a_429_storm_and_a_token_expiry(
    fake: FakeDataverse, engine: Engine, store_url: str
) -> None:
    """Throttling waits its Retry-After and an expired token is renewed; the run completes."""
    cfg = config_for(store_url)
    stop_messages(engine, cfg, range(5))
    fake.throttle(12, 4)
    waits: list[float] = []
    connector = DynamicsConnector.from_config(cfg, policy=RetryPolicy(sleep=waits.append))
    connector.preflight()  # gets a token
    fake.expire_tokens()
    report = run_once(cfg, engine=engine, clock=clock, connector=connector)
    connector.close()
    assert waits == [12.0, 4.0]
    assert report.status == "ok" and report.writes_sent == 5
    assert fake.calls["token"] == 2
    assert report.api_usage["throttled"] == 2


def test_one_rejected_record_fails_alone_and_the_run_reports_it(
    fake: FakeDataverse, engine: Engine, store_url: str
) -> None:
    """A record a plugin refuses fails with its Dataverse code; the other revocations land."""
    cfg = config_for(store_url)
    stop_messages(engine, cfg, range(10))
    bad = "00000000-0000-4000-8000-000000000004"
    fake.rejects[bad] = (400, "0x80040265", "Plugin refused the update")
    report, _ = run(cfg, engine)
    assert report.status == "partial"
    assert (report.writes_sent, report.writes_failed) == (9, 1)
    [error] = report.write_errors
    assert (error["record_id"], error["code"]) == (bad, "0x80040265")
    assert fake.records[bad]["new_whatsappoptin"] is True
    assert fake.calls["batch"] == 1


def test_dry_run_reads_but_sends_no_batch(
    fake: FakeDataverse, engine: Engine, store_url: str
) -> None:
    """--dry-run decides the revocations and sends nothing to Dataverse."""
    cfg = config_for(store_url)
    stop_messages(engine, cfg, range(3))
    report, _ = run(cfg, engine, dry_run=True)
    assert report.revocations == 3 and report.writes_sent == 0
    assert fake.calls["batch"] == 0 and fake.calls["query"] == 3
    assert all(r["new_whatsappoptin"] is True for r in fake.records.values())


def test_change_tracking_delta_link_survives_between_processes(
    fake: FakeDataverse, engine: Engine, store_url: str
) -> None:
    """With change tracking on, the delta link is stored with the run, so the next `sync`
    (a new process, a new connector) follows it instead of filtering on modifiedon."""
    cfg = config_for(store_url)
    raw_dynamics = cfg.settings.dynamics.model_copy(update={"change_tracking": True})
    cfg = LoadedConfig(
        cfg.settings.model_copy(update={"dynamics": raw_dynamics}), cfg.secrets, None
    )
    run(cfg, engine)  # full, tracked: the run stores the delta link
    with engine.connect() as connection:
        from waconsent.store import runs as run_store

        stored = run_store.last_watermarks(connection, cfg.settings.crm_name).connector_state
    assert stored is not None and "$deltatoken=" in stored
    stop_messages(engine, cfg, range(5, 6))
    fake.touch("00000000-0000-4000-8000-000000000007", NOW)
    filters_before = len(fake.filters)
    report, connector = run(cfg, engine)  # a fresh connector, as in a new process
    assert report.mode == "incremental"
    assert any(url == stored for _, url in fake.requests)
    new_filters = [c.attribute for f in fake.filters[filters_before:] for c in f]
    assert "modifiedon" not in new_filters  # the delta link replaced the modifiedon filter
    assert report.revocations == 1
    assert connector.delta_link is not None and connector.delta_link != stored

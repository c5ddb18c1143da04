"""Whole sync runs (waconsent.sync.run.run_once) against the fake Salesforce org."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine

from tests import payloads as p
from tests.fakes.salesforce import INSTANCE, Clock, FakeSalesforce
from waconsent import config
from waconsent.config import LoadedConfig, Secrets
from waconsent.connectors.http import RetryPolicy
from waconsent.connectors.salesforce import SalesforceConnector
from waconsent.errors import ApiLimitExhausted
from waconsent.store import outbox as outbox_store
from waconsent.sync.ingest import ingest_payload, keyword_rules
from waconsent.sync.run import run_once

USER = "integration@acme.example"
SECRETS = {"SALESFORCE_PASSWORD": "pw", "SALESFORCE_SECURITY_TOKEN": "tok"}
CREATED = datetime(2026, 10, 1, 8, 0, tzinfo=UTC)  # contacts created a minute apart from here
OPTED_IN_AT = datetime(2026, 9, 1, 12, 0, tzinfo=UTC)
STOP_AT = datetime(2026, 11, 27, 18, 0, tzinfo=UTC)
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
CONTACTS, STOPS = 4500, 450


def loaded(store_url: str, **salesforce: Any) -> LoadedConfig:
    raw: dict[str, Any] = {
        "store": {"url": store_url},
        "crm": {"kind": "salesforce"},
        "salesforce": {
            "auth": "password",
            "username": USER,
            "instance_url": INSTANCE,
            **salesforce,
        },
        "mapping": {
            "object": "Contact",
            "phone_fields": ["MobilePhone", "Phone"],
            "fields": {
                "opt_in": "WhatsApp_Opt_In__c",
                "opt_in_date": "WhatsApp_Opt_In_Date__c",
                "opt_in_ip": "WhatsApp_Opt_In_IP__c",
                "opt_in_source": "WhatsApp_Opt_In_Source__c",
                "opt_out_date": "WhatsApp_Opt_Out_Date__c",
                "last_inbound": "WhatsApp_Last_Inbound__c",
                "session_expires": "WhatsApp_Session_Expires__c",
                "proof_missing": "WhatsApp_Consent_Proof_Missing__c",
            },
        },
    }
    return LoadedConfig(config.parse(raw), Secrets(SECRETS), None)


@pytest.fixture
def org_clock() -> Clock:
    return Clock(CREATED)


@pytest.fixture
def fake(org_clock: Clock) -> Iterator[FakeSalesforce]:
    org = FakeSalesforce(clock=org_clock)
    org.users[USER] = "pwtok"
    with org.active():
        yield org


def populate(fake: FakeSalesforce, clock: Clock) -> list[str]:
    """4,500 opted-in Contacts with complete proof, created a minute apart."""
    ids = []
    for n in range(CONTACTS):
        clock.now = CREATED + timedelta(minutes=n)
        ids.append(
            fake.add(
                "Contact",
                LastName=f"Person {n}",
                MobilePhone=f"+49151{n:07d}",
                WhatsApp_Opt_In__c=True,
                WhatsApp_Opt_In_Date__c=OPTED_IN_AT,
                WhatsApp_Opt_In_IP__c="203.0.113.7",
                WhatsApp_Opt_In_Source__c="web-form:newsletter",
            )
        )
    clock.now = NOW  # write-backs are stamped now, well after the last creation
    return ids


def deliver_stops(engine: Engine, cfg: LoadedConfig) -> None:
    """STOP from the numbers of every tenth contact: 450 revocations."""
    changes = [p.message(f"49151{n:07d}", STOP_AT, "STOP") for n in range(0, CONTACTS, 10)]
    ingest_payload(
        engine, p.payload(*changes, entries=3), keyword_rules(cfg.settings), "test", lambda: NOW
    )


def connector(cfg: LoadedConfig) -> SalesforceConnector:
    return SalesforceConnector.from_config(cfg, policy=RetryPolicy(sleep=lambda _s: None))


def revoked(fake: FakeSalesforce, ids: list[str]) -> list[int]:
    return [
        n for n, record_id in enumerate(ids) if fake.get(record_id)["WhatsApp_Opt_In__c"] is False
    ]


def test_full_then_incremental_run_counts_every_api_call(
    engine: Engine, store_url: str, fake: FakeSalesforce, org_clock: Clock
) -> None:
    """4,500 Contacts, 450 STOPs: 3 query pages + 3 Collections calls; the next run reads one
    page (its own write-back) and writes nothing."""
    cfg = loaded(store_url)
    ids = populate(fake, org_clock)
    deliver_stops(engine, cfg)

    sf = connector(cfg)
    report = run_once(cfg, connector=sf, engine=engine, clock=lambda: NOW)
    assert (report.records_read, report.revocations) == (CONTACTS, STOPS)
    assert (report.writes_sent, report.writes_failed) == (STOPS, 0)
    assert (fake.query_calls, fake.collection_calls) == (3, 3)
    assert fake.collection_sizes == [200, 200, 50]
    assert report.api_calls == 1 + 3 + 3  # describe, pages, collections
    assert revoked(fake, ids) == list(range(0, CONTACTS, 10))
    first = fake.get(ids[0])
    assert first["WhatsApp_Opt_Out_Date__c"] == STOP_AT
    assert first["WhatsApp_Last_Inbound__c"] == STOP_AT
    assert first["WhatsApp_Session_Expires__c"] == STOP_AT + timedelta(hours=24)
    assert first["WhatsApp_Opt_In_IP__c"] == "203.0.113.7"  # proof kept, untouched
    assert fake.get(ids[1])["SystemModstamp"] == CREATED + timedelta(minutes=1)
    sf.close()

    calls_before = len(fake.calls)
    second = run_once(cfg, connector=connector(cfg), engine=engine, clock=lambda: NOW)
    new_calls = fake.calls[calls_before:]
    assert [m for m, path in new_calls if "/query" in path] == ["GET"]  # one page
    assert (second.writes_sent, second.revocations, second.api_calls) == (0, 0, 2)
    assert fake.collection_calls == 3
    assert second.records_read < 2_000


def test_daily_limit_mid_run_then_the_next_run_finishes_and_loses_nothing(
    engine: Engine, store_url: str, fake: FakeSalesforce, org_clock: Clock
) -> None:
    """The allowance runs out after the first Collections call: the run stops with
    ApiLimitExhausted and the rest stays queued; the next day's run sends it all."""
    cfg = loaded(store_url)
    ids = populate(fake, org_clock)
    deliver_stops(engine, cfg)
    fake.daily_limit = fake.api_used + 1 + 3 + 1  # describe, 3 pages, 1 Collections call

    with pytest.raises(ApiLimitExhausted, match="REQUEST_LIMIT_EXCEEDED"):
        run_once(cfg, connector=connector(cfg), engine=engine, clock=lambda: NOW)
    assert len(revoked(fake, ids)) == 200
    with engine.connect() as connection:
        assert outbox_store.count(connection, cfg.settings.crm_name) == STOPS - 200

    fake.daily_limit = 100_000  # a new day
    fake.api_used = 0
    report = run_once(cfg, connector=connector(cfg), engine=engine, clock=lambda: NOW)
    assert report.writes_sent == STOPS - 200 and report.writes_failed == 0
    assert revoked(fake, ids) == list(range(0, CONTACTS, 10))
    with engine.connect() as connection:
        assert outbox_store.count(connection, cfg.settings.crm_name) == 0
    assert fake.collection_sizes[-2:] == [200, 50]  # the queued 250, revocations first

    quiet = run_once(cfg, connector=connector(cfg), engine=engine, clock=lambda: NOW)
    assert quiet.writes_sent == 0 and quiet.revocations == 0


def test_large_backlog_goes_through_one_bulk_job(
    engine: Engine, store_url: str, fake: FakeSalesforce, org_clock: Clock
) -> None:
    """At or above bulk_write_threshold the run hands the backlog to a Bulk API 2.0 job."""
    cfg = loaded(store_url, bulk_write_threshold=400)
    ids = populate(fake, org_clock)
    deliver_stops(engine, cfg)
    report = run_once(cfg, connector=connector(cfg), engine=engine, clock=lambda: NOW)
    assert (report.writes_sent, report.writes_failed) == (STOPS, 0)
    assert fake.collection_calls == 0
    assert fake.count("POST", "/jobs/ingest") == 1
    assert revoked(fake, ids) == list(range(0, CONTACTS, 10))
    with engine.connect() as connection:
        assert outbox_store.count(connection, cfg.settings.crm_name) == 0

"""A revocation for a number no sync has indexed yet: the targeted run finds the contact in
the CRM by its digits, confirms it by the parsed number, and writes the revocation."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
import responses
from sqlalchemy import Engine

from tests import payloads as p
from tests import test_dynamics_sync as dyn
from tests import test_salesforce_sync as sfs
from tests.fakes.dynamics import FakeDataverse
from tests.fakes.salesforce import Clock, FakeSalesforce
from tests.test_run import NOW, T0, clock, contact, deliver, loaded, opted_in
from waconsent.phones import like_pattern, search_digits
from waconsent.store import phone_index
from waconsent.store.contacts import upsert_contacts
from waconsent.sync.ingest import ingest_payload, keyword_rules
from waconsent.sync.run import run_once

STOP_NUMBER = "4915123456789"
KEY = f"+{STOP_NUMBER}"


def test_search_digits_match_every_spelling_of_the_number() -> None:
    """The searched digits stand in order in every accepted spelling, BR and MX included."""
    import re

    def found(key: str, stored: str) -> bool:
        digits = search_digits(key)
        assert digits is not None
        regex = like_pattern(digits).replace("%", ".*")
        return re.fullmatch(regex, stored) is not None

    for stored in (
        "0151 23456789",
        "+49 (0)151-234 567 89",
        "0049 151 2345 6789",
        "+4915123456789 ext. 12",
    ):
        assert found(KEY, stored), stored
    assert found("+5511987654321", "+55 11 8765-4321")  # Brazil without the ninth digit
    assert found("+525512345678", "+52 1 55 1234 5678")  # Mexico with the old "1"
    assert search_digits("uid:US.1") is None


def test_ledger_contact_created_after_the_last_sync(engine: Engine, store_url: str) -> None:
    """A targeted run revokes a contact created since the last sync, confirmed by number;
    a near miss that the digit search also finds is left alone; the new contact is indexed."""
    cfg = loaded(store_url)
    upsert_contacts(engine, [opted_in("OLD", "0170 1112233")], NOW)
    run_once(cfg, engine=engine, clock=clock)
    upsert_contacts(
        engine,
        [opted_in("NEW", "+49 (0)151-234 567 89"), opted_in("NEAR", "0151 2345 6789 0")],
        NOW,
    )  # digits in order
    deliver(engine, cfg, p.message(STOP_NUMBER, T0, "STOP"))
    report = run_once(cfg, engine=engine, clock=clock, only_keys={KEY})
    assert (report.mode, report.found_by_search, report.revocations) == ("targeted", 1, 1)
    assert contact(engine, "NEW").opt_in is False
    assert contact(engine, "NEAR").opt_in is True and contact(engine, "OLD").opt_in is True
    with engine.connect() as connection:
        assert phone_index.record_ids_for_keys(connection, "ledger", [KEY]) == {"NEW"}


def test_indexed_number_needs_no_search(engine: Engine, store_url: str) -> None:
    """A number the phone index knows is not searched for: one read, no search call."""
    cfg = loaded(store_url)
    upsert_contacts(engine, [opted_in("A", "0151 23456789")], NOW)
    run_once(cfg, engine=engine, clock=clock)
    deliver(engine, cfg, p.message(STOP_NUMBER, T0, "STOP"))
    report = run_once(cfg, engine=engine, clock=clock, only_keys={KEY})
    assert (report.found_by_search, report.revocations, report.api_calls) == (0, 1, 2)


@pytest.fixture
def org() -> Iterator[tuple[FakeSalesforce, Clock]]:
    org_clock = Clock(NOW - timedelta(days=1))
    fake = FakeSalesforce(clock=org_clock)
    fake.users[sfs.USER] = "pwtok"
    with fake.active():
        yield fake, org_clock


def test_salesforce_contact_created_after_the_last_sync(
    engine: Engine, store_url: str, org: tuple[FakeSalesforce, Clock]
) -> None:
    """Salesforce: one SOQL search (LIKE on every phone field) finds the new Contact; the
    revocation costs describe + search + one Collections call."""
    fake, org_clock = org
    cfg = sfs.loaded(store_url)
    fake.add(
        "Contact",
        LastName="Known",
        MobilePhone="+49 170 1112233",
        WhatsApp_Opt_In__c=True,
        WhatsApp_Opt_In_Date__c=sfs.OPTED_IN_AT,
    )
    run_once(cfg, connector=sfs.connector(cfg), engine=engine, clock=lambda: NOW)
    org_clock.now = NOW
    new = fake.add(
        "Contact",
        LastName="New",
        Phone="0151 2345-6789",
        WhatsApp_Opt_In__c=True,
        WhatsApp_Opt_In_Date__c=sfs.OPTED_IN_AT,
    )
    near = fake.add(
        "Contact",
        LastName="Near",
        MobilePhone="+49 151 2345 6789 9",
        WhatsApp_Opt_In__c=True,
        WhatsApp_Opt_In_Date__c=sfs.OPTED_IN_AT,
    )
    ingest_payload(
        engine,
        p.payload(p.message(STOP_NUMBER, T0, "STOP")),
        keyword_rules(cfg.settings),
        "test",
        lambda: NOW,
    )
    calls_before = len(fake.calls)
    report = run_once(
        cfg, connector=sfs.connector(cfg), engine=engine, clock=lambda: NOW, only_keys={KEY}
    )
    assert report.found_by_search == 1 and report.writes_sent == 1
    assert fake.get(new)["WhatsApp_Opt_In__c"] is False
    assert fake.get(near)["WhatsApp_Opt_In__c"] is True
    search = fake.queries[-1]
    assert {(leaf[0], leaf[1], leaf[2].value) for leaf in search.conditions} == {
        ("like", "MobilePhone", "%2%3%4%5%6%7%8%9%"),
        ("like", "Phone", "%2%3%4%5%6%7%8%9%"),
    }
    assert len(fake.calls) - calls_before == report.api_calls == 3


@pytest.fixture
def dataverse() -> Iterator[FakeDataverse]:
    # Not strict: the fake registers every route of the service and a test uses a few.
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield FakeDataverse(clock=dyn.clock).install(mock)


def test_dataverse_contact_created_after_the_last_sync(
    engine: Engine, store_url: str, dataverse: FakeDataverse
) -> None:
    """Dataverse: one query with `contains` (wildcards between the digits) finds the new
    contact; the revocation goes out in one $batch."""
    cfg = dyn.config_for(store_url)
    dataverse.add_contact(
        record_id="00000000-0000-4000-8000-000000000001",
        modified=T0,
        mobilephone="+49 170 1112233",
        new_whatsappoptin=True,
        new_whatsappoptindate=T0 - timedelta(days=30),
    )
    dyn.run(cfg, engine)
    new_id = "00000000-0000-4000-8000-000000000002"
    dataverse.add_contact(
        record_id=new_id,
        modified=NOW,
        telephone1="0151 / 2345 6789",
        new_whatsappoptin=True,
        new_whatsappoptindate=T0 - timedelta(days=30),
    )
    ingest_payload(
        engine,
        p.payload(p.message(STOP_NUMBER, T0, "STOP")),
        keyword_rules(cfg.settings),
        "test",
        lambda: NOW,
    )
    queries_before = dataverse.calls["query"]
    report, _ = dyn.run(cfg, engine, only_keys={KEY})
    assert report.found_by_search == 1 and report.writes_sent == 1
    assert dataverse.records[new_id]["new_whatsappoptin"] is False
    assert dataverse.calls["query"] - queries_before == 1
    [*_, search] = dataverse.filters
    assert ("telephone1", "contains", "2%3%4%5%6%7%8%9") in [
        (c.attribute, c.operator, c.value) for c in search
    ]

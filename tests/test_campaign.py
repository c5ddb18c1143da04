"""After a campaign: the statuses of the business's own messages cost no API call and no
row; only what can change a field makes a record need a look."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from tests import payloads as p
from tests import test_dynamics_sync as dyn
from tests import test_salesforce_sync as sfs
from tests.fakes.dynamics import FakeDataverse
from tests.fakes.salesforce import Clock, FakeSalesforce
from waconsent.config import LoadedConfig
from waconsent.store.tables import events, identity_links
from waconsent.sync.ingest import ingest_payload, keyword_rules
from waconsent.sync.run import run_once

STATES = ("sent", "delivered", "read")
DELIVERY = 1_000  # updates per POST, as Meta batches them


def campaign(
    engine: Engine, cfg: LoadedConfig, numbers: list[str], statuses: int, stops: list[str]
) -> None:
    """`statuses` plain statuses spread over the numbers (sent, delivered, read each), in
    deliveries of 1,000, and a STOP from each of `stops`, as the webhook would bring them."""
    rules = keyword_rules(cfg.settings)
    changes: list[dict[str, Any]] = []
    for n in range(statuses):
        number = numbers[(n // 3) % len(numbers)]
        changes.append(
            p.status(
                number,
                sfs.STOP_AT - timedelta(hours=1),
                STATES[n % 3],
                message_id=f"wamid.CAMPAIGN{n // 3}",
            )
        )
    changes += [p.message(number, sfs.STOP_AT, "STOP") for number in stops]
    for start in range(0, len(changes), DELIVERY):
        ingest_payload(
            engine, p.payload(*changes[start : start + DELIVERY]), rules, "webhook", lambda: sfs.NOW
        )


def stored_statuses(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                select(func.count()).select_from(events).where(events.c.kind == "status")
            ).scalar_one()
        )


@pytest.fixture
def org() -> Iterator[tuple[FakeSalesforce, Clock]]:
    org_clock = Clock(sfs.CREATED)
    fake = FakeSalesforce(clock=org_clock)
    fake.users[sfs.USER] = "pwtok"
    with fake.active():
        yield fake, org_clock


@pytest.mark.parametrize("statuses", [12_000, 120_000])
def test_salesforce_incremental_after_a_campaign_costs_the_floor(
    engine: Engine, store_url: str, org: tuple[FakeSalesforce, Clock], statuses: int
) -> None:
    """12,000 Contacts, a campaign's statuses, 10 STOPs: the incremental run costs 1
    describe + 1 page of changed records + 1 read by id + 1 Collections write, whatever N."""
    fake, org_clock = org
    cfg = sfs.loaded(store_url)
    ids = []
    for n in range(12_000):
        org_clock.now = sfs.CREATED + timedelta(minutes=n)
        ids.append(
            fake.add(
                "Contact",
                LastName=f"P{n}",
                MobilePhone=f"+49151{n:07d}",
                WhatsApp_Opt_In__c=True,
                WhatsApp_Opt_In_Date__c=sfs.OPTED_IN_AT,
                WhatsApp_Opt_In_IP__c="203.0.113.7",
                WhatsApp_Opt_In_Source__c="web-form:newsletter",
            )
        )
    org_clock.now = sfs.NOW
    run_once(cfg, connector=sfs.connector(cfg), engine=engine, clock=lambda: sfs.NOW)
    numbers = [f"49151{n:07d}" for n in range(12_000)]
    campaign(engine, cfg, numbers, statuses, stops=numbers[:10])
    calls_before = len(fake.calls)
    report = run_once(cfg, connector=sfs.connector(cfg), engine=engine, clock=lambda: sfs.NOW)
    assert report.read_plan == "changed+ids" and report.revocations == 10
    assert len(fake.calls) - calls_before == report.api_calls == 4
    assert [fake.get(i)["WhatsApp_Opt_In__c"] for i in ids[:11]] == [False] * 10 + [True]
    assert stored_statuses(engine) == 0  # the campaign added no event rows


@pytest.fixture
def dataverse() -> Iterator[FakeDataverse]:
    with dyn.dataverse_with_contacts() as populated:
        yield populated


@pytest.mark.parametrize("statuses", [12_000, 120_000])
def test_dataverse_incremental_after_a_campaign_costs_the_floor(
    engine: Engine, store_url: str, dataverse: FakeDataverse, statuses: int
) -> None:
    """Dataverse, 12,000 contacts: after the campaign, 3 metadata calls + 1 changed page +
    1 read by id + 1 $batch, whatever N."""
    cfg = dyn.config_for(store_url)
    dyn.run(cfg, engine)
    numbers = [f"4915100{n:06d}" for n in range(dyn.CONTACTS)]
    campaign(engine, cfg, numbers, statuses, stops=numbers[:10])
    calls_before = dataverse.calls["api"]
    report, _ = dyn.run(cfg, engine)
    assert report.read_plan == "changed+ids" and report.revocations == 10
    assert dataverse.calls["api"] - calls_before == report.api_calls == dyn.METADATA_CALLS + 3
    assert stored_statuses(engine) == 0


def test_statuses_that_matter_are_stored_and_plain_ones_acknowledged(
    engine: Engine, store_url: str
) -> None:
    """A failed status keeps its codes, a free-entry-point status its window; sent,
    delivered and read are acknowledged without a row, their number-and-user-id pair kept
    as a link."""
    cfg = sfs.loaded(store_url)
    window = {
        "conversation": {
            "id": "c",
            "origin": {"type": "referral_conversion"},
            "expiration_timestamp": p.unix(sfs.STOP_AT + timedelta(hours=72)),
        }
    }
    report = ingest_payload(
        engine,
        p.payload(
            p.status("4915100000001", sfs.STOP_AT, "sent", recipient_user_id="DE.1"),
            p.status("4915100000001", sfs.STOP_AT, "delivered"),
            p.status("4915100000002", sfs.STOP_AT, "failed", codes=(131050,)),
            p.status("4915100000003", sfs.STOP_AT, "failed", codes=(131047, 131026)),
            p.status("4915100000004", sfs.STOP_AT, "sent", **window),
        ),
        keyword_rules(cfg.settings),
        "webhook",
        lambda: sfs.NOW,
    )
    assert (report.stored, report.acknowledged) == (3, 2)
    with engine.connect() as connection:
        codes = {
            wa_id: error_codes
            for wa_id, error_codes in connection.execute(
                select(events.c.wa_id, events.c.error_codes)
            )
        }
        links = set(connection.execute(select(identity_links.c.key, identity_links.c.linked_key)))
    assert codes == {
        "4915100000002": "131050",
        "4915100000003": "131047,131026",
        "4915100000004": None,
    }
    assert links == {("+4915100000001", "uid:DE.1"), ("uid:DE.1", "+4915100000001")}


def test_a_stop_among_999_statuses_is_stored_before_the_200(engine: Engine, store_url: str) -> None:
    """Meta's status storm: one delivery of 999 plain statuses and a STOP; the answer is
    200 only once the STOP is committed, and the statuses add no row."""
    from tests.test_web import PATH, TestClient, body_of, make_config, signed_headers
    from waconsent.web import create_app

    statuses = [
        p.status(f"49151{n:07d}", sfs.STOP_AT, STATES[n % 3])["value"]["statuses"][0]
        for n in range(999)
    ]
    storm = p.payload(p.message("4915100000042", sfs.STOP_AT, "STOP"))
    storm["entry"][0]["changes"][0]["value"]["statuses"] = statuses
    body = body_of(storm)
    with TestClient(create_app(make_config(store_url), engine)) as client:
        answer = client.post(PATH, content=body, headers=signed_headers(body))
        assert answer.status_code == 200 and answer.json()["stored"] == 1
        with engine.connect() as connection:  # already committed when the 200 came
            kinds = [kind for (kind,) in connection.execute(select(events.c.kind))]
    assert kinds == ["message"]

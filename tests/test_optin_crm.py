"""The website opt-in (issue 15) reaching the CRMs: the form's request and the signed
`START <token>` through the real receiver, then a sync against the Salesforce and the
Dataverse fakes writes opt-in, the message's time, the form's IP and the source."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import responses
from sqlalchemy import Engine

from tests import payloads as p
from tests.fakes.dynamics import FakeDataverse
from tests.fakes.salesforce import Clock, FakeSalesforce
from tests.test_dynamics_sync import config_for
from tests.test_optin import BUSINESS, NUMBER
from tests.test_salesforce_sync import USER
from tests.test_salesforce_sync import connector as salesforce_connector
from tests.test_salesforce_sync import loaded as salesforce_config
from tests.test_web import APP_SECRET, SECRETS, running
from waconsent.config import LoadedConfig, Secrets
from waconsent.config.optin import OptinConfig
from waconsent.connectors.dynamics import DynamicsConnector
from waconsent.connectors.http import RetryPolicy
from waconsent.connectors.webhook_signature import SIGNATURE_HEADER, sign
from waconsent.sync.run import run_once
from waconsent.web import create_app

WEBHOOK = "/webhooks/whatsapp"
FORM_IP = "198.51.100.7"


def with_optin(cfg: LoadedConfig) -> LoadedConfig:
    settings = cfg.settings.model_copy(
        update={
            "optin": OptinConfig(enabled=True, business_number=BUSINESS, form_id="newsletter"),
            "webhook": cfg.settings.webhook.model_copy(update={"path": WEBHOOK}),
        }
    )
    return LoadedConfig(settings, Secrets({**cfg.secrets.values, **SECRETS}), None)


@contextmanager
def confirmed_through_the_receiver(cfg: LoadedConfig, engine: Engine) -> Iterator[datetime]:
    """A form request from behind the (loopback) proxy, then the person's signed message;
    yields the message's time."""
    with running(create_app(cfg, engine), cfg) as port:
        url = f"http://127.0.0.1:{port}"
        made = httpx.post(
            url + "/optin",
            json={"page": "https://acme.example/news"},
            headers={"X-Forwarded-For": FORM_IP},
        )
        assert made.status_code == 201
        sent_at = (datetime.now(UTC) + timedelta(seconds=2)).replace(microsecond=0)
        body = json.dumps(
            p.payload(
                p.message(NUMBER, sent_at, f"START {made.json()['token']}", message_id="wamid.WEB1")
            )
        ).encode()
        delivered = httpx.post(
            url + WEBHOOK,
            content=body,
            headers={SIGNATURE_HEADER: sign(body, APP_SECRET), "Content-Type": "application/json"},
        )
        assert delivered.status_code == 200
        yield sent_at


def assert_source(source: Any) -> None:
    assert isinstance(source, str) and source.startswith("website:form:newsletter:token:")
    assert source.endswith(":wamid.WEB1")


def test_salesforce_record_gets_date_ip_and_source(engine: Engine, store_url: str) -> None:
    """Salesforce: the contact with the number is opted in with the form's IP; the proof
    flag is clear; one Collections call."""
    cfg = with_optin(salesforce_config(store_url))
    org = FakeSalesforce(clock=Clock(datetime.now(UTC) - timedelta(days=1)))
    org.users[USER] = "pwtok"
    with org.active():
        record_id = org.add(
            "Contact", LastName="Web", MobilePhone="+49 151 23456789", WhatsApp_Opt_In__c=False
        )
        with confirmed_through_the_receiver(cfg, engine) as sent_at:
            org.clock.now = sent_at + timedelta(minutes=1)  # type: ignore[attr-defined]
            report = run_once(
                cfg,
                connector=salesforce_connector(cfg),
                engine=engine,
                clock=lambda: sent_at + timedelta(minutes=1),
            )
        record = org.get(record_id)
    assert report.writes_sent == 1 and org.collection_calls == 1
    assert record["WhatsApp_Opt_In__c"] is True
    assert record["WhatsApp_Opt_In_Date__c"] == sent_at
    assert record["WhatsApp_Opt_In_IP__c"] == FORM_IP
    assert_source(record["WhatsApp_Opt_In_Source__c"])
    assert record["WhatsApp_Consent_Proof_Missing__c"] is False


def test_dataverse_record_gets_date_ip_and_source(engine: Engine, store_url: str) -> None:
    """Dataverse: the contact with the number is opted in with the form's IP, in one $batch."""
    cfg = with_optin(config_for(store_url))
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        fake = FakeDataverse().install(mock)
        record_id = fake.add_contact(
            mobilephone="+4915123456789",
            fullname="Web",
            new_whatsappoptin=False,
            modified=datetime.now(UTC) - timedelta(days=1),
        )
        with confirmed_through_the_receiver(cfg, engine) as sent_at:
            fake.clock = lambda: sent_at + timedelta(minutes=1)
            connector = DynamicsConnector.from_config(
                cfg, policy=RetryPolicy(sleep=lambda _s: None)
            )
            try:
                report = run_once(
                    cfg,
                    connector=connector,
                    engine=engine,
                    clock=lambda: sent_at + timedelta(minutes=1),
                )
            finally:
                connector.close()
        record = fake.records[record_id]
    assert report.writes_sent == 1 and fake.calls["batch"] == 1
    assert record["new_whatsappoptin"] is True
    assert record["new_whatsappoptindate"] == sent_at
    assert record["new_whatsappoptinip"] == FORM_IP
    assert_source(record["new_whatsappoptinsource"])

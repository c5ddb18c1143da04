"""Helpers shared by the reply channel's tests: a configuration with replies on, a
delivery through the one ingest path, a sending pass against the Cloud API fake."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import responses
from sqlalchemy import Engine, select

from tests import payloads as p
from tests.fakes.meta_messages import GRAPH, PHONE_NUMBER_ID, TOKEN, VERSION, FakeCloudApi
from waconsent import config
from waconsent.config import LoadedConfig, Secrets
from waconsent.connectors.http import RetryPolicy
from waconsent.connectors.whatsapp_send import CloudApiSender
from waconsent.replies.policy import reply_policy
from waconsent.replies.sending import PassSummary, send_due
from waconsent.store.tables import replies
from waconsent.sync.ingest import IngestReport, ingest_payload, keyword_rules

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
USER = "4915123456789"
BUSINESS = "Kaffeehaus Nord"


def settings_raw(url: str, **replies_keys: Any) -> dict[str, Any]:
    return {
        "store": {"url": url},
        "crm": {"kind": "ledger"},
        "whatsapp": {
            "opt_in_keywords": ["START", "ANMELDEN"],
            "opt_out_keywords": ["STOP", "STOPP"],
            "stop_button_labels": ["Stop promotions", "Werbung stoppen"],
            "phone_number_id": PHONE_NUMBER_ID,
            "graph_url": GRAPH,
            "graph_api_version": VERSION,
            "business_name": BUSINESS,
        },
        "replies": {"enabled": True, **replies_keys},
    }


def replies_config(url: str, token: str | None = TOKEN, **replies_keys: Any) -> LoadedConfig:
    secrets = Secrets({"WHATSAPP_ACCESS_TOKEN": token} if token else {})
    return LoadedConfig(config.parse(settings_raw(url, **replies_keys)), secrets, None)


def deliver(
    engine: Engine,
    cfg: LoadedConfig,
    *changes: dict[str, Any],
    now: datetime = NOW,
    body: dict[str, Any] | None = None,
) -> IngestReport:
    """One delivery through the path the receiver and `import` share."""
    return ingest_payload(
        engine,
        body or p.payload(*changes),
        keyword_rules(cfg.settings),
        "webhook",
        lambda: now,
        replies=reply_policy(cfg.settings),
    )


def sender(waits: list[float] | None = None, token: str = TOKEN) -> CloudApiSender:
    """The real sender, its policy's sleep recorded instead of slept."""
    recorded = waits if waits is not None else []
    policy = RetryPolicy(
        attempts=4,
        base_delay=1.0,
        max_delay=15.0,
        max_retry_after=60.0,
        max_total_delay=60.0,
        sleep=recorded.append,
        jitter=lambda low, high: high,
    )
    return CloudApiSender(
        graph_url=GRAPH,
        api_version=VERSION,
        phone_number_id=PHONE_NUMBER_ID,
        access_token=token,
        policy=policy,
    )


@contextmanager
def meta(strict: bool = True) -> Iterator[FakeCloudApi]:
    """The Cloud API fake on `responses`; strict: its route must be called."""
    fake = FakeCloudApi()
    with responses.RequestsMock(assert_all_requests_are_fired=strict) as mock:
        fake.register(mock)
        yield fake


def send_pass(
    engine: Engine,
    fake_sender: CloudApiSender | None = None,
    now: datetime = NOW,
    holder: str = "test-node",
) -> PassSummary:
    return send_due(engine, fake_sender or sender(), holder, lambda: now)


def rows(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return list(connection.execute(select(replies).order_by(replies.c.id)))

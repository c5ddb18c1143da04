"""`GET /metrics`: the Prometheus text of the receiver and of `serve`, scraped through the real
app and parsed with prometheus-client's own parser."""

from __future__ import annotations

import json
import signal
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, create_engine

with warnings.catch_warnings():
    from starlette.exceptions import StarletteDeprecationWarning

    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

from tests import payloads as p
from tests.serving import free_port, ledger_serve_config, start_serve
from tests.test_run import NOW, T0, clock, contact, opted_in
from waconsent.config.loading import LoadedConfig, Secrets, parse
from waconsent.connectors.ledger import LedgerCrm
from waconsent.connectors.webhook_signature import SIGNATURE_HEADER, sign
from waconsent.domain import WriteResult
from waconsent.errors import RunLockHeld
from waconsent.metrics import Metrics
from waconsent.replies.sending import PassSummary
from waconsent.store.contacts import upsert_contacts
from waconsent.store.engine import open_engine
from waconsent.sync.run import run_once
from waconsent.web import create_app

SECRET = "metrics-app-secret"
PATH = "/webhooks/whatsapp"
ROOT = Path(__file__).resolve().parents[1]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def config(url: str) -> LoadedConfig:
    raw = {
        "store": {"url": url},
        "crm": {"kind": "ledger"},
        "webhook": {"path": PATH},
        "whatsapp": {"opt_out_keywords": ["STOP"], "opt_in_keywords": ["START"]},
    }
    return LoadedConfig(
        parse(raw), Secrets({"WHATSAPP_APP_SECRET": SECRET, "WHATSAPP_VERIFY_TOKEN": "vt"}), None
    )


def samples(text: str) -> Samples:
    """Every sample of a scrape by (name, sorted labels); the parser refuses malformed text."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(scraped: Samples, name: str, **labels: str) -> float | None:
    return scraped.get((name, tuple(sorted(labels.items()))))


def scrape(client: TestClient) -> Samples:
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    return samples(answer.text)


def post(client: TestClient, document: Any, secret: str = SECRET) -> int:
    body = json.dumps(document).encode()
    return client.post(
        PATH,
        content=body,
        headers={SIGNATURE_HEADER: sign(body, secret), "Content-Type": "application/json"},
    ).status_code


@pytest.fixture
def store(sqlite_url: str) -> Iterator[tuple[LoadedConfig, Engine]]:
    engine = open_engine(sqlite_url)
    yield config(sqlite_url), engine
    engine.dispose()


def test_deliveries_items_and_signals_are_counted_once_per_new_item(
    store: tuple[LoadedConfig, Engine],
) -> None:
    """A signed delivery counts as stored with its items by kind and its consent signals;
    the same delivery again counts as a duplicate and adds no item or signal; plain statuses
    count as acknowledged; every refusal counts under its own outcome."""
    cfg, engine = store
    app = create_app(cfg, engine)
    delivery = p.payload(
        p.message("4915123456789", T0, "STOP"),
        p.message("4915123456788", T0, "hello"),
        p.preference("4915123456787", T0, "stop"),
    )
    statuses = p.payload(
        p.status("4915123456789", T0, "delivered"), p.status("4915123456789", T0, "read")
    )
    with TestClient(app) as client:
        before = scrape(client)
        assert value(before, "waconsent_webhook_deliveries_total", outcome="stored") == 0
        assert post(client, delivery) == 200
        assert post(client, delivery) == 200
        assert post(client, statuses) == 200
        assert post(client, delivery, secret="forged") == 403
        assert client.post(PATH, content=b"{}").status_code == 401
        not_json = b"not json"
        assert (
            client.post(
                PATH, content=not_json, headers={SIGNATURE_HEADER: sign(not_json, SECRET)}
            ).status_code
            == 400
        )
        scraped = scrape(client)
    deliveries = {
        outcome: value(scraped, "waconsent_webhook_deliveries_total", outcome=outcome)
        for outcome in (
            "stored",
            "duplicate",
            "acknowledged",
            "refused_signature",
            "refused_unsigned",
            "bad_json",
            "too_large",
            "failed",
        )
    }
    assert deliveries == {
        "stored": 1,
        "duplicate": 1,
        "acknowledged": 1,
        "refused_signature": 1,
        "refused_unsigned": 1,
        "bad_json": 1,
        "too_large": 0,
        "failed": 0,
    }
    assert value(scraped, "waconsent_webhook_items_total", kind="message") == 2
    assert value(scraped, "waconsent_webhook_items_total", kind="preference") == 1
    assert value(scraped, "waconsent_webhook_items_total", kind="plain_status") == 2
    assert value(scraped, "waconsent_consent_signals_total", signal="opt_out") == 2
    assert value(scraped, "waconsent_consent_signals_total", signal="opt_in") == 0
    assert value(scraped, "waconsent_webhook_store_seconds_count") == 3
    assert value(scraped, "waconsent_store_up") == 1


def test_oversized_delivery_counts_as_too_large(sqlite_url: str) -> None:
    """A body over the limit is refused (413) and counted as too_large."""
    raw = {"store": {"url": sqlite_url}, "webhook": {"path": PATH, "max_body_bytes": 1024}}
    cfg = LoadedConfig(
        parse(raw), Secrets({"WHATSAPP_APP_SECRET": SECRET, "WHATSAPP_VERIFY_TOKEN": "vt"}), None
    )
    engine = open_engine(sqlite_url)
    try:
        with TestClient(create_app(cfg, engine)) as client:
            body = b"x" * 2048
            assert (
                client.post(
                    PATH, content=body, headers={SIGNATURE_HEADER: sign(body, SECRET)}
                ).status_code
                == 413
            )
            assert (
                value(scrape(client), "waconsent_webhook_deliveries_total", outcome="too_large")
                == 1
            )
    finally:
        engine.dispose()


def test_each_app_counts_into_its_own_registry(store: tuple[LoadedConfig, Engine]) -> None:
    """Two apps in one process do not share counters (no global registry)."""
    cfg, engine = store
    first, second = create_app(cfg, engine), create_app(cfg, engine)
    with TestClient(first) as one, TestClient(second) as two:
        assert post(one, p.payload(p.message("4915123456789", T0, "STOP"))) == 200
        assert value(scrape(one), "waconsent_webhook_deliveries_total", outcome="stored") == 1
        assert value(scrape(two), "waconsent_webhook_deliveries_total", outcome="stored") == 0


def test_sync_runs_outbox_and_last_success_after_a_run(engine: Engine, store_url: str) -> None:
    """After a partial run: the run counted by mode and outcome with its duration, the failed
    writes as pending outbox rows with the oldest one's age, and the run's finish time as the
    CRM's last success; the next run empties the outbox and moves the time (both stores)."""
    cfg = config(store_url)
    upsert_contacts(engine, [opted_in("A", "0151 23456789"), opted_in("B", "0170 1112233")], NOW)
    app_metrics_now = [NOW + timedelta(hours=2)]
    metrics = Metrics(engine, cfg.settings.crm_name, clock=lambda: app_metrics_now[0])
    app = create_app(cfg, engine, metrics=metrics)
    with TestClient(app) as client:
        assert (
            post(
                client,
                p.payload(
                    p.message("4915123456789", T0, "STOP"), p.message("491701112233", T0, "STOP")
                ),
            )
            == 200
        )

        class Refusing(LedgerCrm):
            refuse: ClassVar[bool] = True

            def write(self, writes: Any) -> list[WriteResult]:
                if self.refuse:
                    return [
                        WriteResult(w.record_id, False, "UNABLE_TO_LOCK_ROW", "LOCK")
                        for w in writes
                    ]
                return super().write(writes)

        first = metrics.timed_run(
            "incremental",
            lambda: run_once(cfg, engine=engine, clock=clock, connector=Refusing(engine)),
        )
        assert first.status == "partial" and first.mode == "full"
        scraped = scrape(client)
        assert value(scraped, "waconsent_sync_runs_total", mode="full", outcome="partial") == 1
        assert value(scraped, "waconsent_sync_run_duration_seconds_count", mode="full") == 1
        assert value(scraped, "waconsent_outbox_rows", crm="ledger", state="pending") == 2
        assert value(scraped, "waconsent_outbox_rows", crm="ledger", state="permanent") == 0
        assert value(scraped, "waconsent_outbox_oldest_age_seconds", crm="ledger") == 7200
        assert (
            value(
                scraped, "waconsent_sync_last_success_timestamp_seconds", crm="ledger", mode="full"
            )
            == NOW.timestamp()
        )

        Refusing.refuse = False
        later = datetime(2026, 11, 29, 3, 0, tzinfo=UTC)
        second = metrics.timed_run(
            "incremental",
            lambda: run_once(cfg, engine=engine, clock=lambda: later, connector=Refusing(engine)),
        )
        assert second.status == "ok" and contact(engine, "A").opt_in is False
        scraped = scrape(client)
    assert value(scraped, "waconsent_sync_runs_total", mode="incremental", outcome="ok") == 1
    assert value(scraped, "waconsent_outbox_rows", crm="ledger", state="pending") == 0
    assert value(scraped, "waconsent_outbox_oldest_age_seconds", crm="ledger") == 0
    assert (
        value(
            scraped,
            "waconsent_sync_last_success_timestamp_seconds",
            crm="ledger",
            mode="incremental",
        )
        == later.timestamp()
    )
    assert (
        value(scraped, "waconsent_sync_last_success_timestamp_seconds", crm="ledger", mode="full")
        == NOW.timestamp()
    )


def test_failed_and_locked_runs_are_counted_and_reraised() -> None:
    """A run that raises counts as failed (lock_held when another node runs) and the
    exception still reaches the scheduler; replies are counted from each sender pass."""
    metrics = Metrics()

    def failing() -> Any:
        raise RuntimeError("CRM down")

    def locked() -> Any:
        raise RunLockHeld("ledger", "other-node")

    with pytest.raises(RuntimeError):
        metrics.timed_run("full", failing)
    with pytest.raises(RunLockHeld):
        metrics.timed_run("incremental", locked)
    metrics.replies(PassSummary(sent=3, failed=1))
    metrics.replies(PassSummary(sent=1, deferred=2))
    scraped = samples(metrics.exposition().decode())
    assert value(scraped, "waconsent_sync_runs_total", mode="full", outcome="failed") == 1
    assert value(scraped, "waconsent_sync_runs_total", mode="incremental", outcome="lock_held") == 1
    assert value(scraped, "waconsent_replies_total", outcome="sent") == 4
    assert value(scraped, "waconsent_replies_total", outcome="failed") == 1
    assert value(scraped, "waconsent_replies_total", outcome="deferred") == 2
    assert value(scraped, "waconsent_store_up") is None  # no store given: no store gauges


def test_unreadable_store_is_a_gauge_not_a_failed_scrape(tmp_path: Path) -> None:
    """When the store cannot be reached, a delivery answered 503 counts as failed and the
    scrape still answers 200, with waconsent_store_up 0 and no store gauges."""
    gone = create_engine(f"sqlite:///{tmp_path}/missing/dir/x.db")
    try:
        with TestClient(create_app(config("sqlite://"), gone)) as client:
            assert post(client, p.payload(p.message("4915123456789", T0, "STOP"))) == 503
            scraped = scrape(client)
    finally:
        gone.dispose()
    assert value(scraped, "waconsent_webhook_deliveries_total", outcome="failed") == 1
    assert value(scraped, "waconsent_webhook_deliveries_total", outcome="stored") == 0
    assert value(scraped, "waconsent_store_up") == 0
    assert value(scraped, "waconsent_outbox_rows", crm="ledger", state="pending") is None


def test_serve_counts_the_targeted_write_back_of_a_stop(tmp_path: Path) -> None:
    """Under `waconsent serve`, a signed STOP is counted as a stored delivery and an opt-out,
    and the targeted write-back it starts as a targeted run, with its finish time."""
    port = free_port()
    cfg, url = ledger_serve_config(tmp_path, port)
    engine = open_engine(url)
    upsert_contacts(engine, [opted_in("A", "0151 23456789")], NOW)
    run_once(config(url), engine=engine)
    process, base = start_serve(
        cfg, port, {"WHATSAPP_APP_SECRET": SECRET, "WHATSAPP_VERIFY_TOKEN": "vt"}
    )
    try:
        body = json.dumps(
            p.payload(p.message("4915123456789", datetime.now(UTC).replace(microsecond=0), "STOP"))
        ).encode()
        assert (
            httpx.post(
                f"{base}{PATH}",
                content=body,
                timeout=10,
                headers={SIGNATURE_HEADER: sign(body, SECRET), "Content-Type": "application/json"},
            ).status_code
            == 200
        )
        scraped: Samples = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            scraped = samples(httpx.get(f"{base}/metrics", timeout=5).text)
            if value(scraped, "waconsent_sync_runs_total", mode="targeted", outcome="ok"):
                break
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
        engine.dispose()
    assert process.returncode == 0, err[-2000:]
    assert value(scraped, "waconsent_sync_runs_total", mode="targeted", outcome="ok") == 1
    assert value(scraped, "waconsent_webhook_deliveries_total", outcome="stored") == 1
    assert value(scraped, "waconsent_consent_signals_total", signal="opt_out") == 1
    targeted = value(
        scraped, "waconsent_sync_last_success_timestamp_seconds", crm="ledger", mode="targeted"
    )
    assert targeted is not None and abs(targeted - time.time()) < 60
    assert value(scraped, "waconsent_outbox_rows", crm="ledger", state="pending") == 0

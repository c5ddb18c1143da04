"""The consent API (issue 16): GET /v1/consent/{number}, POST /v1/consent/check, on the
receiver's own app; its token, its rate limit, and a STOP delivered by webhook after the
last sync answering no before any sync."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import StarletteDeprecationWarning

from tests import payloads as p
from tests.test_run import opted_in
from waconsent import consent_api as api
from waconsent.config.loading import LoadedConfig, Secrets, parse
from waconsent.connectors.webhook_signature import SIGNATURE_HEADER, sign
from waconsent.logs import fields_of
from waconsent.store.contacts import upsert_contacts
from waconsent.sync.run import run_once
from waconsent.web import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

TOKEN = "api-token-for-tests"
SECRETS = {
    "WHATSAPP_APP_SECRET": "app-secret",
    "WHATSAPP_VERIFY_TOKEN": "verify",
    "WACONSENT_API_TOKEN": TOKEN,
}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PATH = "/webhooks/whatsapp"
NUMBER, OTHER = "4915111111111", "4915122222222"


def config(url: str, secrets: dict[str, str] = SECRETS, **api: Any) -> LoadedConfig:
    raw: dict[str, Any] = {"store": {"url": url}, "webhook": {"path": PATH}}
    if api:
        raw["api"] = api
    return LoadedConfig(parse(raw), Secrets(secrets), None)


@pytest.fixture
def synced(engine: Engine, store_url: str) -> LoadedConfig:
    """Two records opted in, synced just now (the real clock: the webhook checks times)."""
    cfg = config(store_url)
    moment = datetime.now(UTC) - timedelta(days=2)
    upsert_contacts(
        engine,
        [
            opted_in("A", "+49 151 11111111", opt_in_date=moment),
            opted_in("B", "0151 22222222", opt_in_date=moment, whatsapp_user_id="DE.42"),
        ],
        moment,
    )
    run_once(cfg, engine=engine)
    return cfg


@pytest.fixture
def client(engine: Engine, synced: LoadedConfig) -> Iterator[TestClient]:
    with TestClient(create_app(synced, engine)) as client:
        yield client


def test_get_answers_a_number_and_a_user_id(client: TestClient) -> None:
    """GET by number (any spelling) or user id: the fields of `audience check`, as JSON."""
    answer = client.get(f"/v1/consent/+{NUMBER}", headers=AUTH)
    assert answer.status_code == 200
    assert answer.json() == {
        "number": f"+{NUMBER}",
        "purpose": "marketing",
        "may_send": True,
        "reason": "opted_in",
        "session_open_until": None,
        "records": ["A"],
    }
    by_user = client.get("/v1/consent/DE.42", headers=AUTH).json()
    assert (by_user["may_send"], by_user["records"]) == (True, ["B"])
    service = client.get(f"/v1/consent/{NUMBER}?purpose=service", headers=AUTH).json()
    assert (service["may_send"], service["reason"]) == (False, "session_closed")
    assert client.get(f"/v1/consent/{NUMBER}?purpose=spam", headers=AUTH).status_code == 422


def test_a_stop_by_webhook_after_the_sync_answers_no_at_once(
    client: TestClient, caplog: Any
) -> None:
    """The STOP delivered a moment ago, no sync since: GET and POST say revoked; the logs
    hold no full number."""
    body = json.dumps(p.payload(p.message(NUMBER, datetime.now(UTC), "STOP"))).encode()
    delivered = client.post(
        PATH,
        content=body,
        headers={SIGNATURE_HEADER: sign(body, "app-secret"), "Content-Type": "application/json"},
    )
    assert delivered.status_code == 200
    with caplog.at_level(logging.INFO, logger="waconsent"):
        one = client.get(f"/v1/consent/{NUMBER}", headers=AUTH).json()
        many = client.post(
            "/v1/consent/check",
            headers=AUTH,
            json={"numbers": [NUMBER, OTHER, "n/a", "+49 170 0000000"]},
        ).json()
    assert (one["may_send"], one["reason"]) == (False, "revoked")
    assert [(r["may_send"], r["reason"]) for r in many["results"]] == [
        (False, "revoked"),
        (True, "opted_in"),
        (False, "unparseable_number"),
        (False, "no_record"),
    ]
    ours = json.dumps(
        [fields_of(r) for r in caplog.records if r.name.startswith("waconsent")], default=str
    )
    assert "consent_api.check" in ours and "*******" in ours
    assert NUMBER not in ours and "151111" not in ours


def test_post_limits_and_shapes(client: TestClient) -> None:
    """Up to 1,000 numbers; more is 413; a wrong shape 422; not JSON 400."""
    full = client.post(
        "/v1/consent/check", headers=AUTH, json={"numbers": [OTHER] * 1000, "purpose": "marketing"}
    )
    assert full.status_code == 200 and len(full.json()["results"]) == 1000
    over = client.post("/v1/consent/check", headers=AUTH, json={"numbers": [OTHER] * 1001})
    assert over.status_code == 413 and "at most 1000" in over.json()["error"]
    assert (
        client.post("/v1/consent/check", headers=AUTH, json={"numbers": [1, 2]}).status_code == 422
    )
    assert client.post("/v1/consent/check", headers=AUTH, json=[OTHER]).status_code == 422
    assert client.post("/v1/consent/check", headers=AUTH, content=b"{nope").status_code == 400


def test_token_missing_wrong_and_disabled(
    engine: Engine, synced: LoadedConfig, client: TestClient, store_url: str
) -> None:
    """401 without a bearer token, 403 with a wrong one; without WACONSENT_API_TOKEN the
    routes do not exist (404)."""
    assert client.get(f"/v1/consent/{NUMBER}").status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert client.get(f"/v1/consent/{NUMBER}", headers=wrong).status_code == 403
    assert (
        client.post("/v1/consent/check", headers=wrong, json={"numbers": [NUMBER]}).status_code
        == 403
    )
    secrets = {k: v for k, v in SECRETS.items() if k != "WACONSENT_API_TOKEN"}
    with TestClient(create_app(config(store_url, secrets), engine)) as disabled:
        assert disabled.get(f"/v1/consent/{NUMBER}", headers=AUTH).status_code == 404
        assert (
            disabled.post("/v1/consent/check", headers=AUTH, json={"numbers": [NUMBER]}).status_code
            == 404
        )


def test_rate_limited_per_client(engine: Engine, synced: LoadedConfig, store_url: str) -> None:
    """More than [api] rate_per_minute requests from one client in a minute: 429 with
    Retry-After; a POST of many numbers counts once."""
    app = create_app(config(store_url, rate_per_minute=2), engine)
    with TestClient(app) as client:
        assert (
            client.post(
                "/v1/consent/check", headers=AUTH, json={"numbers": [NUMBER] * 50}
            ).status_code
            == 200
        )
        assert client.get(f"/v1/consent/{NUMBER}", headers=AUTH).status_code == 200
        refused = client.get(f"/v1/consent/{NUMBER}", headers=AUTH)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1


def test_a_get_on_sqlite_is_checked_without_a_worker_thread(
    engine: Engine, synced: LoadedConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16's p99: on SQLite a GET's check runs on the event loop (in worker threads at
    500/s they traded the GIL and churned the pool into 100-300 ms stalls); a POST of more
    than a few numbers, and anything on PostgreSQL, still goes to a thread."""
    threaded: list[int] = []

    async def counted(func: Any, *args: Any) -> Any:
        threaded.append(len(args[0]))
        return await run_in_threadpool(func, *args)

    monkeypatch.setattr(api, "run_in_threadpool", counted)
    with TestClient(create_app(synced, engine)) as client:
        assert client.get(f"/v1/consent/+{NUMBER}", headers=AUTH).json()["may_send"] is True
        many = {"numbers": [f"+{NUMBER}"] * (api.INLINE_UP_TO + 1)}
        assert client.post("/v1/consent/check", json=many, headers=AUTH).status_code == 200
    inline = engine.dialect.name == "sqlite"
    assert threaded == ([] if inline else [1]) + [api.INLINE_UP_TO + 1]

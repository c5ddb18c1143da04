"""The webhook receiver, served for real by uvicorn on a loopback port (and by TestClient
for the property test): handshake, signatures, size limits, durable deduplicated storage."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, func
from sqlalchemy import select as sql_select
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():
    # Starlette 1.x prefers httpx2 for its TestClient and warns when it falls back to httpx,
    # which is what this project installs; the client behaves the same for these tests.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

from waconsent.config.loading import LoadedConfig, Secrets, parse
from waconsent.connectors.webhook_signature import SIGNATURE_HEADER, sign
from waconsent.errors import ConfigError, FatalError
from waconsent.logs import fields_of
from waconsent.server import listen, serve, uvicorn_config
from waconsent.store.engine import open_engine
from waconsent.store.tables import events, evidence
from waconsent.sync.ingest import IngestReport
from waconsent.web import create_app

APP_SECRET = "test-app-secret"
VERIFY = "test-verify-token"
PATH = "/webhooks/whatsapp"
SECRETS = {"WHATSAPP_APP_SECRET": APP_SECRET, "WHATSAPP_VERIFY_TOKEN": VERIFY}
BASE_TS = 1_760_000_000
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- helpers


def make_config(
    store_url: str, secrets: dict[str, str] | None = None, **webhook: Any
) -> LoadedConfig:
    raw = {
        "store": {"url": store_url},
        "webhook": {"path": PATH, **webhook},
        "whatsapp": {"opt_out_keywords": ["STOP", "STOPP"]},
    }
    return LoadedConfig(parse(raw), Secrets(SECRETS if secrets is None else secrets), None)


def wa_id(n: int) -> str:
    return f"49170{n:07d}"


def metadata() -> dict[str, str]:
    return {"display_phone_number": "15550001111", "phone_number_id": "106540352242922"}


def message(tag: str, i: int, text: str = "hello") -> dict[str, Any]:
    return {
        "from": wa_id(i),
        "id": f"wamid.{tag}.{i}",
        "timestamp": str(BASE_TS + i),
        "type": "text",
        "text": {"body": text},
    }


def status(tag: str, i: int) -> dict[str, Any]:
    """A failed status (error 131047): one the rules can use, so it is stored."""
    return {
        "id": f"wamid.out.{tag}.{i}",
        "status": "failed",
        "timestamp": str(BASE_TS + i),
        "recipient_id": wa_id(i),
        "errors": [{"code": 131047, "title": "Re-engagement message"}],
    }


def preference(i: int, value: str = "stop") -> dict[str, Any]:
    return {
        "wa_id": wa_id(i),
        "detail": "User requested to stop marketing messages",
        "category": "marketing_messages",
        "value": value,
        "timestamp": BASE_TS + i,
    }


def messages_change(
    items: list[dict[str, Any]], statuses: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    value: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "metadata": metadata(),
        "messages": items,
    }
    if items:
        value["contacts"] = [{"profile": {"name": "Kunde"}, "wa_id": items[0]["from"]}]
    if statuses:
        value["statuses"] = statuses
    return {"field": "messages", "value": value}


def preferences_change(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "field": "user_preferences",
        "value": {
            "messaging_product": "whatsapp",
            "metadata": metadata(),
            "user_preferences": items,
        },
    }


def payload(*changes: dict[str, Any], entries: int = 1) -> dict[str, Any]:
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": f"WABA{e}", "changes": list(changes)} for e in range(entries)],
    }


def body_of(document: Any) -> bytes:
    """As Meta sends it: compact, non-ASCII escaped as \\uXXXX."""
    return json.dumps(document, separators=(",", ":")).encode()


def signed_headers(body: bytes, secret: str = APP_SECRET) -> dict[str, str]:
    return {SIGNATURE_HEADER: sign(body, secret), "Content-Type": "application/json"}


def count(engine: Engine, table: Any = events) -> int:
    with engine.connect() as connection:
        return int(connection.execute(sql_select(func.count()).select_from(table)).scalar_one())


def stored_keys(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return sorted(connection.execute(sql_select(events.c.key)).scalars())


@dataclass
class Live:
    url: str
    port: int
    engine: Engine
    app: Starlette


@contextmanager
def running(app: Starlette, config: LoadedConfig) -> Iterator[int]:
    """uvicorn, with the production settings and listener, in a thread on a free port."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn_config(app, config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextmanager
def live_server(engine: Engine, store_url: str, **webhook: Any) -> Iterator[Live]:
    config = make_config(store_url, **webhook)
    app = create_app(config, engine)
    with running(app, config) as port:
        yield Live(f"http://127.0.0.1:{port}", port, engine, app)


@pytest.fixture
def live(engine: Engine, store_url: str) -> Iterator[Live]:
    """The receiver served by uvicorn over the parametrized store (SQLite and PostgreSQL)."""
    with live_server(engine, store_url) as server:
        yield server


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[Engine]:
    engine = open_engine(sqlite_url)
    yield engine
    engine.dispose()


@pytest.fixture
def live_sqlite(sqlite_engine: Engine, sqlite_url: str) -> Iterator[Live]:
    """The receiver served by uvicorn over SQLite, with a small body limit for 413 tests."""
    with live_server(sqlite_engine, sqlite_url, max_body_bytes=4096) as server:
        yield server


def post(live: Live, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(live.url + PATH, content=body, headers=headers, timeout=10)


def raw_exchange(port: int, head: bytes, chunks: list[bytes]) -> tuple[bytes, int]:
    """Send a request head then body chunks until the server answers; (response, chunks sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(head)
        sent = 0
        for chunk in chunks:
            readable, _, _ = select.select([conn], [], [], 0.02)
            if readable:
                break
            try:
                conn.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
        response = b""
        try:
            while b"\r\n\r\n" not in response:
                data = conn.recv(65536)
                if not data:
                    break
                response += data
        except ConnectionResetError:
            pass
        return response, sent


# ---------------------------------------------------------------------------- handshake


def test_handshake_answers_the_challenge_for_the_verify_token(live_sqlite: Live) -> None:
    """GET with hub.mode=subscribe and the right token echoes hub.challenge as plain text."""
    response = httpx.get(
        live_sqlite.url + PATH,
        params={"hub.mode": "subscribe", "hub.verify_token": VERIFY, "hub.challenge": "1158201444"},
    )
    assert response.status_code == 200
    assert response.text == "1158201444"
    assert response.headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize(
    "params",
    [
        {"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "1"},
        {"hub.mode": "unsubscribe", "hub.verify_token": VERIFY, "hub.challenge": "1"},
        {"hub.mode": "subscribe", "hub.challenge": "1"},
        {"hub.mode": "subscribe", "hub.verify_token": VERIFY},
        {"hub.mode": "subscribe", "hub.verify_token": "ünïcode", "hub.challenge": "1"},
        {},
    ],
)
def test_handshake_refuses_anything_else_with_403(
    live_sqlite: Live, params: dict[str, str]
) -> None:
    """A wrong or missing token, another mode or no challenge answers 403 and no challenge."""
    response = httpx.get(live_sqlite.url + PATH, params=params)
    assert response.status_code == 403
    assert "1" not in response.text


# ---------------------------------------------------------------------------- deliveries


def test_signed_delivery_is_stored_before_the_200(live: Live) -> None:
    """A good signed POST answers 200 only after its events (and evidence) are committed."""
    document = payload(
        messages_change([message("a", 1), message("a", 2, "STOP")]),
        preferences_change([preference(3)]),
    )
    response = post(live, body_of(document), signed_headers(body_of(document)))
    assert response.status_code == 200
    assert response.json() == {"stored": 3, "duplicates": 0, "skipped": 0}
    assert stored_keys(live.engine) == sorted(
        ["msg:wamid.a.1", "msg:wamid.a.2", f"pref:{wa_id(3)}:stop:{BASE_TS + 3}"]
    )
    assert count(live.engine, evidence) == 2  # the STOP and the preference


def test_forged_delivery_is_refused_with_403_and_stores_nothing(live: Live) -> None:
    """A signature made with another secret, or over other bytes, answers 403; nothing stored."""
    body = body_of(payload(messages_change([message("f", 1, "STOP")])))
    other = body_of(payload(messages_change([message("f", 2)])))
    for headers in (
        signed_headers(body, "not-the-secret"),
        signed_headers(other),
        {SIGNATURE_HEADER: sign(body, APP_SECRET).removeprefix("sha256=")},
        {SIGNATURE_HEADER: "sha1=" + "0" * 40},
        {SIGNATURE_HEADER: ""},
    ):
        assert post(live, body, headers).status_code == 403
    assert count(live.engine) == 0


def test_unsigned_delivery_is_refused_with_401_and_stores_nothing(live_sqlite: Live) -> None:
    """No X-Hub-Signature-256 header answers 401; nothing stored."""
    body = body_of(payload(messages_change([message("u", 1, "STOP")])))
    response = post(live_sqlite, body, {"Content-Type": "application/json"})
    assert response.status_code == 401
    assert count(live_sqlite.engine) == 0


def test_signed_body_that_is_not_json_answers_400(live_sqlite: Live) -> None:
    """Signed bytes that do not decode as JSON answer 400 and store nothing."""
    for body in (b'{"entry": [', b"\xff\xfe\x00garbage", b"", b"[" * 100_0):
        assert post(live_sqlite, body, signed_headers(body)).status_code == 400
    deep = b"[" * 4000 + b"]" * 4000  # beyond the decoder's recursion limit
    with live_server(live_sqlite.engine, "sqlite://", max_body_bytes=16384) as roomy:
        assert post(roomy, deep, signed_headers(deep)).status_code == 400
    assert count(live_sqlite.engine) == 0


def test_json_that_is_no_webhook_payload_answers_200_and_logs_where(
    live_sqlite: Live, caplog: pytest.LogCaptureFixture
) -> None:
    """Signed JSON the parser cannot use is not retried by Meta: 200, skip logged with '$'."""
    caplog.set_level(logging.INFO, logger="waconsent")
    documents: list[Any] = [[], 42, {"object": "page"}, {"entry": "x"}]
    for document in documents:
        body = body_of(document)
        assert post(live_sqlite, body, signed_headers(body)).status_code == 200
    skips = [fields_of(r) for r in caplog.records if r.getMessage() == "webhook.item_skipped"]
    assert {s["where"] for s in skips} == {"$"}
    assert count(live_sqlite.engine) == 0


def test_partly_understood_payload_stores_the_rest_and_logs_skips(
    live: Live, caplog: pytest.LogCaptureFixture
) -> None:
    """Broken items are skipped with their location; the good ones are stored; still 200."""
    caplog.set_level(logging.INFO, logger="waconsent")
    document: dict[str, Any] = {
        "entry": [
            {
                "changes": [
                    messages_change(
                        [message("p", 1), {"from": wa_id(2), "type": "text"}, message("p", 3)]
                    )
                ]
            },
            {"id": "no changes"},
            {"changes": [{"field": "messages"}, preferences_change([{"value": "stop"}])]},
        ]
    }
    body = body_of(document)
    response = post(live, body, signed_headers(body))
    assert response.status_code == 200
    assert response.json()["skipped"] == 4
    assert stored_keys(live.engine) == ["msg:wamid.p.1", "msg:wamid.p.3"]
    where = {
        fields_of(r)["where"] for r in caplog.records if r.getMessage() == "webhook.item_skipped"
    }
    assert where == {
        "entry[0].changes[0].value.messages[1]",
        "entry[1]",
        "entry[2].changes[0]",
        "entry[2].changes[1].value.user_preferences[0]",
    }


def test_batched_delivery_with_many_entries_is_stored_whole(live: Live) -> None:
    """5 entries x 2 changes, 1,000 updates in all, in one POST: every one is stored."""
    entries = []
    for e in range(5):
        base = e * 1000
        entries.append(
            {
                "id": f"WABA{e}",
                "changes": [
                    messages_change(
                        [message("b", base + i) for i in range(40)],
                        [status("b", base + i) for i in range(40)],
                    ),
                    preferences_change(
                        [preference(base + i, "resume" if i % 2 else "stop") for i in range(120)]
                    ),
                ],
            }
        )
    body = body_of({"object": "whatsapp_business_account", "entry": entries})
    response = post(live, body, signed_headers(body))
    assert response.status_code == 200
    assert response.json() == {"stored": 1000, "duplicates": 0, "skipped": 0}
    assert count(live.engine) == 1000
    assert count(live.engine, evidence) == 600  # preferences (stop and resume) are evidence
    again = post(live, body, signed_headers(body))  # Meta's redelivery of the whole batch
    assert again.json() == {"stored": 0, "duplicates": 1000, "skipped": 0}
    assert count(live.engine) == 1000


def test_concurrent_identical_deliveries_are_stored_once(live: Live) -> None:
    """8 identical signed POSTs released at once, 3 times over: each update stored once."""
    rounds, senders = 3, 8
    for r in range(rounds):
        document = payload(
            messages_change([message(f"c{r}", i, "STOP") for i in range(20)]),
            preferences_change([preference(100 * r + i) for i in range(5)]),
        )
        body = body_of(document)
        headers = signed_headers(body)
        barrier = threading.Barrier(senders)
        statuses: list[int] = []
        stored: list[int] = []
        lock = threading.Lock()

        def deliver(
            body: bytes,
            headers: dict[str, str],
            barrier: threading.Barrier,
            statuses: list[int],
            stored: list[int],
            lock: threading.Lock,
        ) -> None:
            with httpx.Client(timeout=30) as client:
                barrier.wait()
                response = client.post(live.url + PATH, content=body, headers=headers)
            with lock:
                statuses.append(response.status_code)
                stored.append(response.json()["stored"])

        threads = [
            threading.Thread(target=deliver, args=(body, headers, barrier, statuses, stored, lock))
            for _ in range(senders)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert statuses == [200] * senders
        assert sorted(stored) == [0] * (senders - 1) + [25]
    assert count(live.engine) == rounds * 25
    assert count(live.engine, evidence) == rounds * 25


def test_value_the_store_cannot_hold_is_not_a_5xx(live: Live) -> None:
    """A field longer than its column (PostgreSQL refuses it) still answers 200, never 5xx."""
    long_id = {**message("l", 1), "id": "wamid." + "x" * 250}
    body = body_of(payload(messages_change([long_id])))
    response = post(live, body, signed_headers(body))
    assert response.status_code == 200


def test_store_outage_answers_503_so_meta_retries(tmp_path: Path) -> None:
    """An unreachable store answers 503 with Retry-After to a good delivery; healthz says 503."""
    broken = create_engine(f"sqlite:///{tmp_path / 'missing' / 'ledger.db'}")
    config = make_config("sqlite://")
    with running(create_app(config, broken), config) as port:
        body = body_of(payload(messages_change([message("o", 1)])))
        response = httpx.post(
            f"http://127.0.0.1:{port}{PATH}", content=body, headers=signed_headers(body)
        )
        assert response.status_code == 503
        assert response.headers["retry-after"] == "30"
        health = httpx.get(f"http://127.0.0.1:{port}/healthz")
        assert health.status_code == 503
        assert health.json() == {"status": "unavailable", "store": "unreachable"}
    broken.dispose()


def test_healthz_reports_a_reachable_store(live: Live) -> None:
    """GET /healthz answers 200 JSON when the store answers."""
    response = httpx.get(live.url + "/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert response.json()["store"] == "reachable"


def test_keep_alive_deliveries_do_not_wait_for_delayed_acks(live_sqlite: Live) -> None:
    """Back-to-back deliveries on one connection answer in a few ms, not Nagle's ~40 ms."""
    timings = []
    with httpx.Client(base_url=live_sqlite.url, timeout=10) as client:
        for i in range(15):
            body = body_of(payload(messages_change([message("k", i)])))
            started = time.perf_counter()
            assert client.post(PATH, content=body, headers=signed_headers(body)).status_code == 200
            timings.append(time.perf_counter() - started)
    assert sorted(timings)[len(timings) // 2] < 0.030


# ---------------------------------------------------------------------------- body size


def test_declared_oversize_body_is_refused_before_it_is_sent(live_sqlite: Live) -> None:
    """Content-Length over the limit answers 413 though not one body byte was sent."""
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"{SIGNATURE_HEADER}: sha256={'0' * 64}\r\nContent-Length: 4097\r\n\r\n"
    ).encode()
    response, _ = raw_exchange(live_sqlite.port, head, [])
    assert response.startswith(b"HTTP/1.1 413 ")
    assert count(live_sqlite.engine) == 0


def test_chunked_oversize_body_is_refused_while_streaming(live_sqlite: Live) -> None:
    """A chunked body is counted as it arrives: 413 long before the sender has finished."""
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        f"{SIGNATURE_HEADER}: sha256={'0' * 64}\r\n\r\n"
    ).encode()
    chunk = b"400\r\n" + b" " * 1024 + b"\r\n"
    response, sent = raw_exchange(live_sqlite.port, head, [chunk] * 1000)
    assert response.startswith(b"HTTP/1.1 413 ")
    assert sent < 100  # of 1,000 KiB offered, the server stopped after about 4
    assert count(live_sqlite.engine) == 0


def test_body_at_the_limit_is_accepted_and_one_byte_more_refused(live_sqlite: Live) -> None:
    """Exactly max_body_bytes is accepted; max_body_bytes + 1 answers 413 (Content-Length)."""
    core = body_of(payload(messages_change([message("s", 1)])))
    exact = core + b" " * (4096 - len(core))
    assert post(live_sqlite, exact, signed_headers(exact)).status_code == 200
    over = exact + b" "
    assert post(live_sqlite, over, signed_headers(over)).status_code == 413


def test_default_limit_accepts_a_3_mb_batch() -> None:
    """The default limit is 4 MiB: Meta's largest batches (up to 3 MB) fit."""
    assert make_config("sqlite://").settings.webhook.max_body_bytes == 4 * 1024 * 1024


def test_large_signed_body_under_the_default_limit_is_stored(
    sqlite_engine: Engine, sqlite_url: str
) -> None:
    """A 3 MB signed delivery is read whole (streamed in many chunks) and stored."""
    items = [message("big", i, "x" * 2900) for i in range(1000)]
    body = body_of(payload(messages_change(items)))
    assert 2_900_000 < len(body) < 4 * 1024 * 1024
    with live_server(sqlite_engine, sqlite_url) as server:
        response = post(server, body, signed_headers(body))
    assert response.status_code == 200
    assert count(sqlite_engine) == 1000


# ---------------------------------------------------------------------------- start-up


@pytest.mark.parametrize(
    "missing",
    [
        ["WHATSAPP_APP_SECRET"],
        ["WHATSAPP_VERIFY_TOKEN"],
        ["WHATSAPP_APP_SECRET", "WHATSAPP_VERIFY_TOKEN"],
    ],
)
def test_receiver_refuses_to_start_without_its_secrets(
    sqlite_engine: Engine, missing: list[str]
) -> None:
    """create_app and serve raise ConfigError naming each missing variable and how to set it."""
    config = make_config(
        "sqlite://", secrets={k: v for k, v in SECRETS.items() if k not in missing}
    )
    for start in (lambda: create_app(config, sqlite_engine), lambda: serve(config)):
        with pytest.raises(ConfigError) as caught:
            start()
        assert len(caught.value.problems) == len(missing)
        for name in missing:
            assert f"export {name}=" in str(caught.value)


def test_address_in_use_is_a_fatal_error() -> None:
    """A taken host:port fails with FatalError (exit 3) instead of uvicorn's sys.exit."""
    with (
        socket.create_server(("127.0.0.1", 0)) as taken,
        pytest.raises(FatalError, match=r"cannot listen on 127\.0\.0\.1:"),
    ):
        listen("127.0.0.1", taken.getsockname()[1])


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_serve_runs_the_real_receiver_until_stopped(tmp_path: Path, stop: int) -> None:
    """serve(config) in its own process: healthz, a delivery, then a clean return (exit 0)."""
    port = free_port()
    (tmp_path / "waconsent.toml").write_text(
        f'[store]\nurl = "sqlite:///{tmp_path / "ledger.db"}"\n'
        f'[webhook]\nhost = "127.0.0.1"\nport = {port}\npath = "{PATH}"\n'
    )
    script = (
        "from waconsent.config.loading import load; from waconsent.server import serve; "
        "serve(load('waconsent.toml'))"
    )
    env = {**os.environ, **SECRETS, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, process.communicate()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "serve did not come up"
                time.sleep(0.05)
        body = body_of(payload(messages_change([message("serve", 1, "STOP")])))
        response = httpx.post(
            f"http://127.0.0.1:{port}{PATH}?x=491701234567",
            content=body,
            headers=signed_headers(body),
        )
        assert response.status_code == 200
        assert response.json()["stored"] == 1
    finally:
        process.send_signal(stop)
        _, err = process.communicate(timeout=20)
    assert process.returncode == 0
    logs = err.decode()
    assert json.loads(logs.rstrip().splitlines()[-1])["event"] == "webhook.stopped"
    assert '"event": "webhook.delivery"' in logs
    assert '"event": "http.access"' in logs
    assert wa_id(1) not in logs and "491701234567" not in logs
    assert sign(body, APP_SECRET).removeprefix("sha256=") not in logs


# ---------------------------------------------------------------------------- logs and hooks


def test_logs_hold_no_numbers_signatures_or_query_strings(
    live_sqlite: Live, caplog: pytest.LogCaptureFixture
) -> None:
    """Access and event logs show method, path, status; numbers masked; no signature, no body."""
    caplog.set_level(logging.INFO, logger="waconsent")
    body = body_of(
        payload(messages_change([message("log", 1, "STOP")]), preferences_change([preference(2)]))
    )
    headers = signed_headers(body)
    post(live_sqlite, body, headers)
    post(live_sqlite, body, signed_headers(body, "forged"))
    httpx.get(
        live_sqlite.url + PATH,
        params={"hub.mode": "subscribe", "hub.verify_token": VERIFY, "hub.challenge": "4917099999"},
    )
    httpx.get(live_sqlite.url + "/491701234567")
    deadline = time.monotonic() + 5  # the access line is written just after the response
    while sum(r.name == "waconsent.web.access" for r in caplog.records) < 4:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    text = "\n".join(json.dumps(fields_of(record)) for record in caplog.records)
    for secret in (
        wa_id(1),
        wa_id(2),
        "4917099999",
        "491701234567",
        VERIFY,
        APP_SECRET,
        headers[SIGNATURE_HEADER].removeprefix("sha256="),
        "hello",
        "hub.",
    ):
        assert secret not in text
    access = [fields_of(r) for r in caplog.records if r.name == "waconsent.web.access"]
    assert [(a["method"], a["path"], a["status"]) for a in access] == [
        ("POST", PATH, 200),
        ("POST", PATH, 403),
        ("GET", PATH, 200),
        ("GET", "(other)", 404),
    ]
    assert all(isinstance(a["ms"], float) for a in access)
    signals = [fields_of(r) for r in caplog.records if r.getMessage() == "webhook.signal"]
    assert {s["wa_id"] for s in signals} == {"*********001", "*********002"}


def test_on_ingest_hook_sees_committed_events_and_cannot_fail_the_delivery(
    sqlite_engine: Engine,
) -> None:
    """The optional hook runs after the commit; an exception in it is logged, still 200."""
    seen: list[IngestReport] = []

    def hook(report: IngestReport) -> None:
        assert count(sqlite_engine) == report.stored  # already committed and visible
        seen.append(report)
        raise RuntimeError("write-back queue down")

    app = create_app(make_config("sqlite://"), sqlite_engine, on_ingest=hook)
    body = body_of(payload(messages_change([message("h", 1, "STOP")])))
    with TestClient(app) as client:
        assert client.post(PATH, content=body, headers=signed_headers(body)).status_code == 200
        assert client.post(PATH, content=body, headers=signed_headers(body)).status_code == 200
    assert [r.stored for r in seen] == [1]  # not called for a delivery of duplicates only


# ---------------------------------------------------------------------------- properties

leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
ITEM_KEYS = [
    "from",
    "id",
    "timestamp",
    "type",
    "text",
    "button",
    "interactive",
    "system",
    "status",
    "errors",
    "recipient_id",
    "recipient_type",
    "wa_id",
    "user_id",
    "value",
    "conversation",
    "pricing",
    "referral",
    "from_user_id",
    "body",
    "payload",
]
item_values = st.one_of(
    json_values,
    st.sampled_from(
        [
            "text",
            "button",
            "system",
            "stop",
            "resume",
            "STOP",
            "delivered",
            "failed",
            "group",
            "user_changed_number",
        ]
    ),
    st.integers(min_value=0, max_value=2**40).map(str),
    st.text(max_size=300),
    st.just({"body": "STOP"}),
    st.just([{"code": 131050}]),
    st.just({"marketing": "stop"}),
)
identifiers = (
    st.text(min_size=1, max_size=8)
    | st.text(min_size=190, max_size=320)
    | st.from_regex(r"\A[1-9][0-9]{6,20}\Z")
    | st.just("wamid.ok\x00nul")
)
stamps = st.integers(min_value=1_200_000_000, max_value=2_100_000_000)
near_valid = st.one_of(  # a valid message, status or preference, then mangled below
    st.fixed_dictionaries(
        {
            "from": identifiers,
            "id": identifiers,
            "type": st.just("text"),
            "timestamp": stamps.map(str),
            "text": st.just({"body": "STOP"}),
        }
    ),
    st.fixed_dictionaries(
        {
            "id": identifiers,
            "status": identifiers,
            "recipient_id": identifiers,
            "timestamp": stamps,
            "errors": st.just([{"code": 131050}]),
        }
    ),
    st.fixed_dictionaries(
        {
            "wa_id": identifiers,
            "value": st.sampled_from(["stop", "resume"]) | identifiers,
            "timestamp": stamps,
        }
    ),
)
items = st.builds(
    lambda base, extra, drop: {k: v for k, v in {**base, **extra}.items() if k not in drop},
    near_valid,
    st.dictionaries(st.sampled_from(ITEM_KEYS), item_values, max_size=2),
    st.sets(st.sampled_from(ITEM_KEYS), max_size=2),
)


def mostly(shape: st.SearchStrategy[Any], junk: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The webhook shape three times in four, arbitrary JSON otherwise (one_of would flatten
    the junk's own alternatives into its choice and pick junk most of the time)."""
    return st.integers(min_value=0, max_value=3).flatmap(lambda i: junk if i == 0 else shape)


values = st.fixed_dictionaries(
    {},
    optional={
        "messages": mostly(st.lists(items, max_size=4), json_values),
        "statuses": st.lists(items, max_size=4),
        "user_preferences": st.lists(items, max_size=4),
        "contacts": st.lists(st.dictionaries(st.sampled_from(["wa_id", "user_id"]), item_values)),
    },
)
changes = st.fixed_dictionaries(
    {
        "field": mostly(
            st.sampled_from(["messages", "user_preferences", "account_update"]),
            st.text(max_size=20),
        ),
        "value": mostly(values, json_values),
    }
)
webhook_shapes = mostly(
    st.fixed_dictionaries(
        {
            "entry": st.lists(
                mostly(
                    st.fixed_dictionaries(
                        {"changes": st.lists(mostly(changes, json_values), max_size=3)}
                    ),
                    json_values,
                ),
                max_size=3,
            )
        }
    ),
    json_values,
)
bodies = (
    webhook_shapes.map(lambda d: json.dumps(d, allow_nan=False).encode())
    | st.binary(max_size=300)
    | st.text(max_size=100).map(str.encode)
)
modes = st.sampled_from(["signed", "unsigned", "forged", "other-secret", "bad-prefix"])


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_arbitrary_bodies_never_5xx_and_unsigned_ones_store_nothing(
    store: str, request: pytest.FixtureRequest
) -> None:
    """Any JSON shape or bytes, signed or not: no 5xx, no exception, nothing from the unsigned."""
    with tempfile.TemporaryDirectory() as folder:
        url = (
            f"sqlite:///{folder}/ledger.db"
            if store == "sqlite"
            else str(request.getfixturevalue("postgres_url"))
        )
        engine = open_engine(url)
        app = create_app(make_config(url), engine)
        try:
            with TestClient(app, raise_server_exceptions=True) as client:
                _explore(client, engine)
        finally:
            engine.dispose()


def _explore(client: TestClient, engine: Engine) -> None:
    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(body=bodies, mode=modes)
    def check(body: bytes, mode: str) -> None:
        headers = {
            "signed": signed_headers(body),
            "unsigned": {},
            "forged": {SIGNATURE_HEADER: "sha256=" + "ab" * 32},
            "other-secret": signed_headers(body, APP_SECRET + "x"),
            "bad-prefix": {SIGNATURE_HEADER: sign(body, APP_SECRET).replace("sha256", "md5")},
        }[mode]
        before = count(engine)
        response = client.post(PATH, content=body, headers=headers)
        assert response.status_code < 500
        if mode == "signed":
            try:
                json.loads(body)
            except ValueError:
                assert response.status_code == 400
            else:
                assert response.status_code == 200
        else:
            assert response.status_code == (401 if mode == "unsigned" else 403)
            assert count(engine) == before

    check()

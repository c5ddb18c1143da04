"""Issue 11, item 9: stalled connections against the real server (uvicorn on loopback).

A peer that connects and sends nothing, trickles its head or its body, or opens hundreds
of connections must neither hold file descriptors for long nor starve Meta's deliveries,
and the conditions are logged once per interval, not once per connection.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from sqlalchemy import Engine

from tests.test_web import (
    PATH,
    SECRETS,
    body_of,
    make_config,
    message,
    messages_change,
    payload,
    signed_headers,
)
from waconsent.logs import fields_of
from waconsent.server import _GuardedH11, listen, uvicorn_config
from waconsent.server_limits import ServerLimits, Throttled, connection_cap
from waconsent.store.engine import open_engine
from waconsent.web import create_app

ROOT = Path(__file__).resolve().parents[1]
SHORT = ServerLimits(
    head_timeout=0.5, body_timeout=0.5, keep_alive=1, max_connections=20, log_interval=60.0
)


@contextmanager
def serving(engine: Engine, limits: ServerLimits) -> Iterator[tuple[int, uvicorn.Server]]:
    """The receiver with the production server settings but `limits`, in a thread."""
    config = make_config("sqlite:///unused.db")
    app = create_app(config, engine, limits=limits)
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn_config(app, config, limits))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)
        yield sock.getsockname()[1], server
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def engine(sqlite_url: str) -> Iterator[Engine]:
    engine = open_engine(sqlite_url)
    yield engine
    engine.dispose()


def closed_by_server(conn: socket.socket, within: float) -> bool:
    """True when the server closes the connection (EOF or reset) within `within` seconds."""
    conn.settimeout(within)
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@contextmanager
def connections(port: int, count: int, pause: float = 0.0) -> Iterator[list[socket.socket]]:
    """`count` client connections that send nothing (closed again afterwards)."""
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            opened.append(socket.create_connection(("127.0.0.1", port)))
            time.sleep(pause)
        yield opened
    finally:
        for conn in opened:
            conn.close()


def deliver(port: int, n: int = 1) -> httpx.Response:
    body = body_of(payload(messages_change([message("lim", n, "STOP")])))
    return httpx.post(
        f"http://127.0.0.1:{port}{PATH}", content=body, headers=signed_headers(body), timeout=10
    )


def events_logged(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, object]]:
    return [fields_of(r) for r in caplog.records if r.getMessage() == name]


def test_a_connection_that_sends_nothing_is_closed_at_the_head_deadline(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Connections that send nothing are closed at the head deadline, with one log line."""
    caplog.set_level(logging.INFO, logger="waconsent")
    with (
        serving(engine, ServerLimits(head_timeout=0.5, max_connections=100)) as (port, server),
        connections(port, 50) as idle,
    ):
        started = time.monotonic()
        assert all(closed_by_server(conn, 3) for conn in idle)
        assert 0.4 < time.monotonic() - started < 3
        assert len(server.server_state.connections) == 0
        assert deliver(port).status_code == 200
    lines = events_logged(caplog, "webhook.head_timeouts")
    assert len(lines) == 1 and lines[0]["count"] == 1  # the other 49 wait for the next line


def test_a_head_trickled_byte_by_byte_is_cut_at_the_deadline(engine: Engine) -> None:
    """A head trickling in byte by byte is still cut at the head deadline."""
    with serving(engine, SHORT) as (port, _server):
        conn = socket.create_connection(("127.0.0.1", port))
        started = time.monotonic()
        head = f"POST {PATH} HTTP/1.1\r\nHost: x\r\nX-Padding: ".encode() + b"a" * 100
        cut = False
        for byte in head:
            try:
                conn.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                cut = True
                break
            if closed_by_server(conn, 0.05):
                cut = True
                break
        assert cut and time.monotonic() - started < 2.5
        conn.close()


def test_a_body_that_does_not_arrive_in_time_answers_408(engine: Engine) -> None:
    """A complete head whose body stalls gets 408 and the connection is closed."""
    with (
        serving(engine, SHORT) as (port, _server),
        socket.create_connection(("127.0.0.1", port), timeout=5) as conn,
    ):
        conn.sendall(
            f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n"
            f'X-Hub-Signature-256: sha256={"0" * 64}\r\n\r\n{{"entry"'.encode()
        )
        started = time.monotonic()
        answer = conn.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert b"connection: close" in answer.lower()
        assert 0.4 < time.monotonic() - started < 3


def test_idle_keep_alive_connections_are_closed(engine: Engine) -> None:
    """After a delivery, a keep-alive connection idle for keep_alive seconds is closed."""
    with serving(engine, SHORT) as (port, _server):
        body = body_of(payload(messages_change([message("ka", 1)])))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(
                f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                f"X-Hub-Signature-256: {signed_headers(body)['X-Hub-Signature-256']}"
                "\r\n\r\n".encode()
                + body
            )
            assert conn.recv(4096).startswith(b"HTTP/1.1 200 ")
            started = time.monotonic()
            assert closed_by_server(conn, 4)
            assert 0.8 < time.monotonic() - started < 3


def test_at_the_cap_the_longest_waiting_connection_makes_room(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """At the cap the longest-waiting idle connection makes room; a delivery is served at once."""
    caplog.set_level(logging.INFO, logger="waconsent")
    limits = ServerLimits(head_timeout=30, max_connections=20, log_interval=60)
    with serving(engine, limits) as (port, server):
        most = 0

        def watch() -> None:
            nonlocal most
            while not done.is_set():
                most = max(most, len(server.server_state.connections))
                time.sleep(0.0005)

        done = threading.Event()
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            with connections(port, 60, pause=0.002) as idle:
                time.sleep(0.2)
                assert len(server.server_state.connections) == 20
                assert all(closed_by_server(conn, 1) for conn in idle[:40])
                assert not any(closed_by_server(conn, 0.01) for conn in idle[-15:])
                started = time.monotonic()
                assert deliver(port).status_code == 200
                assert time.monotonic() - started < 1
        finally:
            done.set()
            watcher.join()
        assert most <= 21  # the cap, plus the newcomer for the instant before one is closed
    capped = events_logged(caplog, "webhook.connections_capped")
    assert len(capped) == 1 and capped[0]["limit"] == 20


def test_the_production_server_settings(engine: Engine) -> None:
    """The receiver runs the guarded protocol with the default deadlines and cap."""
    config = make_config("sqlite:///unused.db")
    settings = uvicorn_config(create_app(config, engine), config)
    assert isinstance(settings.http, type) and issubclass(settings.http, _GuardedH11)
    limits = settings.http.limits
    assert (limits.head_timeout, limits.body_timeout, limits.keep_alive) == (10.0, 30.0, 30)
    assert limits.max_connections == connection_cap()
    assert settings.limit_concurrency == limits.max_connections + 1
    assert settings.timeout_keep_alive == 30


def test_throttled_logs_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    """A condition noted 1,000 times in an interval is one line; the next carries the count."""
    caplog.set_level(logging.INFO, logger="waconsent")
    now = [100.0]
    throttled = Throttled("webhook.test_condition", 60.0, clock=lambda: now[0])
    for _ in range(1000):
        throttled.note(port=1)
    now[0] += 61
    throttled.note(port=1)
    lines = events_logged(caplog, "webhook.test_condition")
    assert [line["count"] for line in lines] == [1, 1000]


# ---------------------------------------------------------------------------- descriptors

SERVER_SCRIPT = textwrap.dedent("""
    import resource, sys
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    from waconsent.config.loading import load
    from waconsent.server import serve
    from waconsent.server_limits import ServerLimits
    # production: the defaults, the cap computed from the limit of 64; else the cap forced
    # above the limit, to exhaust it
    limits = (None if sys.argv[1] == "production"
              else ServerLimits(head_timeout=1.0, max_connections=1000))
    serve(load("waconsent.toml"), limits=limits)
""")


@contextmanager
def low_descriptor_server(tmp_path: Path, mode: str) -> Iterator[tuple[int, list[str]]]:
    """`serve()` in its own process whose descriptor limit is 64; yields its port and,
    after it stopped, its log lines."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    (tmp_path / "waconsent.toml").write_text(
        f'[store]\nurl = "sqlite:///{tmp_path / "ledger.db"}"\n'
        f'[webhook]\nhost = "127.0.0.1"\nport = {port}\npath = "{PATH}"\n'
    )
    (tmp_path / "server.py").write_text(SERVER_SCRIPT)
    process = subprocess.Popen(
        [sys.executable, "server.py", mode],
        cwd=tmp_path,
        env={**os.environ, **SECRETS, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    lines: list[str] = []
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
        yield port, lines
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
        lines.extend(err.decode(errors="replace").splitlines())


def test_400_idle_connections_do_not_starve_a_delivery(tmp_path: Path) -> None:
    """400 idle connections under 64 descriptors: no EMFILE, a STOP answered 200, one log line."""
    with low_descriptor_server(tmp_path, "production") as (port, lines), connections(port, 400):
        time.sleep(0.5)
        started = time.monotonic()
        assert deliver(port).status_code == 200
        assert time.monotonic() - started < 2
    text = "\n".join(lines)
    assert "Too many open files" not in text and "out of system resource" not in text
    assert text.count('"webhook.connections_capped"') == 1
    assert text.count('"webhook.delivery"') == 1


def test_descriptor_exhaustion_is_logged_once_per_interval(tmp_path: Path) -> None:
    """Exhausted descriptors are one log line, not asyncio's traceback every second."""
    with low_descriptor_server(tmp_path, "exhaust") as (port, lines), connections(port, 200):
        time.sleep(3.5)  # several of asyncio's one-second accept retries
        deadline = time.monotonic() + 30
        while True:
            try:
                if deliver(port).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
    text = "\n".join(lines)
    assert text.count('"webhook.descriptors_exhausted"') == 1
    assert "Too many open files" not in text and "out of system resource" not in text
    assert "Traceback" not in text

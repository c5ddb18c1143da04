"""Running the receiver: uvicorn with the production settings, guarded below the ASGI app.

Connections are guarded (`ServerLimits`, `_GuardedH11`): a request head must arrive
complete within a few seconds of connecting, a body within its own deadline (408), idle
keep-alive connections are closed, and at most `max_connections` are held at once (the
oldest one still waiting for a head makes room for a new one), so a peer that opens
connections and sends nothing cannot exhaust the file descriptors. Each of these
conditions is logged once per interval with a count, never once per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType
from typing import ClassVar

import h11
import uvicorn
from sqlalchemy import Engine
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from waconsent import logs
from waconsent.config.loading import LoadedConfig
from waconsent.errors import FatalError
from waconsent.metrics import Metrics
from waconsent.server_limits import ServerLimits, Throttled
from waconsent.store.engine import open_engine
from waconsent.web import HealthHook, OnIngest, create_app, webhook_secrets

logger = logging.getLogger("waconsent.web")


class _Conditions:
    """The throttled log lines of one server."""

    def __init__(self, limits: ServerLimits) -> None:
        interval = limits.log_interval
        self.capped = Throttled("webhook.connections_capped", interval)
        self.head_timeouts = Throttled("webhook.head_timeouts", interval)
        self.descriptors = Throttled("webhook.descriptors_exhausted", interval)


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with what it lacks against stalled peers.

    uvicorn times out idle keep-alive connections only after a first response, so a peer
    that connects and sends nothing, or sends its head a byte at a time, is held for ever.
    Here every connection waiting for a request head has `head_timeout` to complete it,
    and at most `max_connections` are held: when one more arrives, the connection that has
    waited longest for a head (an idle or stalled one, never one with a request in
    progress) is closed to make room, or the new one if none is waiting. `limits` and
    `conditions` are set on a subclass per server (see `uvicorn_config`).
    """

    limits: ClassVar[ServerLimits]
    conditions: ClassVar[_Conditions]
    _head_timer: asyncio.TimerHandle | None = None
    _waiting_since: float | None = None  # loop time since which it waits for a request head

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._waiting_since = self.loop.time()
        self._start_head_timer()
        if len(self.connections) > self.limits.max_connections:
            self._make_room()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # the head is not complete yet
            if self._head_timer is None and not self.transport.is_closing():
                self._start_head_timer()  # the first byte of a keep-alive request
        else:
            self._stop_head_timer()
            self._waiting_since = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE:  # idle keep-alive: uvicorn's timer closes it
            self._waiting_since = self.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self._waiting_since = None
        super().connection_lost(exc)

    def _start_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.conditions.head_timeouts.note(seconds=self.limits.head_timeout)
            self._close_waiting()

    def _close_waiting(self) -> None:
        """Close a connection that has no request in progress (as uvicorn's keep-alive
        timeout does)."""
        self._stop_head_timer()
        self._waiting_since = None
        if not self.transport.is_closing():
            with contextlib.suppress(h11.LocalProtocolError):
                self.conn.send(h11.ConnectionClosed())
            self.transport.close()

    def _make_room(self) -> None:
        waiting = [
            c
            for c in self.connections
            if isinstance(c, _GuardedH11)
            and c._waiting_since is not None
            and not c.transport.is_closing()
        ]
        victim = min(waiting, key=lambda c: c._waiting_since or 0.0, default=self)
        self.conditions.capped.note(limit=self.limits.max_connections)
        victim._close_waiting()
        if victim is not self:
            self.connections.discard(victim)


_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class _ResourceErrorsOncePerInterval(logging.Filter):
    """asyncio logs 'socket.accept() out of system resource' with a traceback each time
    the listener is retried (every second) while descriptors are exhausted; those records
    become one `webhook.descriptors_exhausted` line per interval."""

    def __init__(self, conditions: Callable[[], _Conditions | None]) -> None:
        super().__init__()
        self.conditions = conditions

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, OSError) or error.errno not in _RESOURCE_ERRORS:
            return True
        conditions = self.conditions()
        if conditions is not None:
            conditions.descriptors.note(error=errno.errorcode.get(error.errno or 0, "?"))
        return False


_current_conditions: list[_Conditions] = []  # the newest server's, for the asyncio filter
_asyncio_filter = _ResourceErrorsOncePerInterval(
    lambda: _current_conditions[-1] if _current_conditions else None
)


def uvicorn_config(
    app: ASGIApp, config: LoadedConfig, limits: ServerLimits | None = None
) -> uvicorn.Config:
    """The production server settings; tests run the same ones on a loopback port (with
    shorter `limits` where they test the deadlines)."""
    webhook = config.settings.webhook
    limits = limits or ServerLimits()
    conditions = _Conditions(limits)
    protocol = type("GuardedH11", (_GuardedH11,), {"limits": limits, "conditions": conditions})
    _current_conditions.append(conditions)
    del _current_conditions[:-1]
    asyncio_logger = logging.getLogger("asyncio")
    if _asyncio_filter not in asyncio_logger.filters:
        asyncio_logger.addFilter(_asyncio_filter)
    return uvicorn.Config(
        app,
        host=webhook.host,
        port=webhook.port,
        http=protocol,  # h11 with head deadlines and the connection cap
        access_log=False,  # uvicorn's would print query strings; AccessLog does not
        server_header=False,
        # issue 15: the client's address is `web_guard.client_address`'s one answer (from
        # `[optin] trusted_proxies`); uvicorn rewriting it first would make X-Forwarded-For
        # count twice, and from proxies waconsent's own setting does not name
        proxy_headers=False,
        lifespan="off",
        timeout_keep_alive=limits.keep_alive,  # Meta reuses connections between deliveries
        # a backstop only: the protocol keeps connections at max_connections, so uvicorn's
        # own 503s start only if something bypassed it
        limit_concurrency=limits.max_connections + 1,
        backlog=limits.backlog,  # asyncio accepts this many at once (see accept_backlog)
        timeout_graceful_shutdown=10,
        log_config=None,  # logging is waconsent's own (`logs.configure`)
    )


def listen(host: str, port: int) -> socket.socket:
    """The listening socket; FatalError (exit 3) when the address is taken or not ours.

    Bound here rather than by uvicorn so that a taken port is a waconsent error, not
    uvicorn's `sys.exit(1)`. The protocol is named (IPPROTO_TCP) and TCP_NODELAY set on the
    listener, which accepted connections inherit: asyncio only disables Nagle on sockets
    whose `proto` says TCP, and with Nagle on, keep-alive deliveries wait ~40 ms for the
    client's delayed ACK (`socket.create_server` leaves `proto` 0).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise FatalError(
            f"cannot listen on {host}:{port} ([webhook] host/port): {exc.strerror or exc}"
        ) from None
    return sock


class _Stopped(Exception):
    """SIGTERM, turned into an exception so that serve() returns like it does for Ctrl-C."""


def _stop(_signum: int, _frame: FrameType | None) -> None:
    raise _Stopped


def serve(
    config: LoadedConfig,
    *,
    engine: Engine | None = None,
    on_ingest: OnIngest | None = None,
    limits: ServerLimits | None = None,
    health: HealthHook | None = None,
    metrics: Metrics | None = None,
) -> None:
    """Run the receiver on `[webhook] host:port` until stopped by SIGINT or SIGTERM.

    Raises ConfigError without the two WhatsApp secrets, FatalError when the address
    is taken or the store cannot be opened. On either signal uvicorn finishes the requests
    in flight (10 s at most) and this returns: uvicorn re-raises the signal once it has
    stopped, and the handler installed here turns SIGTERM into a return instead of death.
    `waconsent serve` passes its own engine (it keeps it) and an `on_ingest` hook;
    `limits` defaults to `ServerLimits()` (the deadlines and the descriptor-derived cap);
    `health` adds to `/healthz` (issue 14: the reply sender's state); `metrics` is what
    `/metrics` shows (issue 17: `serve` shares its own with the scheduler and the replies).
    """
    webhook_secrets(config)  # refuse before opening anything
    logs.configure(logging.INFO)
    webhook = config.settings.webhook
    sock = listen(webhook.host, webhook.port)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop) if in_main_thread else None
    own_engine = engine is None
    try:
        engine = engine or open_engine(config.settings.store.url)
        limits = limits or ServerLimits()
        app = create_app(
            config, engine, on_ingest=on_ingest, limits=limits, health=health, metrics=metrics
        )
        logs.event(
            logger,
            "webhook.starting",
            host=webhook.host,
            port=sock.getsockname()[1],
            path=webhook.path,
            store=engine.dialect.name,
            max_body_bytes=webhook.max_body_bytes,
        )
        uvicorn.Server(uvicorn_config(app, config, limits)).run(sockets=[sock])
    except (KeyboardInterrupt, _Stopped):
        pass
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        sock.close()
        if own_engine and engine is not None:
            engine.dispose()
        logs.event(logger, "webhook.stopped")

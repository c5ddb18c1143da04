"""The WhatsApp webhook receiver: a thin Starlette shell over `connectors.whatsapp` and the store.

Routes (the webhook path comes from `[webhook] path`):

    GET  <path>     Meta's verification handshake: echoes `hub.challenge` for the verify token
    POST <path>     a signed delivery: size-checked while streaming, signature-checked over the
                    raw bytes, parsed and committed to the ledger before the 200
    GET  /healthz   store reachability, 200 or 503 as JSON

Status codes of a POST, in the order they are decided:

    401  no `X-Hub-Signature-256` header                    (body not read)
    413  body over `webhook.max_body_bytes`                 (Content-Length, or counted while
                                                             streaming; never read whole)
    403  signature does not match `WHATSAPP_APP_SECRET`
    400  signed, but not JSON
    200  signed JSON: every update the parser understands is stored (duplicates once); the
         parts it skips are logged with their location
    503  the store cannot be reached or is busy: Meta retries later, nothing is lost

    408  the body did not arrive within `ServerLimits.body_timeout`

Connections are guarded below the ASGI app (`ServerLimits`, `_GuardedH11`): a request head
must arrive complete within a few seconds of connecting, idle keep-alive connections are
closed, and at most `max_connections` are held at once (the oldest one still waiting for
a head makes room for a new one), so a peer that opens connections and sends nothing
cannot exhaust the file descriptors. Each of these conditions is logged once per interval
with a count, never once per connection.

No answer is a 5xx because of what a payload contains; a 500 means a bug here. Logs are
one JSON object per line, never a body, a signature or an unmasked phone number; the access
log is ours (method, path without query string, status, duration), uvicorn's is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import json
import logging
import resource
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, ClassVar

import h11
import uvicorn
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from waconsent.config.loading import LoadedConfig
from waconsent.connectors.whatsapp import (
    SIGNATURE_HEADER,
    KeywordRules,
    decode_json,
    verify_signature,
)
from waconsent.domain import CONSENT_SIGNALS, Signal
from waconsent.errors import ConfigError, FatalError
from waconsent.phones import mask
from waconsent.store.engine import open_engine, reading
from waconsent.sync.ingest import IngestReport, ingest_payload, keyword_rules

logger = logging.getLogger("waconsent.web")
access_logger = logging.getLogger("waconsent.web.access")

# The two environment variables the receiver cannot start without, and where each comes from.
REQUIRED_VARIABLES = {
    "WHATSAPP_APP_SECRET": "the App Secret of your Meta app (App settings > Basic), which "
                           "signs every delivery in X-Hub-Signature-256",
    "WHATSAPP_VERIFY_TOKEN": "any string you choose and enter again as the Verify token "
                             "when you register the callback URL with Meta",
}
HEALTH_PATH = "/healthz"
SOURCE = "webhook"
RETRY_AFTER_SECONDS = "30"
MAX_SKIPS_LOGGED = 20  # a 1,000-item batch of junk logs 20 locations and a count, not 1,000 lines
LOGGED_SIGNALS = CONSENT_SIGNALS | {Signal.RESUME, Signal.NUMBER_CHANGED}
OnIngest = Callable[[IngestReport], None]

# File descriptors kept for everything but client connections: the store's pooled
# connections (SQLite holds three files each), the CRM's HTTP sessions, logs, the listener.
RESERVED_DESCRIPTORS = 128
MOST_CONNECTIONS = 2048


def _spare_descriptors() -> int | None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft - RESERVED_DESCRIPTORS


def connection_cap() -> int:
    """How many client connections to hold at once: three quarters of the descriptors left
    after `RESERVED_DESCRIPTORS`, at most `MOST_CONNECTIONS`, at least 16."""
    spare = _spare_descriptors()
    return MOST_CONNECTIONS if spare is None else max(16, min(MOST_CONNECTIONS,
                                                              spare * 3 // 4))


def accept_backlog() -> int:
    """The listen backlog, which is also how many connections asyncio accepts in one go
    before the connections closed to make room release their descriptors: the last
    quarter of the spare descriptors, so that held plus just-accepted stay below the limit."""
    spare = _spare_descriptors()
    return MOST_CONNECTIONS if spare is None else max(16, min(MOST_CONNECTIONS, spare // 4))


@dataclass(frozen=True)
class ServerLimits:
    """Deadlines and the connection cap of the receiver's HTTP server.

    Meta sends a delivery's head and body at once over a fast link; a peer that takes
    longer than these deadlines is stalled or hostile, and each second it is waited for
    holds a file descriptor.
    """

    head_timeout: float = 10.0  # connect (or a keep-alive request's first byte) to a full head
    body_timeout: float = 30.0  # a full head to the last body byte
    keep_alive: int = 30  # idle between requests on one connection (Meta reuses them)
    max_connections: int = field(default_factory=connection_cap)
    backlog: int = field(default_factory=accept_backlog)
    log_interval: float = 60.0  # a stall or exhaustion condition is logged once per this


class Throttled:
    """A condition logged at most once per interval, with how often it happened since the
    last line: a flood of stalled connections must not become a flood of log lines."""

    def __init__(self, event: str, interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.event = event
        self.interval = interval
        self.clock = clock
        self.count = 0
        self.last: float | None = None
        self.lock = threading.Lock()

    def note(self, **fields: Any) -> None:
        with self.lock:
            self.count += 1
            now = self.clock()
            if self.last is not None and now - self.last < self.interval:
                return
            count, self.count, self.last = self.count, 0, now
        log_event(self.event, logging.WARNING, count=count, per_seconds=self.interval, **fields)


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
        waiting = [c for c in self.connections if isinstance(c, _GuardedH11)
                   and c._waiting_since is not None and not c.transport.is_closing()]
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
    lambda: _current_conditions[-1] if _current_conditions else None)


def log_event(event: str, level: int = logging.INFO, target: logging.Logger = logger,
              **fields: Any) -> None:
    """One JSON object per line; callers pass only counts, locations and masked numbers."""
    if target.isEnabledFor(level):
        target.log(level, json.dumps({"event": event, **fields}, default=str))


def webhook_secrets(config: LoadedConfig) -> tuple[str, str]:
    """(app secret, verify token); both missing ones are named at once, with how to set them."""
    values = {name: config.secrets.get(name) for name in REQUIRED_VARIABLES}
    problems = [
        f"the webhook receiver needs the environment variable {name}: {purpose}; "
        f"set it (export {name}=...) and start again"
        for name, purpose in REQUIRED_VARIABLES.items() if values[name] is None
    ]
    app_secret, verify_token = values.values()
    if app_secret is None or verify_token is None:
        raise ConfigError(problems)
    return app_secret, verify_token


class _Receiver:
    """The request handlers; state is what create_app built once (no per-request set-up)."""

    def __init__(self, engine: Engine, app_secret: str, verify_token: str, max_body: int,
                 keywords: KeywordRules, on_ingest: OnIngest | None,
                 limits: ServerLimits) -> None:
        self.engine = engine
        self.body_timeout = limits.body_timeout
        self.body_timeouts = Throttled("webhook.body_timeouts", limits.log_interval)
        self.app_secret = app_secret
        self.verify_token = verify_token.encode()
        self.max_body = max_body
        self.keywords = keywords
        self.on_ingest = on_ingest
        # SQLite has one writer at a time. Queuing writers on a Python lock wakes the next
        # one the moment the previous commits; leaving it to SQLite's busy handler makes
        # them sleep in 1-100 ms steps, which is what p99 latency would show.
        self.write_lock: threading.Lock | None = (
            threading.Lock() if engine.dialect.name == "sqlite" else None)

    async def handshake(self, request: Request) -> Response:
        params = request.query_params
        token = params.get("hub.verify_token", "").encode()
        challenge = params.get("hub.challenge")
        if (params.get("hub.mode") == "subscribe" and challenge is not None
                and hmac.compare_digest(token, self.verify_token)):
            log_event("webhook.verified")
            return PlainTextResponse(challenge)
        log_event("webhook.verification_refused", logging.WARNING,  # no values: any text
                  subscribe=params.get("hub.mode") == "subscribe",
                  token_given="hub.verify_token" in params, challenge_given=challenge is not None)
        return PlainTextResponse("verification refused", status_code=403)

    async def deliver(self, request: Request) -> Response:
        signature = request.headers.get(SIGNATURE_HEADER)
        if signature is None:
            log_event("webhook.unsigned", logging.WARNING)
            return PlainTextResponse(f"missing {SIGNATURE_HEADER}", status_code=401,
                                     headers={"WWW-Authenticate": SIGNATURE_HEADER})
        raw = await self._read_body(request)
        if isinstance(raw, Response):
            return raw
        if not verify_signature(raw, signature, self.app_secret):
            log_event("webhook.forged", logging.WARNING, bytes=len(raw))
            return PlainTextResponse("signature does not match", status_code=403)
        try:
            payload = decode_json(raw)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError too
            log_event("webhook.not_json", logging.WARNING, bytes=len(raw))
            return PlainTextResponse("body is not JSON", status_code=400)
        return await run_in_threadpool(self._store, payload, len(raw))

    async def _read_body(self, request: Request) -> bytes | Response:
        """The raw bytes, or a refusal as soon as they are known to be too many."""
        declared = request.headers.get("content-length")
        if declared is not None:  # uvicorn has already refused a malformed one
            try:
                length = int(declared)
            except ValueError:
                return PlainTextResponse("bad Content-Length", status_code=400)
            if length > self.max_body:
                return self._too_large(length)
        body = bytearray()
        try:
            async with asyncio.timeout(self.body_timeout):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > self.max_body:
                        return self._too_large(len(body))
        except ClientDisconnect:
            return PlainTextResponse("client went away", status_code=400)
        except TimeoutError:  # a stalled or trickling body holds a connection: let it go
            self.body_timeouts.note(seconds=self.body_timeout)
            return PlainTextResponse("body too slow", status_code=408,
                                     headers={"Connection": "close"})
        return bytes(body)

    def _too_large(self, size: int) -> Response:
        log_event("webhook.too_large", logging.WARNING, bytes_at_least=size,
                  limit=self.max_body)
        # The rest of the body stays unread, so the connection cannot be reused.
        return PlainTextResponse(f"body over {self.max_body} bytes", status_code=413,
                                 headers={"Connection": "close"})

    def _store(self, payload: Any, size: int) -> Response:
        """Runs in a worker thread: parse and commit, then answer."""
        started = time.perf_counter()
        try:
            if self.write_lock is None:
                report = ingest_payload(self.engine, payload, self.keywords, SOURCE)
            else:
                with self.write_lock:
                    report = ingest_payload(self.engine, payload, self.keywords, SOURCE)
        except SQLAlchemyError as exc:
            # A value the store refuses never gets here: ingest skips that one item (with
            # its location) and commits the rest. What does is the store itself failing,
            # and then nothing of this delivery was committed: Meta must send it again.
            log_event("webhook.store_unavailable", logging.ERROR, error=type(exc).__name__,
                      bytes=size)
            return PlainTextResponse("store unavailable, retry later", status_code=503,
                                     headers={"Retry-After": RETRY_AFTER_SECONDS})
        except Exception as exc:  # a bug here; never the payload's fault (the parser skips)
            log_event("webhook.internal_error", logging.ERROR, error=type(exc).__name__,
                      trace=traceback.format_tb(exc.__traceback__))  # no message: may hold data
            return PlainTextResponse("internal error", status_code=500)
        self._log_report(report, size, time.perf_counter() - started)
        if self.on_ingest is not None and report.stored:
            try:
                self.on_ingest(report)
            except Exception as exc:  # the events are committed; a failing hook loses nothing
                log_event("webhook.hook_failed", logging.ERROR, error=type(exc).__name__,
                          trace=traceback.format_tb(exc.__traceback__))
        return JSONResponse({"stored": report.stored, "duplicates": report.duplicates,
                             "skipped": len(report.skipped)})

    def _log_report(self, report: IngestReport, size: int, seconds: float) -> None:
        for skipped in report.skipped[:MAX_SKIPS_LOGGED]:
            log_event("webhook.item_skipped", logging.WARNING, where=skipped.location,
                      reason=skipped.reason)
        if len(report.skipped) > MAX_SKIPS_LOGGED:
            log_event("webhook.items_skipped_more", logging.WARNING,
                      count=len(report.skipped) - MAX_SKIPS_LOGGED)
        if logger.isEnabledFor(logging.INFO):
            for event in report.events:
                if event.signal in LOGGED_SIGNALS:
                    log_event("webhook.signal", signal=event.signal.value, kind=event.kind.value,
                              wa_id=mask(event.wa_id) if event.wa_id else None,
                              key=_masked_key(event.key))
        log_event("webhook.delivery", bytes=size, events=len(report.events),
                  stored=report.stored, duplicates=report.duplicates,
                  skipped=len(report.skipped), store_ms=round(seconds * 1000, 2))

    async def health(self, request: Request) -> Response:
        try:
            await run_in_threadpool(self._ping)
        except SQLAlchemyError as exc:
            log_event("webhook.health_failed", logging.WARNING, error=type(exc).__name__)
            return JSONResponse({"status": "unavailable", "store": "unreachable"},
                                status_code=503)
        return JSONResponse({"status": "ok", "store": "reachable",
                             "dialect": self.engine.dialect.name})

    def _ping(self) -> None:
        with reading(self.engine) as connection:
            connection.execute(text("SELECT 1"))


def _masked_key(key: str) -> str:
    """Preference keys embed the wa_id (`pref:<wa_id>:<value>:<time>`); mask that part."""
    kind, _, rest = key.partition(":")
    if kind != "pref":
        return key
    who, _, tail = rest.partition(":")
    return f"pref:{mask(who)}:{tail}"


class AccessLog:
    """ASGI middleware: method, path without query string, status, duration; nothing else.

    Paths other than the app's own are logged as `(other)`: a scanner's path could be
    anything, a phone number included.
    """

    def __init__(self, app: ASGIApp, paths: frozenset[str]) -> None:
        self.app = app
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client sees if the app fails before starting a response

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            log_event("http.access", target=access_logger, method=scope["method"],
                      path=scope["path"] if scope["path"] in self.paths else "(other)",
                      status=status,
                      ms=round((time.perf_counter() - started) * 1000, 2))


def create_app(config: LoadedConfig, engine: Engine, *,
               on_ingest: OnIngest | None = None,
               limits: ServerLimits | None = None) -> Starlette:
    """The receiver as an ASGI app over an open engine; raises ConfigError without its secrets.

    `on_ingest` (optional) is called in a worker thread after a delivery that stored new
    events was committed, e.g. for `waconsent serve` to start a targeted write-back of a
    revocation; its failures are logged and do not change the answer. `limits` gives the
    body deadline (the default `ServerLimits` in production).
    """
    app_secret, verify_token = webhook_secrets(config)
    webhook = config.settings.webhook
    receiver = _Receiver(engine, app_secret, verify_token, webhook.max_body_bytes,
                         keyword_rules(config.settings), on_ingest, limits or ServerLimits())
    app = Starlette(routes=[
        Route(webhook.path, receiver.handshake, methods=["GET"]),
        Route(webhook.path, receiver.deliver, methods=["POST"]),
        Route(HEALTH_PATH, receiver.health, methods=["GET"]),
    ])
    app.add_middleware(AccessLog, paths=frozenset({webhook.path, HEALTH_PATH}))
    return app


def uvicorn_config(app: ASGIApp, config: LoadedConfig,
                   limits: ServerLimits | None = None) -> uvicorn.Config:
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
        http=protocol,             # h11 with head deadlines and the connection cap
        access_log=False,          # uvicorn's would print query strings; AccessLog does not
        server_header=False,
        proxy_headers=True,        # trusts X-Forwarded-* only from FORWARDED_ALLOW_IPS
        lifespan="off",
        timeout_keep_alive=limits.keep_alive,  # Meta reuses connections between deliveries
        # a backstop only: the protocol keeps connections at max_connections, so uvicorn's
        # own 503s start only if something bypassed it
        limit_concurrency=limits.max_connections + 1,
        backlog=limits.backlog,    # asyncio accepts this many at once (see accept_backlog)
        timeout_graceful_shutdown=10,
        log_config=None,           # leave logging set-up to the caller (see ensure_logging)
    )


def ensure_logging() -> None:
    """Print INFO events to stderr when nobody (the CLI, a test) configured logging."""
    root = logging.getLogger()
    package = logging.getLogger("waconsent")
    if root.handlers or package.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("waconsent", "uvicorn"):
        named = logging.getLogger(name)
        named.addHandler(handler)
        named.setLevel(logging.INFO)
        named.propagate = False


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
        raise FatalError(f"cannot listen on {host}:{port} ([webhook] host/port): "
                         f"{exc.strerror or exc}") from None
    return sock


class _Stopped(Exception):
    """SIGTERM, turned into an exception so that serve() returns like it does for Ctrl-C."""


def _stop(_signum: int, _frame: FrameType | None) -> None:
    raise _Stopped


def serve(config: LoadedConfig, *, engine: Engine | None = None,
          on_ingest: OnIngest | None = None, limits: ServerLimits | None = None) -> None:
    """Run the receiver on `[webhook] host:port` until stopped by SIGINT or SIGTERM.

    Raises ConfigError without the two WhatsApp secrets, FatalError when the address
    is taken or the store cannot be opened. On either signal uvicorn finishes the requests
    in flight (10 s at most) and this returns: uvicorn re-raises the signal once it has
    stopped, and the handler installed here turns SIGTERM into a return instead of death.
    `waconsent serve` passes its own engine (it keeps it) and an `on_ingest` hook;
    `limits` defaults to `ServerLimits()` (the deadlines and the descriptor-derived cap).
    """
    webhook_secrets(config)  # refuse before opening anything
    ensure_logging()
    webhook = config.settings.webhook
    sock = listen(webhook.host, webhook.port)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop) if in_main_thread else None
    own_engine = engine is None
    try:
        engine = engine or open_engine(config.settings.store.url)
        limits = limits or ServerLimits()
        app = create_app(config, engine, on_ingest=on_ingest, limits=limits)
        log_event("webhook.starting", host=webhook.host, port=sock.getsockname()[1],
                  path=webhook.path, store=engine.dialect.name,
                  max_body_bytes=webhook.max_body_bytes)
        uvicorn.Server(uvicorn_config(app, config, limits)).run(sockets=[sock])
    except (KeyboardInterrupt, _Stopped):
        pass
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        sock.close()
        if own_engine and engine is not None:
            engine.dispose()
        log_event("webhook.stopped")

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

No answer is a 5xx because of what a payload contains; a 500 means a bug here. Logs are
one JSON object per line, never a body, a signature or an unmasked phone number; the access
log is ours (method, path without query string, status, duration), uvicorn's is off.
"""

from __future__ import annotations

import hmac
import json
import logging
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from sqlalchemy import Engine, text
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from waconsent.config.loading import LoadedConfig
from waconsent.connectors.whatsapp import SIGNATURE_HEADER, KeywordRules, verify_signature
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
                 keywords: KeywordRules, on_ingest: OnIngest | None) -> None:
        self.engine = engine
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
            payload = json.loads(raw)
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
            async for chunk in request.stream():
                body += chunk
                if len(body) > self.max_body:
                    return self._too_large(len(body))
        except ClientDisconnect:
            return PlainTextResponse("client went away", status_code=400)
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
        except (DataError, IntegrityError) as exc:
            # The store refuses a value in this payload (a field longer than its column, a
            # NUL byte on PostgreSQL). Retrying cannot heal it, and a non-200 would make Meta
            # redeliver it for days, so it is answered 200 and logged loudly.
            log_event("webhook.unstorable", logging.ERROR, error=type(exc.orig).__name__,
                      bytes=size)
            return JSONResponse({"stored": 0, "refused_by_store": True})
        except SQLAlchemyError as exc:
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
               on_ingest: OnIngest | None = None) -> Starlette:
    """The receiver as an ASGI app over an open engine; raises ConfigError without its secrets.

    `on_ingest` (optional) is called in a worker thread after a delivery that stored new
    events was committed, e.g. for `waconsent serve` to start a targeted write-back of a
    revocation; its failures are logged and do not change the answer.
    """
    app_secret, verify_token = webhook_secrets(config)
    webhook = config.settings.webhook
    receiver = _Receiver(engine, app_secret, verify_token, webhook.max_body_bytes,
                         keyword_rules(config.settings), on_ingest)
    app = Starlette(routes=[
        Route(webhook.path, receiver.handshake, methods=["GET"]),
        Route(webhook.path, receiver.deliver, methods=["POST"]),
        Route(HEALTH_PATH, receiver.health, methods=["GET"]),
    ])
    app.add_middleware(AccessLog, paths=frozenset({webhook.path, HEALTH_PATH}))
    return app


def uvicorn_config(app: ASGIApp, config: LoadedConfig) -> uvicorn.Config:
    """The production server settings; tests run the same ones on a loopback port."""
    webhook = config.settings.webhook
    return uvicorn.Config(
        app,
        host=webhook.host,
        port=webhook.port,
        access_log=False,          # uvicorn's would print query strings; AccessLog does not
        server_header=False,
        proxy_headers=True,        # trusts X-Forwarded-* only from FORWARDED_ALLOW_IPS
        lifespan="off",
        timeout_keep_alive=30,     # Meta reuses connections between deliveries
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
          on_ingest: OnIngest | None = None) -> None:
    """Run the receiver on `[webhook] host:port` until stopped by SIGINT or SIGTERM.

    Raises ConfigError without the two WhatsApp secrets, FatalError when the address
    is taken or the store cannot be opened. On either signal uvicorn finishes the requests
    in flight (10 s at most) and this returns: uvicorn re-raises the signal once it has
    stopped, and the handler installed here turns SIGTERM into a return instead of death.
    `waconsent serve` passes its own engine (it keeps it) and an `on_ingest` hook.
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
        app = create_app(config, engine, on_ingest=on_ingest)
        log_event("webhook.starting", host=webhook.host, port=sock.getsockname()[1],
                  path=webhook.path, store=engine.dialect.name,
                  max_body_bytes=webhook.max_body_bytes)
        uvicorn.Server(uvicorn_config(app, config)).run(sockets=[sock])
    except (KeyboardInterrupt, _Stopped):
        pass
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        sock.close()
        if own_engine and engine is not None:
            engine.dispose()
        log_event("webhook.stopped")

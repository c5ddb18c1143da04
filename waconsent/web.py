"""The WhatsApp webhook receiver: a thin Starlette shell over `connectors.whatsapp` and the store.

Routes (the webhook path comes from `[webhook] path`):

    GET  <path>     Meta's verification handshake: echoes `hub.challenge` for the verify token
    POST <path>     a signed delivery: size-checked while streaming, signature-checked over the
                    raw bytes, parsed and committed to the ledger before the 200
    GET  /healthz   store reachability, 200 or 503 as JSON (under `serve`, also whether the
                    replies are being sent: a rejected token is "degraded", still 200)
    GET  /metrics   Prometheus text format (`waconsent.metrics`): every outcome below counted

Status codes of a POST, in the order they are decided:

    401  no `X-Hub-Signature-256` header                    (body not read)
    413  body over `webhook.max_body_bytes`                 (Content-Length, or counted while
                                                             streaming; never read whole)
    403  signature does not match `WHATSAPP_APP_SECRET`
    400  signed, but not JSON
    200  signed JSON: every update the parser understands is stored (duplicates once); the
         parts it skips are logged with their location
    503  the store cannot be reached or is busy: Meta retries later, nothing is lost

    408  the body did not arrive within `ServerLimits.body_timeout` (see `server`)

No answer is a 5xx because of what a payload contains; a 500 means a bug here. Logs are
one JSON object per line, never a body, a signature or an unmasked phone number; the access
log is ours (method, path without query string, status, duration), uvicorn's is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from waconsent import logs
from waconsent.config.loading import LoadedConfig
from waconsent.connectors.webhook_signature import SIGNATURE_HEADER, decode_json, verify_signature
from waconsent.consent_api import consent_routes
from waconsent.errors import ConfigError
from waconsent.keywords import KeywordRules
from waconsent.metrics import CONTENT_TYPE, Metrics
from waconsent.optin_web import optin_routes
from waconsent.replies.policy import reply_policy
from waconsent.replies.rules import ReplyPolicy
from waconsent.server_limits import ServerLimits, Throttled
from waconsent.store.engine import reading
from waconsent.sync.ingest import IngestReport, ingest_payload, keyword_rules
from waconsent.web_guard import OverLimit, read_capped
from waconsent.web_logs import AccessLog, log_delivery

logger = logging.getLogger("waconsent.web")

# The two environment variables the receiver cannot start without, and where each comes from.
REQUIRED_VARIABLES = {
    "WHATSAPP_APP_SECRET": "the App Secret of your Meta app (App settings > Basic), which "
    "signs every delivery in X-Hub-Signature-256",
    "WHATSAPP_VERIFY_TOKEN": "any string you choose and enter again as the Verify token "
    "when you register the callback URL with Meta",
}
HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"
SOURCE = "webhook"
RETRY_AFTER_SECONDS = "30"
OnIngest = Callable[[IngestReport], None]
#: issue 14: more of `/healthz` (the reply sender's state); "stopped" makes it "degraded"
HealthHook = Callable[[], dict[str, Any]]


def webhook_secrets(config: LoadedConfig) -> tuple[str, str]:
    """(app secret, verify token); both missing ones are named at once, with how to set them."""
    values = {name: config.secrets.get(name) for name in REQUIRED_VARIABLES}
    problems = [
        f"the webhook receiver needs the environment variable {name}: {purpose}; "
        f"set it (export {name}=...) and start again"
        for name, purpose in REQUIRED_VARIABLES.items()
        if values[name] is None
    ]
    app_secret, verify_token = values.values()
    if app_secret is None or verify_token is None:
        raise ConfigError(problems)
    return app_secret, verify_token


class _Receiver:
    """The request handlers; state is what create_app built once (no per-request set-up)."""

    def __init__(
        self,
        engine: Engine,
        app_secret: str,
        verify_token: str,
        max_body: int,
        keywords: KeywordRules,
        on_ingest: OnIngest | None,
        limits: ServerLimits,
        replies: ReplyPolicy | None = None,
        health_hook: HealthHook | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics or Metrics()  # issue 17
        self.replies = replies  # issue 14
        self.health_hook = health_hook  # issue 14
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
            threading.Lock() if engine.dialect.name == "sqlite" else None
        )

    async def handshake(self, request: Request) -> Response:
        params = request.query_params
        token = params.get("hub.verify_token", "").encode()
        challenge = params.get("hub.challenge")
        if (
            params.get("hub.mode") == "subscribe"
            and challenge is not None
            and hmac.compare_digest(token, self.verify_token)
        ):
            logs.event(logger, "webhook.verified")
            return PlainTextResponse(challenge)
        logs.event(
            logger,
            "webhook.verification_refused",
            logging.WARNING,  # no values: any text
            subscribe=params.get("hub.mode") == "subscribe",
            token_given="hub.verify_token" in params,
            challenge_given=challenge is not None,
        )
        return PlainTextResponse("verification refused", status_code=403)

    async def deliver(self, request: Request) -> Response:
        signature = request.headers.get(SIGNATURE_HEADER)
        if signature is None:
            logs.event(logger, "webhook.unsigned", logging.WARNING)
            self.metrics.delivery("refused_unsigned")
            return PlainTextResponse(
                f"missing {SIGNATURE_HEADER}",
                status_code=401,
                headers={"WWW-Authenticate": SIGNATURE_HEADER},
            )
        raw = await self._read_body(request)
        if isinstance(raw, Response):
            return raw
        if not verify_signature(raw, signature, self.app_secret):
            logs.event(logger, "webhook.forged", logging.WARNING, bytes=len(raw))
            self.metrics.delivery("refused_signature")
            return PlainTextResponse("signature does not match", status_code=403)
        try:
            payload = decode_json(raw)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError too
            logs.event(logger, "webhook.not_json", logging.WARNING, bytes=len(raw))
            self.metrics.delivery("bad_json")
            return PlainTextResponse("body is not JSON", status_code=400)
        return await run_in_threadpool(self._store, payload, len(raw))

    async def _read_body(self, request: Request) -> bytes | Response:
        """The raw bytes, or a refusal as soon as they are known to be too many."""
        declared = request.headers.get("content-length")
        if declared is not None:  # uvicorn has already refused a malformed one
            try:
                length = int(declared)
            except ValueError:
                self.metrics.delivery("bad_request")
                return PlainTextResponse("bad Content-Length", status_code=400)
            if length > self.max_body:
                return self._too_large(length)
        try:
            async with asyncio.timeout(self.body_timeout):
                body = await read_capped(request, self.max_body)
        except ClientDisconnect:
            self.metrics.delivery("bad_request")
            return PlainTextResponse("client went away", status_code=400)
        except TimeoutError:  # a stalled or trickling body holds a connection: let it go
            self.body_timeouts.note(seconds=self.body_timeout)
            self.metrics.delivery("too_slow")
            return PlainTextResponse(
                "body too slow", status_code=408, headers={"Connection": "close"}
            )
        return self._too_large(body.size) if isinstance(body, OverLimit) else body

    def _too_large(self, size: int) -> Response:
        logs.event(
            logger, "webhook.too_large", logging.WARNING, bytes_at_least=size, limit=self.max_body
        )
        self.metrics.delivery("too_large")
        # The rest of the body stays unread, so the connection cannot be reused.
        return PlainTextResponse(
            f"body over {self.max_body} bytes", status_code=413, headers={"Connection": "close"}
        )

    def _store(self, payload: Any, size: int) -> Response:
        """Runs in a worker thread: parse and commit, then answer."""
        started = time.perf_counter()
        try:
            with self.write_lock or contextlib.nullcontext():
                report = ingest_payload(
                    self.engine, payload, self.keywords, SOURCE, replies=self.replies
                )
        except SQLAlchemyError as exc:
            # A value the store refuses never gets here: ingest skips that one item (with
            # its location) and commits the rest. What does is the store itself failing,
            # and then nothing of this delivery was committed: Meta must send it again.
            logs.event(
                logger,
                "webhook.store_unavailable",
                logging.ERROR,
                error=type(exc).__name__,
                bytes=size,
            )
            self.metrics.delivery("failed")
            return PlainTextResponse(
                "store unavailable, retry later",
                status_code=503,
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )
        except Exception as exc:  # noqa: BLE001 - a bug here; never the payload's fault (the parser skips)
            logs.event(
                logger,
                "webhook.internal_error",
                logging.ERROR,
                error=type(exc).__name__,
                trace=traceback.format_tb(exc.__traceback__),
            )  # no message: may hold data
            self.metrics.delivery("error")
            return PlainTextResponse("internal error", status_code=500)
        seconds = time.perf_counter() - started
        log_delivery(report, size, seconds)
        self.metrics.delivered(report, seconds)
        if self.on_ingest is not None and report.stored:
            try:
                self.on_ingest(report)
            except Exception as exc:  # noqa: BLE001 - the events are committed; a failing hook loses nothing
                logs.event(
                    logger,
                    "webhook.hook_failed",
                    logging.ERROR,
                    error=type(exc).__name__,
                    trace=traceback.format_tb(exc.__traceback__),
                )
        return JSONResponse(
            {
                "stored": report.stored,
                "duplicates": report.duplicates,
                "skipped": len(report.skipped),
            }
        )

    async def health(self, request: Request) -> Response:
        try:
            await run_in_threadpool(self._ping)
        except SQLAlchemyError as exc:
            logs.event(logger, "webhook.health_failed", logging.WARNING, error=type(exc).__name__)
            return JSONResponse({"status": "unavailable", "store": "unreachable"}, status_code=503)
        answer: dict[str, Any] = {
            "status": "ok",
            "store": "reachable",
            "dialect": self.engine.dialect.name,
        }
        if self.health_hook is not None:  # issue 14: a stopped reply sender is "degraded",
            answer.update(self.health_hook())  # but 200: deliveries are still stored
            if answer.get("replies") == "stopped":
                answer["status"] = "degraded"
        return JSONResponse(answer)

    async def scrape(self, request: Request) -> Response:
        """Issue 17: the Prometheus text; the store's gauges are read in a worker thread."""
        body = await run_in_threadpool(self.metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE)

    def _ping(self) -> None:
        with reading(self.engine) as connection:
            connection.execute(text("SELECT 1"))


def create_app(
    config: LoadedConfig,
    engine: Engine,
    *,
    on_ingest: OnIngest | None = None,
    limits: ServerLimits | None = None,
    health: HealthHook | None = None,
    metrics: Metrics | None = None,
) -> Starlette:
    """The receiver as an ASGI app over an open engine; raises ConfigError without its secrets.

    `on_ingest` (optional) is called in a worker thread after a delivery that stored new
    events was committed, e.g. for `waconsent serve` to start a targeted write-back of a
    revocation; its failures are logged and do not change the answer. `limits` gives the
    body deadline (the default `ServerLimits` in production). `health` adds to `/healthz`
    (issue 14: the reply sender's state). `metrics` (issue 17): `serve` passes the one its
    scheduler and reply sender also count into; by default the app makes its own.
    """
    app_secret, verify_token = webhook_secrets(config)
    webhook = config.settings.webhook
    metrics = metrics or Metrics(engine, config.settings.crm_name)  # issue 17
    receiver = _Receiver(
        engine,
        app_secret,
        verify_token,
        webhook.max_body_bytes,
        keyword_rules(config.settings),
        on_ingest,
        limits or ServerLimits(),
        replies=reply_policy(config.settings),
        health_hook=health,
        metrics=metrics,
    )
    app = Starlette(
        routes=[
            Route(webhook.path, receiver.handshake, methods=["GET"]),
            Route(webhook.path, receiver.deliver, methods=["POST"]),
            Route(HEALTH_PATH, receiver.health, methods=["GET"]),
            Route(METRICS_PATH, receiver.scrape, methods=["GET"]),  # issue 17
            *consent_routes(config, engine),  # issue 16: only while WACONSENT_API_TOKEN is set
        ]
    )
    app.routes.extend(optin_routes(config, engine))  # issue 15: none unless [optin] enabled
    app.add_middleware(AccessLog, paths=frozenset({webhook.path, HEALTH_PATH, METRICS_PATH}))
    return app

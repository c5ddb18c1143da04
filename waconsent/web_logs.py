"""What the receiver logs: one line per delivery and one per HTTP request.

Apart from `web` so that the request handlers read as what they answer; the logger names
stay `waconsent.web` and `waconsent.web.access`, which operators filter on. Never a body, a
signature or an unmasked phone number.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from waconsent import logs
from waconsent.domain import CONSENT_SIGNALS, Signal
from waconsent.phones import mask
from waconsent.sync.ingest import IngestReport

logger = logging.getLogger("waconsent.web")
access_logger = logging.getLogger("waconsent.web.access")

MAX_SKIPS_LOGGED = 20  # a 1,000-item batch of junk logs 20 locations and a count, not 1,000 lines
LOGGED_SIGNALS = CONSENT_SIGNALS | {Signal.RESUME, Signal.NUMBER_CHANGED}


def log_delivery(report: IngestReport, size: int, seconds: float) -> None:
    """One line per delivery; skipped items (at most MAX_SKIPS_LOGGED, then a count), and
    each consent signal and website opt-in confirmation with its number masked."""
    for skipped in report.skipped[:MAX_SKIPS_LOGGED]:
        logs.event(
            logger,
            "webhook.item_skipped",
            logging.WARNING,
            where=skipped.location,
            reason=skipped.reason,
        )
    if len(report.skipped) > MAX_SKIPS_LOGGED:
        logs.event(
            logger,
            "webhook.items_skipped_more",
            logging.WARNING,
            count=len(report.skipped) - MAX_SKIPS_LOGGED,
        )
    if logger.isEnabledFor(logging.INFO):
        for event in report.events:
            if event.signal in LOGGED_SIGNALS:
                logs.event(
                    logger,
                    "webhook.signal",
                    signal=event.signal.value,
                    kind=event.kind.value,
                    wa_id=mask(event.wa_id) if event.wa_id else None,
                    key=_masked_key(event.key),
                )
    for confirmation in report.optin:  # issue 15: unknown, used, expired, mismatched too
        logs.event(
            logger,
            "webhook.optin",
            outcome=confirmation.outcome,
            wa_id=mask(confirmation.wa_id) if confirmation.wa_id else None,
        )
    logs.event(
        logger,
        "webhook.delivery",
        bytes=size,
        events=len(report.events),
        stored=report.stored,
        duplicates=report.duplicates,
        acknowledged=report.acknowledged,
        replies_queued=report.replies_queued,
        replies_settled=report.replies_settled,
        skipped=len(report.skipped),
        store_ms=round(seconds * 1000, 2),
    )


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
            logs.event(
                access_logger,
                "http.access",
                method=scope["method"],
                path=scope["path"] if scope["path"] in self.paths else "(other)",
                status=status,
                ms=round((time.perf_counter() - started) * 1000, 2),
            )

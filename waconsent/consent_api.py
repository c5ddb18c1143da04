"""The consent API for sending tools (issue 16), on the receiver's port.

    GET  /v1/consent/{number or user id}[?purpose=marketing|service]
    POST /v1/consent/check   {"numbers": [...up to 1,000], "purpose": "marketing"|"service"}

Both answer what `waconsent audience check` answers (`consent_check.ConsentChecker`):
`may_send`, `reason`, `session_open_until`, `records`. The routes exist only while
`WACONSENT_API_TOKEN` is set (otherwise 404). Status codes, in the order they are decided:

    429  this client asked more than `[api] rate_per_minute` times in the last minute
         (a POST counts once, however many numbers it carries)
    401  no `Authorization: Bearer ...`          403  a token that is not the API token
    413  a body over 256 KiB, or more than 1,000 numbers
    400  a body that is not JSON                 422  JSON of the wrong shape, a bad purpose
    503  the store cannot be reached
    200  the answers, in the order asked

The guards are `web_guard`'s (constant-time token, client address behind trusted proxies,
per-client sliding minute). Numbers are logged masked, never whole.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from waconsent import logs
from waconsent.config.loading import LoadedConfig
from waconsent.consent_check import ConsentChecker
from waconsent.domain import jsonable
from waconsent.phones import mask
from waconsent.sync.audience import MARKETING, PURPOSES, Answer
from waconsent.web_guard import (
    API_TOKEN_VARIABLE,
    OverLimit,
    PerClientLimit,
    api_refusal,
    bearer_outcome,
    client_address,
    json_error,
    read_capped,
    too_many,
    trusted_networks,
)

logger = logging.getLogger("waconsent.consent_api")
PREFIX = "/v1/consent"
MAX_NUMBERS = 1_000
MAX_BODY = 256 * 1024
MAX_VALUE = 200  # characters of one number or user id
#: on SQLite, a check of this many numbers or fewer runs on the event loop, not in a thread
INLINE_UP_TO = 10


def consent_routes(
    config: LoadedConfig,
    engine: Engine,
    *,
    monotonic: Callable[[], float] = time.monotonic,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> list[Route]:
    """The API's routes, or none (every path 404) while WACONSENT_API_TOKEN is unset."""
    token = config.secrets.get(API_TOKEN_VARIABLE)
    if token is None:
        return []
    settings = config.settings
    api = _ConsentApi(
        ConsentChecker(engine, settings.crm_name, settings.mapping.default_region),
        token,
        PerClientLimit(settings.api.rate_per_minute),
        trusted_networks(settings.api.trusted_proxies),
        monotonic,
        now,
    )
    return [
        Route(f"{PREFIX}/check", api.check_many, methods=["POST"]),
        Route(PREFIX + "/{who}", api.check_one, methods=["GET"]),
    ]


def _body(value: str, answer: Answer, purpose: str) -> dict[str, Any]:
    return {
        "number": value,
        "purpose": purpose,
        "may_send": answer.may_send,
        "reason": answer.reason,
        "session_open_until": jsonable(answer.session_open_until),
        "records": list(answer.records),
    }


class _ConsentApi:
    def __init__(
        self,
        checker: ConsentChecker,
        token: str,
        limit: PerClientLimit,
        trusted: Sequence[Any],
        monotonic: Callable[[], float],
        now: Callable[[], datetime],
    ) -> None:
        self.checker = checker
        self.token = token
        self.limit = limit
        self.trusted = trusted
        self.monotonic = monotonic
        self.now = now
        # A short check on SQLite (~0.7 ms of CPU, the GIL held for nearly all of it) runs
        # on the event loop: a thread buys it no parallelism. In worker threads at 500 GETs/s
        # the server ran 33 threads whose SQLite calls each gave up the GIL and waited to win
        # it back from the busy loop, the pool opened and closed ~1,000 overflow connections
        # in 22 s (their garbage set off full GC passes of 70-90 ms), and the handler's p99
        # was 80-140 ms against 2-3 ms inline. PostgreSQL waits on the network: it keeps the
        # thread, and so does a POST of many numbers.
        self.inline = checker.engine.dialect.name == "sqlite"

    def _guard(self, request: Request) -> Response | None:
        """Rate limit first (so guessing the token is throttled too), then the token."""
        peer = request.client.host if request.client else None
        client = client_address(peer, request.headers.get("x-forwarded-for"), self.trusted)
        retry_after = self.limit.admit(client, self.monotonic())
        if retry_after is not None:
            logs.event(logger, "consent_api.throttled", logging.WARNING, retry_after=retry_after)
            return too_many(retry_after)
        outcome = bearer_outcome(request.headers.get("authorization"), self.token)
        if outcome != "ok":
            logs.event(logger, "consent_api.refused", logging.WARNING, outcome=outcome)
        return api_refusal(outcome)

    async def check_one(self, request: Request) -> Response:
        refusal = self._guard(request)
        if refusal is not None:
            return refusal
        purpose = request.query_params.get("purpose", MARKETING)
        if purpose not in PURPOSES:
            return json_error(422, f"purpose must be one of {', '.join(PURPOSES)}")
        who = request.path_params["who"][:MAX_VALUE]
        answers = await self._check([who], purpose)
        if isinstance(answers, Response):
            return answers
        logs.event(
            logger,
            "consent_api.check",
            numbers=1,
            purpose=purpose,
            number=mask(who),
            reason=answers[0].reason,
        )
        return JSONResponse(_body(who, answers[0], purpose))

    async def check_many(self, request: Request) -> Response:
        refusal = self._guard(request)
        if refusal is not None:
            return refusal
        parsed = await self._read(request)
        if isinstance(parsed, Response):
            return parsed
        numbers, purpose = parsed
        answers = await self._check(numbers, purpose)
        if isinstance(answers, Response):
            return answers
        logs.event(
            logger,
            "consent_api.check",
            numbers=len(numbers),
            purpose=purpose,
            allowed=sum(a.may_send for a in answers),
        )
        return JSONResponse(
            {
                "purpose": purpose,
                "results": [
                    _body(value, answer, purpose)
                    for value, answer in zip(numbers, answers, strict=True)
                ],
            }
        )

    async def _read(self, request: Request) -> tuple[list[str], str] | Response:
        raw = await read_capped(request, MAX_BODY)
        if isinstance(raw, OverLimit):
            return json_error(
                413, f"body over {MAX_BODY} bytes; send at most {MAX_NUMBERS} numbers per request"
            )
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            return json_error(400, "body is not JSON")
        problem = _check_request(body)
        if problem is not None:
            return json_error(*problem)
        return body["numbers"], body.get("purpose", MARKETING)

    async def _check(self, values: list[str], purpose: str) -> list[Answer] | Response:
        try:
            if self.inline and len(values) <= INLINE_UP_TO:
                return self.checker.check(values, purpose, self.now())
            return await run_in_threadpool(self.checker.check, values, purpose, self.now())
        except SQLAlchemyError as exc:
            logs.event(
                logger, "consent_api.store_unavailable", logging.ERROR, error=type(exc).__name__
            )
            return json_error(503, "store unavailable, retry later", headers={"Retry-After": "5"})


def _check_request(body: Any) -> tuple[int, str] | None:
    """(status, what to fix) for a body that is no check request, else None."""
    if not isinstance(body, dict) or not isinstance(body.get("numbers"), list):
        return 422, ('expected {"numbers": ["+49151...", ...], "purpose": "marketing" | "service"}')
    numbers, purpose = body["numbers"], body.get("purpose", MARKETING)
    if purpose not in PURPOSES:
        return 422, f"purpose must be one of {', '.join(PURPOSES)}"
    if len(numbers) > MAX_NUMBERS:
        return 413, f"{len(numbers)} numbers; at most {MAX_NUMBERS} per request: split the list"
    if not all(isinstance(n, str) and len(n) <= MAX_VALUE for n in numbers):
        return 422, (
            f"every number must be a string of at most {MAX_VALUE} characters (a "
            "number in any spelling, or a WhatsApp user id)"
        )
    return None

"""The website opt-in's routes (issue 15), on the webhook receiver's port when `[optin]
enabled`; a thin shell over `store.optin` and `optin_page`, guarded by `web_guard`.

    GET     <path>              the self-contained page: wording, box, optional number, button
    POST    <path>              a request: JSON or form-encoded (`form`, optional `phone`,
                                `page`; `client_ip` only with the API token) -> 201 JSON
                                {"token", "link", "qr_svg_url", "expires_at"}, or for the
                                form-encoded post of the page an HTML page with link and QR
    OPTIONS <path>              CORS preflight: the configured origins only
    GET     <path>/<token>.svg  the QR code of an open request's link (404 otherwise)

Refusals of a POST, in order: 413 over 16 KiB, 415 neither JSON nor form-encoded, 400
malformed, 401/403 a `client_ip` without the right `Authorization: Bearer
$WACONSENT_API_TOKEN`, 429 over `rate_per_minute` for the client's address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote

from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from waconsent import logs
from waconsent.config.loading import LoadedConfig
from waconsent.config.optin import FORM_ID, business_of, keyword_of
from waconsent.domain import jsonable
from waconsent.optin_page import answer_page, form_page, qr_svg, security_headers
from waconsent.phones import UnparseablePhone, phone_key
from waconsent.store import optin as optin_store
from waconsent.web_guard import (
    API_TOKEN_VARIABLE,
    OverLimit,
    PerClientLimit,
    api_refusal,
    bearer_outcome,
    client_address,
    is_trusted,
    json_error,
    read_capped,
    too_many,
    trusted_networks,
)

logger = logging.getLogger("waconsent.optin")
MAX_BODY = 16 * 1024
BODY_TIMEOUT = 10.0
MAX_FIELDS = 20
TOKEN_IN_PATH = re.compile(r"[a-z2-7]{32}")
Clock = Callable[[], datetime]


class Refused(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


def _bad(message: str, status: int = 400) -> Refused:
    return Refused(json_error(status, message))


def _ip_or_none(address: str) -> str | None:
    try:
        return str(ipaddress.ip_address(address.strip().strip("[]")))
    except ValueError:
        return None  # e.g. a test client's name: no IP is better than a wrong one


class OptinSite:
    """The handlers; everything is built once from the configuration."""

    def __init__(self, config: LoadedConfig, engine: Engine, clock: Clock) -> None:
        settings = config.settings
        self.optin = settings.optin
        self.engine = engine
        self.clock = clock
        self.api_token = config.secrets.get(API_TOKEN_VARIABLE)
        self.trusted = trusted_networks(self.optin.trusted_proxies)
        self.limit = PerClientLimit(self.optin.rate_per_minute)
        self.region = settings.mapping.default_region
        self.keyword = keyword_of(settings)
        self.business = business_of(settings)
        self.wording = self.optin.wording.replace("{business}", self.business)
        self.origins = frozenset(self.optin.allowed_origins)
        # The page and its headers depend on the configuration only: built once, not per GET.
        self.headers = security_headers(self.optin.allowed_origins)
        self.form = form_page(
            action=self.optin.path,
            business=self.business,
            wording=self.wording,
            form_id=self.optin.form_id,
        )

    def routes(self) -> list[Route]:
        path = self.optin.path
        return [
            Route(path, self.page, methods=["GET"]),
            Route(path, self.create, methods=["POST"]),
            Route(path, self.preflight, methods=["OPTIONS"]),
            Route(path + "/{token}.svg", self.qr, methods=["GET"]),
        ]

    def link(self, token: str) -> str:
        return (
            f"https://wa.me/{self.optin.business_number}"
            f"?text={quote(f'{self.keyword} {token}', safe='')}"
        )

    async def page(self, request: Request) -> Response:
        return HTMLResponse(self.form, headers=self.headers)

    async def preflight(self, request: Request) -> Response:
        origin = request.headers.get("origin")
        if origin not in self.origins:
            return PlainTextResponse(
                "origin not in optin.allowed_origins", status_code=403, headers={"Vary": "Origin"}
            )
        return Response(
            status_code=204,
            headers={
                **self._cors(origin),
                "Access-Control-Allow-Methods": "POST",
                "Access-Control-Allow-Headers": "Content-Type",
                "Access-Control-Max-Age": "600",
            },
        )

    def _cors(self, origin: str | None) -> dict[str, str]:
        if origin is None or origin not in self.origins:
            return {"Vary": "Origin"}
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}

    async def create(self, request: Request) -> Response:
        cors = self._cors(request.headers.get("origin"))
        try:
            fields, html = _parse(await _read(request), request.headers.get("content-type"))
            client = self._client(request, fields)
            self._admit(client)
            new = self._new_request(request, fields, client)
        except Refused as refused:
            refused.response.headers.update(cors)
            return refused.response
        token = optin_store.new_token()
        await run_in_threadpool(self._store, new, token)
        logs.event(
            logger,
            "optin.requested",
            form=new.form_id,
            ip_known=new.client_ip is not None,
            phone_given=new.phone_key is not None,
        )
        link = self.link(token)
        qr_url = f"{self.optin.path}/{token}.svg"
        expires = jsonable(new.expires_at)
        if html:
            return HTMLResponse(
                answer_page(
                    business=self.business,
                    keyword=self.keyword,
                    link=link,
                    qr_url=qr_url,
                    expires_at=expires,
                ),
                status_code=201,
                headers={**self.headers, **cors},
            )
        absolute = self._origin_of(request) + qr_url
        return JSONResponse(
            {"token": token, "link": link, "qr_svg_url": absolute, "expires_at": expires},
            status_code=201,
            headers={"Cache-Control": "no-store", **cors},
        )

    def _origin_of(self, request: Request) -> str:
        """This server as the visitor reached it: behind a trusted proxy, the scheme and host
        it forwarded (X-Forwarded-Proto / -Host), else the request's own."""
        base = str(request.base_url).rstrip("/")
        if not self._from_trusted_proxy(request):
            return base
        proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip()
        host = request.headers.get("x-forwarded-host", "").split(",")[0].strip()
        scheme = proto if proto in ("http", "https") else request.url.scheme
        return f"{scheme}://{host or request.url.netloc}"

    def _admit(self, client: str) -> None:
        """Counts the request against the client's minute; 429 beyond `rate_per_minute`."""
        retry_after = self.limit.admit(client, time.monotonic())
        if retry_after is not None:
            logs.event(logger, "optin.rate_limited", logging.WARNING)
            raise Refused(too_many(retry_after))

    def _from_trusted_proxy(self, request: Request) -> bool:
        return request.client is not None and is_trusted(request.client.host, self.trusted)

    def _client(self, request: Request, fields: Mapping[str, str]) -> str:
        """The visitor's address: `client_ip` from an authenticated server, else the peer's
        (or, behind a trusted proxy, from X-Forwarded-For)."""
        given = fields.get("client_ip")
        if given is None:
            peer = request.client.host if request.client else None
            return client_address(peer, request.headers.get("x-forwarded-for"), self.trusted)
        if self.api_token is None:
            raise _bad(
                f"client_ip is accepted only with Authorization: Bearer "
                f"<{API_TOKEN_VARIABLE}>, and {API_TOKEN_VARIABLE} is not set",
                403,
            )
        refusal = api_refusal(bearer_outcome(request.headers.get("authorization"), self.api_token))
        if refusal is not None:
            raise Refused(refusal)
        address = _ip_or_none(given)
        if address is None:
            raise _bad("client_ip is not an IP address")
        return address

    def _new_request(
        self, request: Request, fields: Mapping[str, str], client: str
    ) -> optin_store.NewRequest:
        form = fields.get("form") or self.optin.form_id
        if not FORM_ID.fullmatch(form):
            raise _bad("form: expected 1 to 64 letters, digits, '_', '.' or '-'")
        typed = (fields.get("phone") or "").strip()
        key = None
        if typed:
            try:
                key = phone_key(typed[:40], self.region)
            except UnparseablePhone:
                raise _bad("phone: not a phone number") from None
        page = fields.get("page") or request.headers.get("referer")
        now = self.clock()
        return optin_store.NewRequest(
            created_at=now,
            expires_at=now + timedelta(hours=self.optin.token_ttl_hours),
            client_ip=_ip_or_none(client),
            user_agent=(request.headers.get("user-agent") or "")[:300] or None,
            page=page[:500] if page else None,
            form_id=form,
            wording=self.wording,
            business=self.business[:200],
            phone_key=key,
        )

    def _store(self, new: optin_store.NewRequest, token: str) -> None:
        with self.engine.begin() as connection:
            optin_store.record(connection, new, token)

    async def qr(self, request: Request) -> Response:
        token = str(request.path_params["token"]).lower()
        if not TOKEN_IN_PATH.fullmatch(token) or not await run_in_threadpool(self._open, token):
            return PlainTextResponse("no open opt-in request with this token", status_code=404)
        return Response(
            qr_svg(self.link(token)),
            media_type="image/svg+xml",
            headers={
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
            },
        )

    def _open(self, token: str) -> bool:
        with self.engine.connect() as connection:
            return optin_store.is_open(connection, token, self.clock())


async def _read(request: Request) -> bytes:
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            body = await read_capped(request, MAX_BODY)
    except (ClientDisconnect, TimeoutError):
        raise _bad("the body did not arrive", 400) from None
    if isinstance(body, OverLimit):
        raise _bad(f"body over {MAX_BODY} bytes", 413)
    return body


def _parse(body: bytes, content_type: str | None) -> tuple[dict[str, str], bool]:
    """(fields, whether to answer with HTML): JSON object, or form-encoded (the page's)."""
    kind = (content_type or "").split(";")[0].strip().lower()
    try:
        text = body.decode("utf-8")
        if kind == "application/json":
            document: Any = json.loads(text)
            if not isinstance(document, dict):
                raise _bad("expected a JSON object")
            fields = {str(k): v for k, v in document.items() if v is not None}
            if any(not isinstance(v, str) for v in fields.values()):
                raise _bad("expected text values")
            return fields, False
        if kind == "application/x-www-form-urlencoded":
            pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FIELDS)
            return dict(reversed(pairs)), True  # the first of a repeated field wins
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad("malformed body") from None
    raise Refused(
        PlainTextResponse(
            "expected application/json or application/x-www-form-urlencoded", status_code=415
        )
    )


def optin_routes(
    config: LoadedConfig, engine: Engine, clock: Clock = lambda: datetime.now(UTC)
) -> list[Route]:
    """The routes, or none while `[optin] enabled` is false."""
    if not config.settings.optin.enabled:
        return []
    return OptinSite(config, engine, clock).routes()

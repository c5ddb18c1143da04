"""What guards the receiver's public routes beyond the webhook: the API token, the client's
address behind a proxy, and a per-client rate limit.

The consent API (`/v1/consent/...`) and the opt-in page (`/optin`) face callers Meta does not
sign for: a sending tool, a company's web server, a visitor's browser. Three questions decide
whether to answer them, and each has one answer here so the routes cannot disagree:

- *Is the caller ours?* `bearer_outcome` compares `Authorization: Bearer <token>` with
  `WACONSENT_API_TOKEN` in constant time (a byte-by-byte comparison would leak the token's
  prefix through timing).
- *Who is the caller?* `client_address` trusts `X-Forwarded-For` only when the TCP peer is one
  of the configured proxies; otherwise anyone could claim any address, defeat the rate limit,
  and (on the opt-in page) forge the IP that becomes a person's proof of consent.
- *Too often?* `PerClientLimit` is a sliding window of one minute per client address, bounded
  in memory so a flood of distinct addresses cannot grow it without end.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

API_TOKEN_VARIABLE = "WACONSENT_API_TOKEN"  # noqa: S105 (a variable name, not a secret)
BEARER = "bearer"
WINDOW_SECONDS = 60.0
MAX_TRACKED_CLIENTS = 10_000

BearerOutcome = Literal["ok", "missing", "wrong"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def bearer_outcome(authorization: str | None, token: str) -> BearerOutcome:
    """'missing' (answer 401) without a bearer credential, 'wrong' (403) if it differs."""
    scheme, _, credential = (authorization or "").strip().partition(" ")
    if scheme.lower() != BEARER or not credential.strip():
        return "missing"
    given = credential.strip().encode("utf-8", "surrogateescape")
    return "ok" if hmac.compare_digest(given, token.encode("utf-8")) else "wrong"


def json_error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """`{"error": message}` with `status`: the one shape every refusal of the JSON routes has,
    so a client reads any of them the same way."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def api_refusal(outcome: BearerOutcome) -> Response | None:
    """The answer to a caller without the right token (None when the token is right)."""
    if outcome == "ok":
        return None
    if outcome == "missing":
        return json_error(
            401,
            f"send Authorization: Bearer <{API_TOKEN_VARIABLE}>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return json_error(403, "the bearer token is not the API token")


def too_many(retry_after: int) -> Response:
    """429 with the seconds until this client may try again."""
    return json_error(
        429,
        "too many requests from this address; try again later",
        headers={"Retry-After": str(retry_after)},
    )


@dataclass(frozen=True)
class OverLimit:
    """A body refused for its length: `size` is the bytes declared, or received so far."""

    size: int


async def read_capped(request: Request, limit: int) -> bytes | OverLimit:
    """The body, or OverLimit as soon as it is known to be longer than `limit` bytes.

    A declared `Content-Length` over the limit is refused before a byte is read, and a body
    streamed past it at the chunk that crosses it, so a huge body is never held whole. Time
    limits and disconnects are left to the caller: each route answers them in its own way.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        return OverLimit(int(declared))
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return OverLimit(len(body))
    return bytes(body)


def trusted_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """The proxies' addresses or networks; raises ValueError naming the entry that is not one."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError as error:
            raise ValueError(f"{entry!r} is not an IP address or network ({error})") from None
    return tuple(networks)


def is_trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def client_address(peer: str | None, forwarded_for: str | None, trusted: Sequence[Network]) -> str:
    """The caller's address: the peer's, or, behind a trusted proxy, the nearest untrusted hop.

    `X-Forwarded-For` is read from the right, because each proxy appends the address it saw;
    the left end is whatever the client wrote and proves nothing.
    """
    address = peer or "unknown"
    if not forwarded_for or not is_trusted(address, trusted):
        return address
    for hop in reversed([part.strip() for part in forwarded_for.split(",") if part.strip()]):
        address = hop
        if not is_trusted(hop, trusted):
            break
    return address


class PerClientLimit:
    """At most `per_minute` admissions per client in any sliding minute."""

    def __init__(self, per_minute: int, max_clients: int = MAX_TRACKED_CLIENTS) -> None:
        self.per_minute = per_minute
        self.max_clients = max_clients
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()

    def admit(self, client: str, now: float) -> int | None:
        """None if admitted (and counted), else the whole seconds to put in `Retry-After`."""
        times = self._seen.pop(client, None) or deque()
        while times and now - times[0] >= WINDOW_SECONDS:
            times.popleft()
        self._seen[client] = times  # most recently seen last, so eviction takes the oldest
        if len(times) >= self.per_minute:
            return max(1, math.ceil(WINDOW_SECONDS - (now - times[0])))
        times.append(now)
        while len(self._seen) > self.max_clients:
            self._seen.popitem(last=False)
        return None

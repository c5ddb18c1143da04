"""The guards of the API and opt-in routes: token, client address, rate limit."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request
from starlette.types import Message

from waconsent.web_guard import (
    OverLimit,
    PerClientLimit,
    api_refusal,
    bearer_outcome,
    client_address,
    read_capped,
    trusted_networks,
)

PROXIES = trusted_networks(["127.0.0.1", "10.0.0.0/8", "::1"])


@pytest.mark.parametrize(
    ("header", "outcome"),
    [
        ("Bearer s3cret", "ok"),
        ("bearer   s3cret ", "ok"),
        (None, "missing"),
        ("", "missing"),
        ("Basic s3cret", "missing"),
        ("Bearer ", "missing"),
        ("Bearer s3cre", "wrong"),
        ("Bearer s3cret!", "wrong"),
        ("Bearer s\u00e9cret", "wrong"),
        ("Bearer \udcff", "wrong"),
    ],
)
def test_bearer_outcome(header: str | None, outcome: str) -> None:
    assert bearer_outcome(header, "s3cret") == outcome


def test_refusals_say_401_without_and_403_with_a_wrong_token() -> None:
    assert api_refusal("ok") is None
    missing, wrong = api_refusal("missing"), api_refusal("wrong")
    assert missing is not None and missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert wrong is not None and wrong.status_code == 403


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("203.0.113.9", "198.51.100.1", "203.0.113.9"),  # untrusted peer: header ignored
        ("127.0.0.1", "198.51.100.1", "198.51.100.1"),  # trusted proxy: header read
        ("127.0.0.1", None, "127.0.0.1"),
        ("127.0.0.1", "6.6.6.6, 198.51.100.1", "198.51.100.1"),  # the client's own claim is left
        ("127.0.0.1", "198.51.100.1, 10.1.2.3", "198.51.100.1"),  # a chain of our proxies
        ("::1", "2001:db8::5", "2001:db8::5"),
        ("127.0.0.1", "garbage", "garbage"),  # never trusted, so it is the hop
    ],
)
def test_client_address(peer: str, forwarded: str | None, expected: str) -> None:
    assert client_address(peer, forwarded, PROXIES) == expected


def test_trusted_networks_names_a_bad_entry() -> None:
    with pytest.raises(ValueError, match=r"'proxy\.local'"):
        trusted_networks(["127.0.0.1", "proxy.local"])


def test_rate_limit_slides_per_client() -> None:
    limit = PerClientLimit(per_minute=2)
    assert limit.admit("a", 0.0) is None
    assert limit.admit("a", 10.0) is None
    assert limit.admit("a", 20.0) == 40  # the first admission leaves the window at 60
    assert limit.admit("b", 20.0) is None  # another client is counted apart
    assert limit.admit("a", 60.0) is None


def test_rate_limit_memory_is_bounded() -> None:
    limit = PerClientLimit(per_minute=1, max_clients=3)
    for n in range(10):
        limit.admit(f"client{n}", 0.0)
    assert limit.admit("client9", 1.0) is not None  # recent clients are still counted
    assert limit.admit("client0", 1.0) is None  # the oldest were forgotten


def _request(chunks: list[bytes], declared: int | bytes | None = None) -> Request:
    """A POST whose body arrives in `chunks`, with `declared` as its Content-Length if given."""
    raw = declared if isinstance(declared, bytes) else str(declared).encode()
    headers = [] if declared is None else [(b"content-length", raw)]
    messages: list[Message] = [
        {"type": "http.request", "body": chunk, "more_body": n < len(chunks) - 1}
        for n, chunk in enumerate(chunks)
    ]

    async def receive() -> Message:
        return messages.pop(0)

    return Request({"type": "http", "method": "POST", "headers": headers}, receive)


@pytest.mark.parametrize(
    ("chunks", "declared", "expected"),
    [
        ([b"abc", b"de"], None, b"abcde"),
        ([b"abcde"], 5, b"abcde"),  # exactly the limit is accepted
        ([b""], 6, OverLimit(6)),  # refused on the declared length, before any byte
        ([b"abc", b"def", b"ghi"], None, OverLimit(6)),  # refused at the chunk that crosses
        ([b"abcdef"], 3, OverLimit(6)),  # a declared length that lies does not help
        ([b"abc"], b"\xb2", b"abc"),  # "²" is a digit to Python, not a length: not trusted
    ],
)
def test_read_capped(chunks: list[bytes], declared: int | bytes | None, expected: object) -> None:
    assert asyncio.run(read_capped(_request(chunks, declared), 5)) == expected

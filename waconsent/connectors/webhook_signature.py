"""The webhook's signature, and the JSON decoding of a signed body.

Meta signs every delivery with HMAC-SHA256 of the raw bytes (`X-Hub-Signature-256`);
it is checked over the bytes as sent, in constant time, before anything is parsed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

SIGNATURE_HEADER = "X-Hub-Signature-256"


def verify_signature(raw_body: bytes, header_value: str | None, app_secret: str) -> bool:
    """HMAC-SHA256 over the raw bytes as sent, compared in constant time.

    A header with a non-ASCII character is no hex digest; it is refused up front, because
    `hmac.compare_digest` raises on non-ASCII text instead of answering False.
    """
    if not header_value or not header_value.startswith("sha256="):
        return False
    given = header_value.removeprefix("sha256=").strip().lower()
    if not given.isascii():
        return False
    expected = hmac.new(app_secret.encode(), raw_body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), given.encode())


def _int_or_digits(digits: str) -> int | str:
    try:
        return int(digits)
    except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
        return digits


def decode_json(raw: bytes | str) -> Any:
    """`json.loads`, except that an integer too long for `int()` stays its digit string.

    Python refuses to convert integers of more than 4,300 digits, and `json.loads` would
    refuse the whole document for one of them; as a string it fails only the item that
    holds it. Raises ValueError (not JSON) or RecursionError (nested too deeply).
    """
    return json.loads(raw, parse_int=_int_or_digits)


def sign(raw_body: bytes, app_secret: str) -> str:
    """The header value Meta would send; for tests, benchmarks and replay tools."""
    return "sha256=" + hmac.new(app_secret.encode(), raw_body, hashlib.sha256).hexdigest()

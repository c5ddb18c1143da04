"""CSV files that people open in spreadsheets: cells, line ends, encodings, values.

Written: a cell a spreadsheet would run as a formula (OWASP's list) gets a leading
apostrophe, lines end in CRLF (RFC 4180; with a bare LF a value holding a carriage return
was left unquoted and broke its row). Read: the apostrophe is taken off again, so every
value round-trips (a number such as +49 151 ... included), bytes that are not UTF-8 fail
only their row, datetimes are ISO 8601 in UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime

LINE_END = "\r\n"

# OWASP's CSV injection list: a cell starting with one of these is a formula to a
# spreadsheet (=cmd|' /C calc'!A0, =HYPERLINK(...), +SUM(...), @SUM(...)).
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
_FIRST_OF_CONCERN = frozenset("".join(FORMULA_TRIGGERS) + "'")


def csv_cell(value: str) -> str:
    """A text cell for a CSV a person may open in a spreadsheet: a leading apostrophe
    makes a would-be formula plain text. A value that already starts with apostrophes
    before a trigger gets one more, so `csv_value` restores every value exactly (a phone
    number such as +49 151 ... round-trips through export and import)."""
    if not value or value[0] not in _FIRST_OF_CONCERN:  # most cells: one look (hot path)
        return value
    return "'" + value if value.lstrip("'").startswith(FORMULA_TRIGGERS) else value


def csv_value(cell: str) -> str:
    """The value `csv_cell` wrote: one apostrophe before a formula trigger is taken off."""
    if cell.startswith("'") and cell.lstrip("'").startswith(FORMULA_TRIGGERS):
        return cell[1:]
    return cell


class OutOfRange(ValueError):
    """A well-formed datetime that UTC cannot hold."""


def parse_datetime(text: str) -> datetime:
    """ISO 8601; a value without an offset is taken as UTC (documented in the README).

    Raises ValueError, and OutOfRange for a moment that UTC cannot hold
    (9999-12-31T23:59:59-01:00 is in the year 10000 there)."""
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise OutOfRange("outside the years 1 to 9999 in UTC") from None


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def is_utf8(text: str) -> bool:
    """False for text with lone surrogates: bytes that were not UTF-8 (decoded with
    `surrogateescape`), or an escaped half of a pair. No store can hold them."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """Text safe to print whatever it holds (undecodable bytes shown as escapes)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def decode_csv(data: bytes) -> str:
    """The file's text: UTF-8 (a BOM is dropped); a byte that is not UTF-8 is kept as a
    lone surrogate, so that its row alone is refused (by line) and the others still read."""
    return data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")

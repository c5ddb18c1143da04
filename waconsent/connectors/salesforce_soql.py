"""SOQL for the Salesforce connector: built from the mapping, every literal quoted.

Identifiers (object and field names) come from the configuration and cannot be
quoted in SOQL, so they are checked against Salesforce's API-name shape instead;
every value (ids, datetimes) goes through simple-salesforce's `format_soql`, so a
value such as ``0151' OR Name != '`` stays one string literal.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from urllib.parse import quote_plus

from simple_salesforce.format import format_soql, quote_soql_value

from waconsent.errors import ConfigError

#: An API name: letters, digits and underscores, starting with a letter (Foo__c, ns__Foo__c).
_API_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,79}")
#: A Salesforce record id: 15 (case-sensitive) or 18 (case-safe) letters and digits.
_RECORD_ID = re.compile(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?")

#: Queries travel in the URL (GET .../query?q=...). Salesforce refuses URIs above
#: 16,384 bytes (414) well before its 100,000-character SOQL limit, so an id chunk is
#: cut to keep the *encoded* query under this budget, leaving room for the base URL.
MAX_ENCODED_QUERY = 15_000


def api_name(name: str, what: str) -> str:
    """`name` if it has the shape of a Salesforce API name, else a ConfigError naming it."""
    if not _API_NAME.fullmatch(name):
        raise ConfigError(
            [
                f"{what}: {name!r} is not a Salesforce API name "
                "(letters, digits and underscores, such as WhatsApp_Opt_In__c)"
            ]
        )
    return name


def is_record_id(value: str) -> bool:
    return bool(_RECORD_ID.fullmatch(value))


def select_fields(phone_fields: Iterable[str], mapped_fields: Iterable[str]) -> tuple[str, ...]:
    """Id, SystemModstamp, the phone fields and the mapped fields: nothing else, no repeats."""
    names = ["Id", "SystemModstamp", *phone_fields, *mapped_fields]
    return tuple(dict.fromkeys(api_name(n, "field") for n in names))


def _select(object_name: str, fields: Sequence[str]) -> str:
    return format_soql(
        "SELECT {fields:literal} FROM {obj:literal}",
        fields=", ".join(api_name(f, "field") for f in fields),
        obj=api_name(object_name, "mapping.object"),
    )


def select_all(object_name: str, fields: Sequence[str]) -> str:
    """Every record; no ORDER BY, which a full read (REST or Bulk) does not need."""
    return _select(object_name, fields)


def select_changed_since(object_name: str, fields: Sequence[str], since: datetime) -> str:
    """Records with SystemModstamp >= since (a datetime literal), oldest first."""
    if since.tzinfo is None:
        raise ValueError("the watermark must be timezone-aware (UTC)")
    return _select(object_name, fields) + format_soql(
        " WHERE SystemModstamp >= {since} ORDER BY SystemModstamp, Id", since=since
    )


def select_changed_since_unordered(object_name: str, fields: Sequence[str], since: datetime) -> str:
    """The same filter for a Bulk API 2.0 job, which returns rows in no particular order."""
    if since.tzinfo is None:
        raise ValueError("the watermark must be timezone-aware (UTC)")
    return _select(object_name, fields) + format_soql(
        " WHERE SystemModstamp >= {since}", since=since
    )


def _encoded_length(text: str) -> int:
    return len(quote_plus(text))


def select_by_ids(
    object_name: str,
    fields: Sequence[str],
    record_ids: Iterable[str],
    budget: int = MAX_ENCODED_QUERY,
    most: int = 500,
) -> Iterator[str]:
    """`... WHERE Id IN (...)` queries of at most `most` ids, each kept under `budget`
    characters once URL-encoded (so the cost of a read by id is known in advance).

    Every id is quoted by `quote_soql_value`; the caller drops strings that cannot be
    ids (Salesforce refuses a whole query over one malformed id literal).
    """
    head = _select(object_name, fields) + " WHERE Id IN ("
    head_length = _encoded_length(head) + _encoded_length(")")
    chunk: list[str] = []
    length = head_length
    for record_id in record_ids:
        literal = quote_soql_value(record_id)
        item_length = _encoded_length(literal) + (_encoded_length(",") if chunk else 0)
        if chunk and (length + item_length > budget or len(chunk) >= most):
            yield head + ",".join(chunk) + ")"
            chunk, length = [], head_length
            item_length = _encoded_length(literal)
        if head_length + item_length > budget:
            raise ValueError("one id alone exceeds the query length budget")
        chunk.append(literal)
        length += item_length
    if chunk:
        yield head + ",".join(chunk) + ")"


def select_by_numbers(
    object_name: str,
    fields: Sequence[str],
    phone_fields: Sequence[str],
    digit_patterns: Iterable[str],
    user_id_field: str | None = None,
    user_ids: Iterable[str] = (),
    budget: int = MAX_ENCODED_QUERY,
) -> Iterator[str]:
    """Records that may carry a number (any phone field LIKE its digit pattern, so that
    '0151 2345678' and '+49 (0)151-234 56 78' are both found) or a user id; queries kept
    under `budget` characters once URL-encoded. LIKE with a leading wildcard cannot use an
    index, which is why only numbers no sync has indexed yet are looked up this way."""
    conditions = [
        format_soql("{field:literal} LIKE {pattern}", field=api_name(f, "field"), pattern=pattern)
        for pattern in digit_patterns
        for f in phone_fields
    ]
    if user_id_field:
        conditions += [
            format_soql(
                "{field:literal} = {value}", field=api_name(user_id_field, "field"), value=value
            )
            for value in user_ids
        ]
    head = _select(object_name, fields) + " WHERE "
    chunk: list[str] = []
    for condition in conditions:
        candidate = " OR ".join([*chunk, condition])
        if chunk and _encoded_length(head + candidate) > budget:
            yield head + " OR ".join(chunk)
            chunk = []
        chunk.append(condition)
    if chunk:
        yield head + " OR ".join(chunk)

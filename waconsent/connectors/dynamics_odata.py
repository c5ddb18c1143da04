"""OData v4 pieces for the Dataverse Web API: literals, filters, query strings, values.

Every literal that reaches a URL goes through this module: strings are quoted with
`'` doubled, GUIDs are parsed (and so can carry nothing else), datetimes are
rendered in UTC with a `Z`, and names that cannot be quoted (attributes in
`$select`, entity set names in a path) must be plain identifiers.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from urllib.parse import quote

from waconsent.errors import ConfigError

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Characters that may stay readable in a query value; everything else is %-encoded
# (notably `&`, `#`, `+`, `%`, spaces and non-ASCII).
_QUERY_SAFE = "'(),:$=-"


def is_identifier(name: str) -> bool:
    """A Dataverse logical/entity-set name: letters, digits and `_`, not starting with a digit."""
    return bool(_IDENTIFIER.match(name))


def identifier(name: str, what: str) -> str:
    """`name` unchanged when it is a plain identifier; a ConfigError otherwise."""
    if not is_identifier(name):
        raise ConfigError(
            [f"{what}: {name!r} is not a Dataverse logical name (letters, digits and '_' only)"]
        )
    return name


def quote_string(value: str) -> str:
    """An OData string literal: single quotes around, every `'` doubled."""
    return "'" + value.replace("'", "''") + "'"


def guid(value: str) -> str | None:
    """The canonical lower-case GUID, or None when `value` is not one."""
    try:
        return str(uuid.UUID(value.strip()))
    except (ValueError, AttributeError):
        return None


def format_datetime(moment: datetime) -> str:
    """A DateTimeOffset literal in UTC at second precision (Dataverse keeps seconds)."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime; waconsent keeps every datetime timezone-aware UTC")
    return moment.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_datetime(text: str) -> datetime:
    """Dataverse renders DateTime as ISO 8601 in UTC (`2026-01-31T09:30:00Z`)."""
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def eq(attribute: str, value: str | int | bool | None) -> str:
    """`attribute eq <literal>` with the literal typed and quoted."""
    name = identifier(attribute, "filter attribute")
    return f"{name} eq {literal(value)}"


def literal(value: str | int | bool | datetime | None) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, datetime):
        return format_datetime(value)
    return quote_string(value)


def modified_since(since: datetime) -> str:
    """`modifiedon ge <since>`: `ge`, so records sharing the boundary second are not dropped."""
    return f"modifiedon ge {format_datetime(since)}"


def ids_filter(key: str, ids: Sequence[str]) -> str:
    """`key eq <guid> or key eq <guid> ...`; GUIDs are unquoted literals, so each is parsed."""
    name = identifier(key, "primary id attribute")
    canonical = [guid(value) for value in ids]
    if not canonical or any(value is None for value in canonical):
        raise ValueError("ids_filter takes GUIDs only")
    return " or ".join(f"{name} eq {value}" for value in canonical)


def contains_in_order(attribute: str, digits: str) -> str:
    """`contains(attribute,'1%2%3')`: Dataverse reads `%` inside the value as a wildcard,
    so the digits match with any formatting between them. Like every leading wildcard it
    cannot use an index (and Dataverse throttles such queries hard), so the connector uses
    it only for the few numbers no sync has indexed yet."""
    if not digits.isdigit():
        raise ValueError("contains_in_order takes digits only")
    return f"contains({identifier(attribute, 'phone attribute')},{quote_string('%'.join(digits))})"


def select(names: Iterable[str]) -> str:
    unique = list(dict.fromkeys(names))
    for name in unique:
        identifier(name, "attribute")
    return ",".join(unique)


def key_segment(name: str, value: str) -> str:
    """`(Name='value')` for a path such as `EntityDefinitions(LogicalName='contact')`."""
    return f"({identifier(name, 'key')}={quote(quote_string(value), safe=_QUERY_SAFE)})"


def query_string(params: Mapping[str, str]) -> str:
    """`$select=a,b&$filter=...` with the values %-encoded but OData punctuation left readable."""
    return "&".join(f"{key}={quote(value, safe=_QUERY_SAFE)}" for key, value in params.items())


def prefer(
    *,
    max_page_size: int | None = None,
    track_changes: bool = False,
    continue_on_error: bool = False,
) -> str:
    parts = []
    if max_page_size is not None:
        parts.append(f"odata.maxpagesize={max_page_size}")
    if track_changes:
        parts.append("odata.track-changes")
    if continue_on_error:
        parts.append("odata.continue-on-error")
    return ",".join(parts)

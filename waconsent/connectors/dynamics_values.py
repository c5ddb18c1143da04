"""Dataverse values <-> the rules' logical values, for one mapping.

Reading: a Yes/No or a Choice becomes `opt_in` True / False / None, datetimes aware UTC.
Writing: the logical value as the attribute's type wants it; a value the attribute cannot
hold (too long, no option configured, a type waconsent does not write) is a
PermanentRecordError for its record, never truncated and never sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, TypeVar

from waconsent import domain
from waconsent.connectors import dynamics_odata as odata
from waconsent.connectors.dynamics_metadata import Attribute
from waconsent.domain import FieldValue
from waconsent.errors import PermanentRecordError

_STRING_TYPES = frozenset({"String", "Memo"})
T = TypeVar("T")


def option_value(value: str | int | None) -> int | None:
    """A Choice option value from `[mapping.values]` (an int, or digits in a string)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = value.strip()
    return int(text) if text.lstrip("-").isdigit() else None


class DataverseValues:
    """The conversions for one table's mapping (`mapping.fields`, `mapping.values`)."""

    def __init__(
        self, fields: Mapping[str, str], opted_in: str | int | None, opted_out: str | int | None
    ) -> None:
        self._fields = fields
        self._opted_in, self._opted_out = option_value(opted_in), option_value(opted_out)

    def read(self, logical: str, raw: Any) -> FieldValue:
        if raw is None:
            return None
        if logical == domain.OPT_IN and not isinstance(raw, bool) and isinstance(raw, int):
            return self._option_read(raw)
        if logical in domain.BOOLEAN_FIELDS:
            return bool(raw)
        if logical in domain.DATETIME_FIELDS:
            return odata.parse_datetime(raw) if isinstance(raw, str) and raw else None
        return str(raw)

    def payload(
        self, record_id: str, values: Mapping[str, FieldValue], attributes: Mapping[str, Attribute]
    ) -> dict[str, Any]:
        """Attribute -> value for one PATCH; PermanentRecordError if any value cannot go."""
        body: dict[str, Any] = {}
        for logical, value in values.items():
            name = self._fields.get(logical)
            if name is None:
                raise PermanentRecordError(
                    f"{logical} is not mapped to a Dataverse attribute",
                    record_id=record_id,
                    code="UNMAPPED_FIELD",
                    fields=[logical],
                )
            attribute = attributes.get(name)
            if attribute is None:
                raise PermanentRecordError(
                    f"the entity has no attribute {name!r}",
                    record_id=record_id,
                    code="UNKNOWN_ATTRIBUTE",
                    fields=[name],
                )
            body[name] = self._write(record_id, attribute, value)
        return body

    def _option_read(self, raw: int) -> bool | None:
        """A Choice opt-in: True, False, or None for some other option (neither given nor
        refused)."""
        if raw == self._opted_in:
            return True
        if self._opted_out is None or raw == self._opted_out:
            return False
        return None

    def _write(self, record_id: str, attribute: Attribute, value: FieldValue) -> Any:
        if not attribute.updatable:
            raise _refusal(record_id, attribute, "the attribute cannot be updated", "NOT_UPDATABLE")
        if value is None:
            return None
        if attribute.type == "Picklist":
            return self._option_write(record_id, attribute, value)
        if attribute.type == "Boolean":
            return _typed(record_id, attribute, value, bool, "a boolean")
        if attribute.type == "DateTime":
            return odata.format_datetime(
                _typed(record_id, attribute, value, datetime, "a datetime")
            )
        if attribute.type in _STRING_TYPES:
            return _string(record_id, attribute, value)
        raise _refusal(
            record_id,
            attribute,
            f"waconsent does not write {attribute.type} attributes",
            "UNSUPPORTED_TYPE",
        )

    def _option_write(self, record_id: str, attribute: Attribute, value: FieldValue) -> int:
        if not isinstance(value, bool):
            raise _refusal(
                record_id,
                attribute,
                f"expected true/false for the Choice opt-in, got {type(value).__name__}",
            )
        option = self._opted_in if value else self._opted_out
        if option is None:
            raise _refusal(
                record_id,
                attribute,
                "no option value configured in "
                f"[mapping.values] for {'opted_in' if value else 'opted_out'}",
                "NO_OPTION_VALUE",
            )
        return option


def _refusal(
    record_id: str, attribute: Attribute, reason: str, code: str = "INVALID_VALUE"
) -> PermanentRecordError:
    return PermanentRecordError(
        f"{attribute.name}: {reason}", record_id=record_id, code=code, fields=[attribute.name]
    )


def _typed(
    record_id: str, attribute: Attribute, value: FieldValue, kind: type[T], expected: str
) -> T:
    if not isinstance(value, kind):
        raise _refusal(record_id, attribute, f"expected {expected}, got {type(value).__name__}")
    return value


def _string(record_id: str, attribute: Attribute, value: FieldValue) -> str:
    text = odata.format_datetime(value) if isinstance(value, datetime) else str(value)
    if attribute.max_length is not None and len(text) > attribute.max_length:
        # never cut evidence short: report it and let an admin widen the column
        raise _refusal(
            record_id,
            attribute,
            f"{len(text)} characters, the attribute holds at most {attribute.max_length}",
            "STRING_TOO_LONG",
        )
    return text

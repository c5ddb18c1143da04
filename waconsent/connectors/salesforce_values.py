"""Salesforce values <-> the rules' logical values, for one mapping.

Reading: a checkbox or picklist becomes `opt_in` True / False / None, datetimes aware UTC
to the second. Writing: the logical value in the field's own type; a value the field
cannot hold (a picklist without `[mapping.values]`, a text longer than the field) is a
PermanentRecordError for its record, never truncated and never sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime

from waconsent import domain
from waconsent.domain import FieldDescription, FieldValue
from waconsent.errors import PermanentRecordError

PICKLIST_TYPES = frozenset({"picklist", "multipicklist"})
TEXT_TYPES = frozenset({"string", "textarea", "phone", "email", "url", "encryptedstring"})
#: MessagingEndUser.MessagingConsentStatus: values that also mean "opted in" when read.
_ALSO_OPTED_IN = frozenset({"DoublyOptedIn"})

Written = str | bool | None


def format_datetime(moment: datetime) -> str:
    """Salesforce's dateTime format, to the second: 2026-01-31T09:30:00.000+0000."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime: every datetime must be timezone-aware UTC")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000+0000")


def parse_datetime(value: object) -> datetime | None:
    """A Salesforce dateTime (or date) as aware UTC to the second; junk or empty -> None."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return domain.to_second(moment)


class SalesforceValues:
    """The conversions for one object's mapping (`mapping.fields`, `mapping.values`)."""

    def __init__(
        self,
        object_name: str,
        mapped: Mapping[str, str],
        picklist_values: tuple[str | int | None, str | int | None],
    ) -> None:
        self._object = object_name
        self._mapped = mapped
        self._picklist = picklist_values

    def read(self, logical: str, value: object, csv_type: str | None) -> FieldValue:
        """A field of a query row (JSON, or a Bulk CSV string when `csv_type` is given)."""
        if value is None or value == "":
            return None
        if logical in domain.BOOLEAN_FIELDS:
            if isinstance(value, bool):
                return value
            text = str(value)
            if logical == domain.OPT_IN and (
                csv_type in PICKLIST_TYPES or (csv_type is None and self._picklist[0] is not None)
            ):
                return self._opt_in_from_picklist(text)
            lowered = text.strip().lower()
            return True if lowered == "true" else False if lowered == "false" else None
        if logical in domain.DATETIME_FIELDS:
            return parse_datetime(value)
        return str(value)

    def _opt_in_from_picklist(self, text: str) -> bool | None:
        opted_in, opted_out = self._picklist
        if opted_in is not None and text == str(opted_in):
            return True
        if opted_out is not None and text == str(opted_out):
            return False
        if self._mapped.get(domain.OPT_IN) == "MessagingConsentStatus" and text in _ALSO_OPTED_IN:
            return True
        return None  # another value (ImplicitlyOptedIn, ...) is no explicit opt-in

    def payload(
        self,
        record_id: str,
        values: Mapping[str, FieldValue],
        fields: Mapping[str, FieldDescription],
    ) -> dict[str, Written]:
        """CRM field -> value for one write; PermanentRecordError if any value cannot go."""
        return dict(
            self._write(record_id, logical, value, fields) for logical, value in values.items()
        )

    def _write(
        self,
        record_id: str,
        logical: str,
        value: FieldValue,
        fields: Mapping[str, FieldDescription],
    ) -> tuple[str, Written]:
        name = self._mapped.get(logical)
        if name is None:
            raise _refusal(
                record_id, logical, "INVALID_FIELD", f"{logical} is not mapped in [mapping.fields]"
            )
        described = fields.get(name)
        kind = described.type if described else ""
        if logical == domain.OPT_IN and kind in PICKLIST_TYPES:
            return name, self._picklist_value(record_id, name, value)
        if kind == "boolean":
            if value is not None and not isinstance(value, bool):
                raise _refusal(
                    record_id,
                    logical,
                    "INVALID_TYPE_ON_FIELD_IN_RECORD",
                    f"{name} is a checkbox; {logical} is not true or false",
                )
            return name, bool(value)  # a checkbox cannot be null
        if value is None:
            return name, None
        if isinstance(value, datetime):
            return name, (
                value.astimezone(UTC).date().isoformat()
                if kind == "date"
                else format_datetime(value)
            )
        if isinstance(value, bool):
            return name, value if kind not in TEXT_TYPES else str(value).lower()
        return name, self._text(record_id, logical, name, str(value), described)

    def _picklist_value(self, record_id: str, name: str, value: FieldValue) -> str | None:
        if value is None:
            return None
        chosen = self._picklist[0 if value else 1]
        if chosen is None:
            raise _refusal(
                record_id,
                domain.OPT_IN,
                "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                f"{name} is a picklist and [mapping.values] names no value for "
                f"{'opted in' if value else 'opted out'}",
            )
        return str(chosen)

    def _text(
        self, record_id: str, logical: str, name: str, text: str, described: FieldDescription | None
    ) -> str:
        """Never cut evidence short: a text longer than its field is refused, not truncated."""
        if (
            described is not None
            and described.length
            and described.type in TEXT_TYPES | PICKLIST_TYPES
            and len(text) > described.length
        ):
            raise _refusal(
                record_id,
                logical,
                "STRING_TOO_LONG",
                f"{logical} is {len(text)} characters but {self._object}.{name} "
                f"holds {described.length}; not truncated (lengthen the field)",
            )
        return text


def _refusal(record_id: str, logical: str, code: str, message: str) -> PermanentRecordError:
    return PermanentRecordError(message, record_id=record_id, code=code, fields=(logical,))


def csv_cell(value: Written, null: str) -> str:
    """A value in a Bulk API 2.0 CSV (`null` is Bulk's #N/A for an emptied field)."""
    if value is None:
        return null
    if isinstance(value, bool):
        return "true" if value else "false"
    return value

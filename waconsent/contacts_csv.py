"""Reading the ledger's contacts CSV (`waconsent contacts import`).

A bad row is refused by its line and never costs the good ones: a field the csv module
cannot read, no id, a malformed or out-of-range date, a bad boolean, a NUL byte, bytes
that are not UTF-8, a value longer than its column. An unparseable phone number is kept
(it matches nothing) and reported as a warning.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from waconsent import domain
from waconsent.csvfiles import OutOfRange, csv_value, is_utf8, parse_bool, parse_datetime, printable
from waconsent.domain import FieldValue
from waconsent.phones import UnparseablePhone, mask, phone_key
from waconsent.store.contacts import COLUMN_LIMITS, CSV_COLUMNS, PHONE_FIELDS


@dataclass
class ContactsImport:
    imported: int = 0
    refused: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # the line of each row read, in order


def _csv_value(column: str, cell: str) -> FieldValue:
    text = csv_value(cell)
    if text.strip() == "":
        return None
    if "\x00" in text:
        raise ValueError(f"{column}: contains a NUL byte, which the store cannot hold")
    if not is_utf8(text):
        raise ValueError(
            f"{column}: not UTF-8 text (is the file in another encoding, such "
            "as Latin-1? save it as UTF-8)"
        )
    if column in domain.DATETIME_FIELDS:
        try:
            return parse_datetime(text)
        except OutOfRange as exc:
            raise ValueError(f"{column}: {text!r} is {exc}") from None
        except ValueError:
            raise ValueError(
                f"{column}: expected an ISO 8601 datetime such as "
                f"2026-01-31T09:30:00Z, got {text!r}"
            ) from None
    if column in domain.BOOLEAN_FIELDS:
        try:
            return parse_bool(text)
        except ValueError as exc:
            raise ValueError(f"{column}: {exc}") from None
    return text.strip()


def _rows(
    reader: csv.DictReader[str], source: str, report: ContactsImport
) -> Iterator[tuple[int, dict[str, str | None]]]:
    """(line, row) per record; a record the csv module cannot read (a field over its size
    limit, a stray carriage return) is refused by its first line and reading goes on."""
    while True:
        start = reader.line_num + 1
        try:
            raw = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            report.refused.append(f"{source}:{start}: not readable as CSV ({exc})")
            continue
        yield reader.line_num, raw  # the row's last line; right even after quoted newlines


def read_contacts_csv(
    text: str, default_region: str, source: str = "<csv>"
) -> tuple[list[dict[str, FieldValue]], ContactsImport]:
    """Rows to import plus the report; bad rows are refused by line, the rest kept
    (`report.lines` holds each kept row's line)."""
    report = ContactsImport()
    reader = csv.DictReader(io.StringIO(text.removeprefix("\ufeff")))
    if not _header_usable(reader, source, report):
        return [], report
    rows: list[dict[str, FieldValue]] = []
    for line_number, raw in _rows(reader, source, report):
        where = f"{source}:{line_number}"
        try:
            row = _contact_row(raw)
        except ValueError as exc:
            report.refused.append(f"{where}: {exc}")
            continue
        report.warnings.extend(_phone_warnings(row, default_region, where))
        rows.append(row)
        report.lines.append(line_number)
    return rows, report


def _header_usable(reader: csv.DictReader[str], source: str, report: ContactsImport) -> bool:
    """False (with the reason in `report`) when no row can be read under this header."""
    try:
        header = [h.strip() for h in reader.fieldnames or []]
    except csv.Error as exc:
        report.refused.append(f"{source}:1: the header is not readable as CSV ({exc})")
        return False
    if "id" not in header:
        report.refused.append(
            f"{source}:1: the header has no 'id' column "
            f"(expected some of: {', '.join(CSV_COLUMNS)})"
        )
        return False
    unknown = [h for h in header if h not in CSV_COLUMNS]
    if unknown:
        report.warnings.append(
            f"{source}:1: unknown column(s) ignored: {printable(', '.join(unknown))}"
        )
    return True


def _contact_row(raw: Mapping[str, str | None]) -> dict[str, FieldValue]:
    """One CSV row as contact values; ValueError says why it cannot be imported."""
    values = {k.strip(): (v or "") for k, v in raw.items() if k and k.strip() in CSV_COLUMNS}
    if not values.get("id", "").strip():
        raise ValueError("no id")
    row = {column: _csv_value(column, text) for column, text in values.items()}
    too_long = [
        f"{column} ({len(value)} characters, at most {COLUMN_LIMITS[column]})"
        for column, value in row.items()
        if isinstance(value, str) and len(value) > COLUMN_LIMITS.get(column, 10**6)
    ]
    if too_long:
        raise ValueError(f"too long: {', '.join(too_long)}")
    return row


def _phone_warnings(
    row: Mapping[str, FieldValue], default_region: str, where: str
) -> Iterator[str]:
    """A number that is no phone number is kept (the CRM may hold it) but said."""
    for phone_field in PHONE_FIELDS:
        phone = row.get(phone_field)
        if not isinstance(phone, str):
            continue
        try:
            phone_key(phone, default_region)
        except UnparseablePhone:
            yield (
                f"{where}: {phone_field} {mask(phone)} is not a phone number; the contact "
                "is kept but its number matches nothing"
            )

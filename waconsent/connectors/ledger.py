"""The built-in ledger as a CRM (`crm.kind = "ledger"`), for companies without one.

Its records live in the store's `contacts` table and its field names are the
logical names themselves, so no mapping is needed. It also reads and writes the
contacts CSV (`waconsent contacts import/export`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    ColumnElement,
    Engine,
    String,
    TypeDecorator,
    bindparam,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.types import TypeEngine

from waconsent import domain
from waconsent.config.check import (
    LEDGER,
    MappingUnderCheck,
    Verdict,
    check_mapping,
    require_fit,
)
from waconsent.domain import CrmRecord, FieldDescription, FieldValue, WriteRequest, WriteResult
from waconsent.phones import (
    USER_ID_PREFIX,
    UnparseablePhone,
    like_pattern,
    mask,
    phone_key,
    search_digits,
)
from waconsent.store.engine import among, reading
from waconsent.store.tables import contacts

if TYPE_CHECKING:
    from waconsent.config import LoadedConfig

PHONE_FIELDS = ("mobile_phone", "phone")
CSV_COLUMNS: tuple[str, ...] = ("id", "name", *PHONE_FIELDS, *domain.LOGICAL_FIELDS)
# The contacts table's string lengths: longer values are refused by line, never cut.
COLUMN_LIMITS: dict[str, int] = {column.name: column.type.length for column in contacts.columns
                                  if isinstance(column.type, String) and column.type.length}
_CHUNK = 500


#: Python type of a contacts column -> the type name the mapping checker knows
_COLUMN_TYPES: Mapping[type, str] = {str: "string", bool: "boolean", datetime: "datetime"}


def _column_type(kind: TypeEngine[Any]) -> str:
    """`string`, `boolean` or `datetime`, seen through a decorator such as UtcDateTime."""
    inner = kind.impl_instance if isinstance(kind, TypeDecorator) else kind
    return _COLUMN_TYPES.get(inner.python_type, inner.python_type.__name__)


_POSITION = {column.name: index for index, column in enumerate(contacts.columns)}
_FIELD_POSITIONS = tuple((name, _POSITION[name]) for name in domain.LOGICAL_FIELDS)
_PHONE_POSITIONS = tuple((name, _POSITION[name]) for name in PHONE_FIELDS)


def _row_to_record(row: Any) -> CrmRecord:
    """Rows of `select(contacts)`, read by position: this runs once per contact per sync."""
    return CrmRecord(
        record_id=row[_POSITION["id"]],
        fields={name: row[index] for name, index in _FIELD_POSITIONS},
        phones={name: row[index] for name, index in _PHONE_POSITIONS},
        modified_at=row[_POSITION["modified_at"]],
        name=row[_POSITION["name"]],
    )


class LedgerCrm:
    """CrmConnector over the contacts table; every call is one SQL statement."""

    write_batch_size = 500  # contacts per UPDATE transaction
    ids_per_read = _CHUNK

    @classmethod
    def from_config(cls, config: LoadedConfig, *, engine: Engine) -> LedgerCrm:
        """The ledger's CRM lives in the store itself, so it needs the open engine (and no
        HTTP policy)."""
        return cls(engine, read_chunk_size=config.settings.sync.read_chunk_size)

    def __init__(self, engine: Engine, read_chunk_size: int = 2_000,
                 clock: Any = None) -> None:
        self._engine = engine
        # measured on a full sync: a reader thread is ~10 % faster on PostgreSQL and slower
        # on SQLite, whose every fetched row hands the interpreter lock back and forth
        self.read_ahead = engine.dialect.name != "sqlite"
        self._chunk = read_chunk_size
        self.page_size = read_chunk_size
        self._clock = clock or (lambda: datetime.now(UTC))
        self._calls = 0

    def mapping_verdicts(self) -> list[Verdict]:
        """The shared checker over the contacts table itself: the ledger's fields are the
        logical ones, so this fails only if a migration gave a column a type the rules
        cannot use; running it keeps `check` and preflight one path for every CRM."""
        mapping = MappingUnderCheck(LEDGER, "the ledger's contacts table",
                                    {name: name for name in domain.LOGICAL_FIELDS}, PHONE_FIELDS)
        return check_mapping(mapping, self.describe_fields())

    def preflight(self) -> None:
        require_fit(self.mapping_verdicts(), source="the ledger")

    def _pages(self, query: Any, order: Sequence[Any]) -> Iterator[CrmRecord]:
        """Keyset pagination on the ordering columns, so memory stays one page deep."""
        last: tuple[Any, ...] | None = None
        while True:
            page_query = query
            if last is not None:
                page_query = page_query.where(tuple_(*order) > tuple_(*last))
            with reading(self._engine) as connection:
                rows = connection.execute(page_query.order_by(*order).limit(self._chunk)).all()
            self._calls += 1
            if not rows:
                return
            yield from (_row_to_record(row) for row in rows)
            last = tuple(getattr(rows[-1], column.name) for column in order)
            if len(rows) < self._chunk:
                return

    def read_all(self) -> Iterator[CrmRecord]:
        return self._pages(select(contacts), [contacts.c.id])

    def read_changed_since(self, since: datetime,
                           cursor: str | None = None) -> Iterator[CrmRecord]:
        """By `modified_at >= since`; the ledger keeps no cursor of its own."""
        return self._pages(select(contacts).where(contacts.c.modified_at >= since),
                           [contacts.c.modified_at, contacts.c.id])

    def next_cursor(self) -> str | None:
        return None

    def read_by_ids(self, record_ids: Sequence[str]) -> Iterator[CrmRecord]:
        ids = list(dict.fromkeys(record_ids))
        for start in range(0, len(ids), _CHUNK):
            with reading(self._engine) as connection:
                rows = connection.execute(
                    select(contacts).where(
                        among(connection, contacts.c.id, ids[start:start + _CHUNK]))).all()
            self._calls += 1
            yield from (_row_to_record(row) for row in rows)

    def find_by_keys(self, keys: Sequence[str]) -> Iterator[CrmRecord]:
        """Candidates by LIKE on the phone columns (digits in order, any formatting between)
        or by user id; the caller confirms each by its parsed number."""
        patterns = list(dict.fromkeys(like_pattern(d) for d in map(search_digits, keys) if d))
        user_ids = [k.removeprefix(USER_ID_PREFIX) for k in keys if k.startswith(USER_ID_PREFIX)]
        if not patterns and not user_ids:
            return
        with reading(self._engine) as connection:
            conditions: list[ColumnElement[bool]] = [
                column.like(pattern) for pattern in patterns
                for column in (contacts.c.mobile_phone, contacts.c.phone)]
            if user_ids:
                conditions.append(among(connection, contacts.c.whatsapp_user_id, user_ids))
            rows = [row for start in range(0, len(conditions), _CHUNK)
                    for row in connection.execute(select(contacts).where(
                        or_(*conditions[start:start + _CHUNK]))).all()]
        self._calls += 1
        yield from (_row_to_record(row) for row in rows)

    def batch_size(self, backlog: int) -> int:
        return self.write_batch_size

    def write(self, writes: Sequence[WriteRequest]) -> list[WriteResult]:
        """One transaction per `write_batch_size` contacts."""
        size = max(1, self.write_batch_size)
        return [result for start in range(0, len(writes), size)
                for result in self._write_batch(writes[start:start + size])]

    def _write_batch(self, writes: Sequence[WriteRequest]) -> list[WriteResult]:
        """One transaction; writes that set the same fields go as one executemany."""
        now = self._clock()
        results: dict[int, WriteResult] = {}
        groups: dict[tuple[str, ...], list[int]] = {}
        for index, write in enumerate(writes):
            unknown = set(write.values) - set(domain.LOGICAL_FIELDS)
            if unknown:
                results[index] = WriteResult(write.record_id, False,
                                             f"unknown field(s) {sorted(unknown)}",
                                             "INVALID_FIELD", permanent=True)
            else:
                groups.setdefault(tuple(sorted(write.values)), []).append(index)
        with self._engine.begin() as connection:
            existing = set(connection.execute(select(contacts.c.id).where(
                among(connection, contacts.c.id, [w.record_id for w in writes]))).scalars())
            for names, indexes in groups.items():
                present = [i for i in indexes if writes[i].record_id in existing]
                for i in indexes:
                    results[i] = (WriteResult(writes[i].record_id, True) if i in present else
                                  WriteResult(writes[i].record_id, False, "no such contact",
                                              "NOT_FOUND", permanent=True))
                if present:
                    statement = (update(contacts).where(contacts.c.id == bindparam("_id"))
                                 .values({**{n: bindparam(n) for n in names},
                                          "modified_at": bindparam("_now")}))
                    connection.execute(statement, [
                        {**writes[i].values, "_id": writes[i].record_id, "_now": now}
                        for i in present])
        self._calls += 1
        return [results[i] for i in range(len(writes))]

    def describe_fields(self) -> Mapping[str, FieldDescription]:
        """The contacts table's columns, typed from the table definition itself; the key
        and the ledger's own modification time are not the mapping's to update."""
        return {column.name: FieldDescription(
                    column.name, _column_type(column.type),
                    updateable=column.name not in ("id", "modified_at"),
                    length=COLUMN_LIMITS.get(column.name))
                for column in contacts.columns}

    def usage(self) -> Mapping[str, int | str | None]:
        return {"api_calls": self._calls}

    def close(self) -> None:
        """The engine belongs to the caller."""


# ---- contacts CSV ---------------------------------------------------------------------------

@dataclass
class ContactsImport:
    imported: int = 0
    refused: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def parse_datetime(text: str) -> datetime:
    """ISO 8601; a value without an offset is taken as UTC (documented in the README)."""
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _csv_value(column: str, text: str) -> FieldValue:
    if text.strip() == "":
        return None
    if column in domain.DATETIME_FIELDS:
        try:
            return parse_datetime(text)
        except ValueError:
            raise ValueError(f"{column}: expected an ISO 8601 datetime such as "
                             f"2026-01-31T09:30:00Z, got {text!r}") from None
    if column in domain.BOOLEAN_FIELDS:
        try:
            return parse_bool(text)
        except ValueError as exc:
            raise ValueError(f"{column}: {exc}") from None
    return text.strip()


def read_contacts_csv(text: str, default_region: str, source: str = "<csv>"
                      ) -> tuple[list[dict[str, FieldValue]], ContactsImport]:
    """Rows to import plus the report; bad rows are refused by line, the rest kept."""
    report = ContactsImport()
    reader = csv.DictReader(io.StringIO(text.removeprefix("\ufeff")))
    header = [h.strip() for h in reader.fieldnames or []]
    if "id" not in header:
        report.refused.append(f"{source}:1: the header has no 'id' column "
                              f"(expected some of: {', '.join(CSV_COLUMNS)})")
        return [], report
    unknown = [h for h in header if h not in CSV_COLUMNS]
    if unknown:
        report.warnings.append(f"{source}:1: unknown column(s) ignored: {', '.join(unknown)}")
    rows: list[dict[str, FieldValue]] = []
    for raw in reader:
        line_number = reader.line_num  # the row's last line; right even after quoted newlines
        values = {k.strip(): (v or "") for k, v in raw.items() if k and k.strip() in CSV_COLUMNS}
        if not values.get("id", "").strip():
            report.refused.append(f"{source}:{line_number}: no id")
            continue
        try:
            row = {column: _csv_value(column, text) for column, text in values.items()}
        except ValueError as exc:
            report.refused.append(f"{source}:{line_number}: {exc}")
            continue
        too_long = [f"{column} ({len(value)} characters, at most {COLUMN_LIMITS[column]})"
                    for column, value in row.items()
                    if isinstance(value, str) and len(value) > COLUMN_LIMITS.get(column, 10**6)]
        if too_long:
            report.refused.append(f"{source}:{line_number}: too long: {', '.join(too_long)}")
            continue
        for phone_field in PHONE_FIELDS:
            phone = row.get(phone_field)
            if isinstance(phone, str):
                try:
                    phone_key(phone, default_region)
                except UnparseablePhone:
                    report.warnings.append(
                        f"{source}:{line_number}: {phone_field} {mask(phone)} is not a phone "
                        "number; the contact is kept but its number matches nothing")
        rows.append(row)
    return rows, report


def upsert_contacts(engine: Engine, rows: Iterable[Mapping[str, FieldValue]],
                    now: datetime) -> int:
    """Insert or update by id; only the columns a row carries are touched."""
    count = 0
    with engine.begin() as connection:
        dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
        for row in rows:
            values = {**row, "modified_at": now}
            statement = dialect.insert(contacts).values(**values)
            statement = statement.on_conflict_do_update(
                index_elements=["id"], set_={k: statement.excluded[k] for k in values
                                             if k != "id"})
            connection.execute(statement)
            count += 1
    return count


def export_rows(engine: Engine) -> Iterator[dict[str, Any]]:
    with reading(engine) as connection:
        for row in connection.execute(select(contacts).order_by(contacts.c.id)):
            yield {column: getattr(row, column) for column in CSV_COLUMNS}

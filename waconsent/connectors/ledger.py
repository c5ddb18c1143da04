"""The built-in ledger as a CRM (`crm.kind = "ledger"`), for companies without one.

Its records live in the store's `contacts` table and its field names are the
logical names themselves, so no mapping is needed. It also reads and writes the
contacts CSV (`waconsent contacts import/export`): a bad row is refused by line and
never costs the good ones, imports commit in short chunks (the receiver shares the
write lock), and cells a spreadsheet would run as a formula are written with a
leading apostrophe that the import takes off again (`csv_cell`, `csv_value`).
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    ColumnElement,
    Connection,
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
from waconsent.store.engine import REFUSED_VALUE, among, reading
from waconsent.store.tables import contacts

if TYPE_CHECKING:
    from waconsent.config import LoadedConfig

PHONE_FIELDS = ("mobile_phone", "phone")
CSV_COLUMNS: tuple[str, ...] = ("id", "name", *PHONE_FIELDS, *domain.LOGICAL_FIELDS)
# The contacts table's string lengths: longer values are refused by line, never cut.
COLUMN_LIMITS: dict[str, int] = {column.name: column.type.length for column in contacts.columns
                                  if isinstance(column.type, String) and column.type.length}
_CHUNK = 500
# Rows per transaction of `contacts import` (about 60 ms of writing on SQLite): each
# commit releases the write lock the webhook receiver waits for, so a delivery waits for
# one chunk, never for the whole file.
IMPORT_CHUNK = 2_000
# SQLite has one writer, and a writer waiting for the lock (the receiver, a sync) polls
# with sleeps of up to 100 ms: chunks committed back to back would starve it (a delivery
# measured 1.5 s). A pause a little longer than that poll after each chunk lets it in.
SQLITE_YIELD_SECONDS = 0.11


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
    lines: list[int] = field(default_factory=list)  # the line of each row read, in order


# OWASP's CSV injection list: a cell starting with one of these is a formula to a
# spreadsheet (=cmd|' /C calc'!A0, =HYPERLINK(...), +SUM(...), @SUM(...)).
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: str) -> str:
    """A text cell for a CSV a person may open in a spreadsheet: a leading apostrophe
    makes a would-be formula plain text. A value that already starts with apostrophes
    before a trigger gets one more, so `csv_value` restores every value exactly (a phone
    number such as +49 151 ... round-trips through export and import)."""
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


def _csv_value(column: str, cell: str) -> FieldValue:
    text = csv_value(cell)
    if text.strip() == "":
        return None
    if "\x00" in text:
        raise ValueError(f"{column}: contains a NUL byte, which the store cannot hold")
    if not _is_utf8(text):
        raise ValueError(f"{column}: not UTF-8 text (is the file in another encoding, such "
                         "as Latin-1? save it as UTF-8)")
    if column in domain.DATETIME_FIELDS:
        try:
            return parse_datetime(text)
        except OutOfRange as exc:
            raise ValueError(f"{column}: {text!r} is {exc}") from None
        except ValueError:
            raise ValueError(f"{column}: expected an ISO 8601 datetime such as "
                             f"2026-01-31T09:30:00Z, got {text!r}") from None
    if column in domain.BOOLEAN_FIELDS:
        try:
            return parse_bool(text)
        except ValueError as exc:
            raise ValueError(f"{column}: {exc}") from None
    return text.strip()


def _is_utf8(text: str) -> bool:
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


def _rows(reader: csv.DictReader[str], source: str, report: ContactsImport
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


def read_contacts_csv(text: str, default_region: str, source: str = "<csv>"
                      ) -> tuple[list[dict[str, FieldValue]], ContactsImport]:
    """Rows to import plus the report; bad rows are refused by line, the rest kept
    (`report.lines` holds each kept row's line)."""
    report = ContactsImport()
    reader = csv.DictReader(io.StringIO(text.removeprefix("\ufeff")))
    try:
        header = [h.strip() for h in reader.fieldnames or []]
    except csv.Error as exc:
        report.refused.append(f"{source}:1: the header is not readable as CSV ({exc})")
        return [], report
    if "id" not in header:
        report.refused.append(f"{source}:1: the header has no 'id' column "
                              f"(expected some of: {', '.join(CSV_COLUMNS)})")
        return [], report
    unknown = [h for h in header if h not in CSV_COLUMNS]
    if unknown:
        report.warnings.append(
            f"{source}:1: unknown column(s) ignored: {printable(', '.join(unknown))}")
    rows: list[dict[str, FieldValue]] = []
    for line_number, raw in _rows(reader, source, report):
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
        report.lines.append(line_number)
    return rows, report


def upsert_contacts(engine: Engine, rows: Iterable[Mapping[str, FieldValue]],
                    now: datetime) -> int:
    """Insert or update by id, in one transaction; only the columns a row carries are
    touched."""
    batch = list(rows)
    with engine.begin() as connection:
        _upsert(connection, batch, now)
    return len(batch)


def import_contacts(engine: Engine, rows: Sequence[Mapping[str, FieldValue]],
                    report: ContactsImport, now: datetime, source: str,
                    chunk: int = IMPORT_CHUNK) -> None:
    """`contacts import`: upsert in transactions of `chunk` rows, so the write lock is
    never held for long. `report.imported` counts what is committed as it goes (a store
    that fails midway keeps the chunks before), `report.lines` gives each row's line.

    Should the store refuse a value the reader let through, that chunk is written again
    row by row in savepoints and only the refused rows are left out (and reported).
    """
    pause = SQLITE_YIELD_SECONDS if engine.dialect.name == "sqlite" else 0.0
    for start in range(0, len(rows), chunk):
        if start and pause:
            time.sleep(pause)  # let a waiting writer have the lock (see SQLITE_YIELD_SECONDS)
        part = rows[start:start + chunk]
        try:
            with engine.begin() as connection:
                _upsert(connection, part, now)
            report.imported += len(part)
            continue
        except REFUSED_VALUE:
            pass
        with engine.begin() as connection:
            for row, line in zip(part, report.lines[start:start + chunk], strict=True):
                try:
                    with connection.begin_nested():
                        _upsert(connection, [row], now)
                    report.imported += 1
                except REFUSED_VALUE as exc:
                    report.refused.append(f"{source}:{line}: refused by the store "
                                          f"({type(exc).__name__})")


def _upsert(connection: Connection, rows: Sequence[Mapping[str, FieldValue]],
            now: datetime) -> None:
    """One executemany per run of rows with the same columns (a CSV's rows all share its
    header); a repeated id starts a new run, so that the later row wins in file order."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    run: list[dict[str, Any]] = []
    ids: set[Any] = set()
    for row in rows:
        values = {**row, "modified_at": now}
        if run and (values.keys() != run[0].keys() or values.get("id") in ids):
            _execute_upsert(connection, dialect, run)
            run, ids = [], set()
        run.append(values)
        ids.add(values.get("id"))
    if run:
        _execute_upsert(connection, dialect, run)


def _execute_upsert(connection: Connection, dialect: Any, run: list[dict[str, Any]]) -> None:
    statement = dialect.insert(contacts)
    statement = statement.on_conflict_do_update(
        index_elements=["id"],
        set_={name: statement.excluded[name] for name in run[0] if name != "id"})
    connection.execute(statement, run)


def export_rows(engine: Engine) -> Iterator[dict[str, Any]]:
    with reading(engine) as connection:
        for row in connection.execute(select(contacts).order_by(contacts.c.id)):
            yield {column: getattr(row, column) for column in CSV_COLUMNS}

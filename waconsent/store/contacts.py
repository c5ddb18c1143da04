"""The ledger's own contacts table: imports in short chunks, exports in id order.

Imports commit every IMPORT_CHUNK rows, so the webhook receiver, which shares SQLite's
one write lock, never waits for a whole file; a row the store refuses is isolated in a
savepoint and reported by its line.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, String, select

from waconsent import domain
from waconsent.domain import FieldValue
from waconsent.store.engine import REFUSED_VALUE, dialect_insert, reading
from waconsent.store.tables import contacts

if TYPE_CHECKING:
    from waconsent.contacts_csv import ContactsImport

PHONE_FIELDS = ("mobile_phone", "phone")
CSV_COLUMNS: tuple[str, ...] = ("id", "name", *PHONE_FIELDS, *domain.LOGICAL_FIELDS)
# The contacts table's string lengths: longer values are refused by line, never cut.
COLUMN_LIMITS: dict[str, int] = {
    column.name: column.type.length
    for column in contacts.columns
    if isinstance(column.type, String) and column.type.length
}
# Rows per transaction of `contacts import` (about 60 ms of writing on SQLite): each
# commit releases the write lock the webhook receiver waits for, so a delivery waits for
# one chunk, never for the whole file.
IMPORT_CHUNK = 2_000
# SQLite has one writer, and a writer waiting for the lock (the receiver, a sync) polls
# with sleeps of up to 100 ms: chunks committed back to back would starve it (a delivery
# measured 1.5 s). A pause a little longer than that poll after each chunk lets it in.
SQLITE_YIELD_SECONDS = 0.11


def upsert_contacts(engine: Engine, rows: Iterable[Mapping[str, FieldValue]], now: datetime) -> int:
    """Insert or update by id, in one transaction; only the columns a row carries are
    touched."""
    batch = list(rows)
    with engine.begin() as connection:
        _upsert(connection, batch, now)
    return len(batch)


def import_contacts(
    engine: Engine,
    rows: Sequence[Mapping[str, FieldValue]],
    report: ContactsImport,
    now: datetime,
    source: str,
    chunk: int = IMPORT_CHUNK,
) -> None:
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
        part = rows[start : start + chunk]
        try:
            with engine.begin() as connection:
                _upsert(connection, part, now)
            report.imported += len(part)
            continue
        except REFUSED_VALUE:
            pass
        with engine.begin() as connection:
            for row, line in zip(part, report.lines[start : start + chunk], strict=True):
                try:
                    with connection.begin_nested():
                        _upsert(connection, [row], now)
                    report.imported += 1
                except REFUSED_VALUE as exc:
                    report.refused.append(
                        f"{source}:{line}: refused by the store ({type(exc).__name__})"
                    )


def _upsert(
    connection: Connection, rows: Sequence[Mapping[str, FieldValue]], now: datetime
) -> None:
    """One executemany per run of rows with the same columns (a CSV's rows all share its
    header); a repeated id starts a new run, so that the later row wins in file order."""
    run: list[dict[str, Any]] = []
    ids: set[Any] = set()
    for row in rows:
        values = {**row, "modified_at": now}
        if run and (values.keys() != run[0].keys() or values.get("id") in ids):
            _execute_upsert(connection, run)
            run, ids = [], set()
        run.append(values)
        ids.add(values.get("id"))
    if run:
        _execute_upsert(connection, run)


def _execute_upsert(connection: Connection, run: list[dict[str, Any]]) -> None:
    statement = dialect_insert(connection, contacts)
    statement = statement.on_conflict_do_update(
        index_elements=["id"],
        set_={name: statement.excluded[name] for name in run[0] if name != "id"},
    )
    connection.execute(statement, run)


def export_rows(engine: Engine) -> Iterator[dict[str, Any]]:
    with reading(engine) as connection:
        for row in connection.execute(select(contacts).order_by(contacts.c.id)):
            yield {column: getattr(row, column) for column in CSV_COLUMNS}

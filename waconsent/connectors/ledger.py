"""The built-in ledger as a CRM (`crm.kind = "ledger"`), for companies without one.

Its records live in the store's `contacts` table and its field names are the
logical names themselves, so no mapping is needed. The contacts CSV is read in
`waconsent.contacts_csv`; the table's own writes are in `store.contacts`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    ColumnElement,
    Engine,
    TypeDecorator,
    bindparam,
    func,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.types import TypeEngine

from waconsent import domain
from waconsent.config.check import LEDGER, MappingUnderCheck, Verdict, check_mapping, require_fit
from waconsent.domain import CrmRecord, FieldDescription, WriteRequest, WriteResult
from waconsent.phones import USER_ID_PREFIX, like_pattern, search_digits
from waconsent.store.contacts import COLUMN_LIMITS, PHONE_FIELDS
from waconsent.store.engine import among, reading
from waconsent.store.tables import contacts

if TYPE_CHECKING:
    from waconsent.config import LoadedConfig

_CHUNK = 500  # ids per statement
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

    def __init__(self, engine: Engine, read_chunk_size: int = 2_000, clock: Any = None) -> None:
        self._engine = engine
        # measured on a full sync: a reader thread is ~10 % faster on PostgreSQL and slower
        # on SQLite, whose every fetched row hands the interpreter lock back and forth
        self.read_ahead = engine.dialect.name != "sqlite"
        self._chunk = read_chunk_size
        self.page_size = read_chunk_size
        self._clock = clock or (lambda: datetime.now(UTC))
        self._calls = 0
        self._reading: Any = None  # issue 17: the query of the read in progress, to count

    def mapping_verdicts(self) -> list[Verdict]:
        """The shared checker over the contacts table itself: the ledger's fields are the
        logical ones, so this fails only if a migration gave a column a type the rules
        cannot use; running it keeps `check` and preflight one path for every CRM."""
        mapping = MappingUnderCheck(
            LEDGER,
            "the ledger's contacts table",
            {name: name for name in domain.LOGICAL_FIELDS},
            PHONE_FIELDS,
        )
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
        self._reading = select(contacts)
        return self._pages(self._reading, [contacts.c.id])

    def read_changed_since(self, since: datetime, cursor: str | None = None) -> Iterator[CrmRecord]:
        """By `modified_at >= since`; the ledger keeps no cursor of its own."""
        self._reading = select(contacts).where(contacts.c.modified_at >= since)
        return self._pages(self._reading, [contacts.c.modified_at, contacts.c.id])

    def total_hint(self) -> int | None:
        """The contacts the read in progress yields: one COUNT, asked only for a progress
        bar (a local query, not counted as an API call)."""
        if self._reading is None:
            return None
        with reading(self._engine) as connection:
            return int(
                connection.execute(
                    select(func.count()).select_from(self._reading.subquery())
                ).scalar_one()
            )

    def next_cursor(self) -> str | None:
        return None

    def read_by_ids(self, record_ids: Sequence[str]) -> Iterator[CrmRecord]:
        ids = list(dict.fromkeys(record_ids))
        for start in range(0, len(ids), _CHUNK):
            with reading(self._engine) as connection:
                rows = connection.execute(
                    select(contacts).where(
                        among(connection, contacts.c.id, ids[start : start + _CHUNK])
                    )
                ).all()
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
                column.like(pattern)
                for pattern in patterns
                for column in (contacts.c.mobile_phone, contacts.c.phone)
            ]
            if user_ids:
                conditions.append(among(connection, contacts.c.whatsapp_user_id, user_ids))
            rows = [
                row
                for start in range(0, len(conditions), _CHUNK)
                for row in connection.execute(
                    select(contacts).where(or_(*conditions[start : start + _CHUNK]))
                ).all()
            ]
        self._calls += 1
        yield from (_row_to_record(row) for row in rows)

    def batch_size(self, backlog: int) -> int:
        return self.write_batch_size

    def write(self, writes: Sequence[WriteRequest]) -> list[WriteResult]:
        """One transaction per `write_batch_size` contacts."""
        size = max(1, self.write_batch_size)
        return [
            result
            for start in range(0, len(writes), size)
            for result in self._write_batch(writes[start : start + size])
        ]

    def _write_batch(self, writes: Sequence[WriteRequest]) -> list[WriteResult]:
        """One transaction; writes that set the same fields go as one executemany."""
        now = self._clock()
        results: dict[int, WriteResult] = {}
        groups: dict[tuple[str, ...], list[int]] = {}
        for index, write in enumerate(writes):
            unknown = set(write.values) - set(domain.LOGICAL_FIELDS)
            if unknown:
                results[index] = WriteResult(
                    write.record_id,
                    False,
                    f"unknown field(s) {sorted(unknown)}",
                    "INVALID_FIELD",
                    permanent=True,
                )
            else:
                groups.setdefault(tuple(sorted(write.values)), []).append(index)
        with self._engine.begin() as connection:
            existing = set(
                connection.execute(
                    select(contacts.c.id).where(
                        among(connection, contacts.c.id, [w.record_id for w in writes])
                    )
                ).scalars()
            )
            for names, indexes in groups.items():
                present = [i for i in indexes if writes[i].record_id in existing]
                for i in indexes:
                    results[i] = (
                        WriteResult(writes[i].record_id, True)
                        if i in present
                        else WriteResult(
                            writes[i].record_id,
                            False,
                            "no such contact",
                            "NOT_FOUND",
                            permanent=True,
                        )
                    )
                if present:
                    statement = (
                        update(contacts)
                        .where(contacts.c.id == bindparam("_id"))
                        .values(
                            {**{n: bindparam(n) for n in names}, "modified_at": bindparam("_now")}
                        )
                    )
                    connection.execute(
                        statement,
                        [
                            {**writes[i].values, "_id": writes[i].record_id, "_now": now}
                            for i in present
                        ],
                    )
        self._calls += 1
        return [results[i] for i in range(len(writes))]

    def describe_fields(self) -> Mapping[str, FieldDescription]:
        """The contacts table's columns, typed from the table definition itself; the key
        and the ledger's own modification time are not the mapping's to update."""
        return {
            column.name: FieldDescription(
                column.name,
                _column_type(column.type),
                updateable=column.name not in ("id", "modified_at"),
                length=COLUMN_LIMITS.get(column.name),
            )
            for column in contacts.columns
        }

    def usage(self) -> Mapping[str, int | str | None]:
        return {"api_calls": self._calls}

    def close(self) -> None:
        """The engine belongs to the caller."""

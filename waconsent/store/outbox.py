"""The outbox: every decided write is stored here before it is sent, removed once confirmed.

Rows are sent revocations first. A newer decision for a record already queued is
merged into its row (newer values win, the more urgent priority stays), so a
record never has two competing writes in flight.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, func, select, update

from waconsent import domain
from waconsent.domain import Decision, FieldValue, WriteResult, jsonable
from waconsent.store.tables import outbox

_CHUNK = 500


@dataclass(frozen=True, slots=True)
class QueuedWrite:
    outbox_id: int
    record_id: str
    priority: int
    changes: tuple[Mapping[str, Any], ...]
    attempts: int

    def values(self) -> dict[str, FieldValue]:
        """Logical field -> value to write, datetimes restored from their ISO form."""
        result: dict[str, FieldValue] = {}
        for change in self.changes:
            value = change["new"]
            if change["field"] in domain.DATETIME_FIELDS and isinstance(value, str):
                value = datetime.fromisoformat(value.replace("Z", "+00:00"))
            result[change["field"]] = value
        return result


def _serialize(decision: Decision) -> list[dict[str, Any]]:
    return [{"field": c.field, "old": jsonable(c.old), "new": jsonable(c.new),
             "reason": c.reason} for c in decision.changes]


def enqueue(connection: Connection, crm: str, decisions: Sequence[Decision], run_id: int | None,
            now: datetime) -> int:
    """Queue the decisions that change something; merge with rows already queued."""
    pending = [d for d in decisions if d.changes]
    for start in range(0, len(pending), _CHUNK):
        chunk = pending[start:start + _CHUNK]
        existing = {row.record_id: row for row in connection.execute(
            select(outbox).where(outbox.c.crm == crm,
                                 outbox.c.record_id.in_([d.record_id for d in chunk])))}
        inserts = []
        for decision in chunk:
            row = existing.get(decision.record_id)
            if row is None:
                inserts.append({"crm": crm, "record_id": decision.record_id,
                                "priority": int(decision.kind), "changes": _serialize(decision),
                                "created_at": now, "run_id": run_id, "attempts": 0,
                                "permanent": False})
                continue
            merged = {c["field"]: c for c in row.changes}
            merged.update({c["field"]: c for c in _serialize(decision)})
            connection.execute(update(outbox).where(outbox.c.id == row.id).values(
                changes=list(merged.values()), priority=min(row.priority, int(decision.kind)),
                run_id=run_id, permanent=False))
        if inserts:
            connection.execute(outbox.insert(), inserts)
    return len(pending)


def sendable(connection: Connection, crm: str, after_id: int = 0, priority: int = 0,
             limit: int = 200) -> list[QueuedWrite]:
    """The next batch in send order (priority, then age); permanent failures are not resent."""
    rows = connection.execute(
        select(outbox).where(outbox.c.crm == crm, outbox.c.permanent.is_(False),
                             (outbox.c.priority > priority)
                             | ((outbox.c.priority == priority) & (outbox.c.id > after_id)))
        .order_by(outbox.c.priority, outbox.c.id).limit(limit))
    return [QueuedWrite(r.id, r.record_id, r.priority, tuple(r.changes), r.attempts)
            for r in rows]


def settle(connection: Connection, outcomes: Sequence[tuple[QueuedWrite, WriteResult]]) -> None:
    """Confirmed rows leave the outbox; failed rows stay with their error and attempt count."""
    confirmed = [queued.outbox_id for queued, result in outcomes if result.ok]
    for start in range(0, len(confirmed), _CHUNK):
        connection.execute(delete(outbox).where(outbox.c.id.in_(confirmed[start:start + _CHUNK])))
    for queued, result in outcomes:
        if not result.ok:
            connection.execute(update(outbox).where(outbox.c.id == queued.outbox_id).values(
                attempts=queued.attempts + 1, last_error=result.error[:2000],
                error_code=result.code[:100] or None, permanent=result.permanent))


def count_sendable(connection: Connection, crm: str) -> int:
    return int(connection.execute(
        select(func.count()).select_from(outbox)
        .where(outbox.c.crm == crm, outbox.c.permanent.is_(False))).scalar_one())


def pending(connection: Connection, crm: str) -> Iterator[Any]:
    yield from connection.execute(
        select(outbox).where(outbox.c.crm == crm).order_by(outbox.c.priority, outbox.c.id))


def count(connection: Connection, crm: str) -> int:
    return int(connection.execute(
        select(func.count()).select_from(outbox).where(outbox.c.crm == crm)).scalar_one())

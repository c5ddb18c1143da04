"""The outbox: every decided write is stored here before it is sent, removed once confirmed.

Rows are sent revocations first. A newer decision for a record already queued is
merged into its row (newer values win, the more urgent priority stays), so a
record never has two competing writes in flight.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, func, select, update

from waconsent import domain
from waconsent.domain import Decision, FieldValue, WriteResult, jsonable
from waconsent.store.engine import among
from waconsent.store.tables import outbox

_CHUNK = 500


@dataclass(frozen=True, slots=True)
class QueuedWrite:
    outbox_id: int
    record_id: str
    priority: int
    changes: tuple[Mapping[str, Any], ...]
    attempts: int
    basis: Mapping[str, Any] | None = None

    def state_of(self, current: Mapping[str, FieldValue]) -> str:
        """'pending' while the CRM still holds the decided-on values, 'applied' once it holds
        the new ones, 'superseded' when someone changed the record since."""
        now_values = [jsonable(current.get(c["field"])) for c in self.changes]
        if now_values == [c["new"] for c in self.changes]:
            return "applied"
        basis_holds = all(
            jsonable(current.get(name)) == value for name, value in (self.basis or {}).items()
        )
        if basis_holds and now_values == [c["old"] for c in self.changes]:
            return "pending"
        return "superseded"

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
    return [
        {"field": c.field, "old": jsonable(c.old), "new": jsonable(c.new), "reason": c.reason}
        for c in decision.changes
    ]


def _targets(changes: Sequence[Mapping[str, Any]]) -> set[tuple[str, Any]]:
    return {(c["field"], json.dumps(c["new"], sort_keys=True)) for c in changes}


def enqueue(
    connection: Connection,
    crm: str,
    decisions: Sequence[Decision],
    run_id: int | None,
    now: datetime,
) -> int:
    """Queue the decisions that change something; returns how many were queued.

    A newer decision for a record replaces its queued row: it was made from the CRM's
    current values, so its `old` values are the precondition the send checks. The same
    write that already failed for good (an unknown field, a bad type) is not queued again,
    so it is reported once instead of being retried every run.
    """
    pending = [d for d in decisions if d.changes]
    queued = 0
    for start in range(0, len(pending), _CHUNK):
        chunk = pending[start : start + _CHUNK]
        existing = {
            row.record_id: row
            for row in connection.execute(
                select(outbox).where(
                    outbox.c.crm == crm,
                    among(connection, outbox.c.record_id, [d.record_id for d in chunk]),
                )
            )
        }
        replace: list[int] = []
        inserts = []
        for decision in chunk:
            changes = _serialize(decision)
            row = existing.get(decision.record_id)
            if row is not None and row.permanent and _targets(row.changes) == _targets(changes):
                continue
            if row is not None:
                replace.append(row.id)
            inserts.append(
                {
                    "crm": crm,
                    "record_id": decision.record_id,
                    "priority": int(decision.kind),
                    "changes": changes,
                    "basis": {name: jsonable(value) for name, value in decision.basis},
                    "created_at": now,
                    "run_id": run_id,
                    "attempts": 0,
                    "permanent": False,
                }
            )
        if replace:
            connection.execute(delete(outbox).where(among(connection, outbox.c.id, replace)))
        if inserts:
            connection.execute(outbox.insert(), inserts)
        queued += len(inserts)
    return queued


def drop(connection: Connection, outbox_ids: Sequence[int]) -> None:
    if outbox_ids:
        connection.execute(delete(outbox).where(among(connection, outbox.c.id, outbox_ids)))


def sendable(
    connection: Connection,
    crm: str,
    after_id: int = 0,
    priority: int = 0,
    limit: int = 200,
    record_ids: Sequence[str] | None = None,
) -> list[QueuedWrite]:
    """The next batch in send order (priority, then age); permanent failures are not resent."""
    query = select(outbox).where(
        outbox.c.crm == crm,
        outbox.c.permanent.is_(False),
        (outbox.c.priority > priority)
        | ((outbox.c.priority == priority) & (outbox.c.id > after_id)),
    )
    if record_ids is not None:
        query = query.where(among(connection, outbox.c.record_id, record_ids))
    rows = connection.execute(query.order_by(outbox.c.priority, outbox.c.id).limit(limit)).all()
    return [
        QueuedWrite(r.id, r.record_id, r.priority, tuple(r.changes), r.attempts, r.basis)
        for r in rows
    ]


def settle(connection: Connection, outcomes: Sequence[tuple[QueuedWrite, WriteResult]]) -> None:
    """Confirmed rows leave the outbox; failed rows stay with their error and attempt count."""
    confirmed = [queued.outbox_id for queued, result in outcomes if result.ok]
    for start in range(0, len(confirmed), _CHUNK):
        connection.execute(
            delete(outbox).where(among(connection, outbox.c.id, confirmed[start : start + _CHUNK]))
        )
    for queued, result in outcomes:
        if not result.ok:
            connection.execute(
                update(outbox)
                .where(outbox.c.id == queued.outbox_id)
                .values(
                    attempts=queued.attempts + 1,
                    last_error=result.error[:2000],
                    error_code=result.code[:100] or None,
                    permanent=result.permanent,
                )
            )


def count_sendable(
    connection: Connection, crm: str, record_ids: Sequence[str] | None = None
) -> int:
    query = (
        select(func.count())
        .select_from(outbox)
        .where(outbox.c.crm == crm, outbox.c.permanent.is_(False))
    )
    if record_ids is not None:
        query = query.where(among(connection, outbox.c.record_id, record_ids))
    return int(connection.execute(query).scalar_one())


def count(connection: Connection, crm: str) -> int:
    return int(
        connection.execute(
            select(func.count()).select_from(outbox).where(outbox.c.crm == crm)
        ).scalar_one()
    )

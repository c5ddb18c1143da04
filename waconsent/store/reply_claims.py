"""The sender's side of the reply queue: the rows due, the claim before each send, and
Meta's answer (or its absence) recorded on the row.

Apart from `store.replies` (queueing with the trigger, settling by statuses, reading) so
that each side reads on its own; the rules of "never twice" are in that module's docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, Engine, bindparam, select, update

from waconsent.replies.rules import LEASE, UNKNOWN_AFTER, ReplyState, retry_at
from waconsent.store.engine import reading
from waconsent.store.replies import ERROR_LENGTH, Observation, ReplyRow, observe
from waconsent.store.tables import replies


@dataclass(frozen=True, slots=True)
class DueRow:
    id: int
    triggered_at: datetime
    rounds: int
    recipient: str  # the number, else the user id: replies to one person go in order


def due(connection: Connection, now: datetime, limit: int) -> list[DueRow]:
    """Queued rows whose time has come, in the order their triggers were written: a START
    and a STOP typed a second apart are answered in that order, not in the order of their
    message ids."""
    return [
        DueRow(row.id, row.triggered_at, row.rounds, row.wa_id or row.user_id or "")
        for row in connection.execute(
            _DUE, {"state": ReplyState.QUEUED.value, "now": now, "limit": limit}
        )
    ]


_DUE = (
    select(
        replies.c.id, replies.c.triggered_at, replies.c.rounds, replies.c.wa_id, replies.c.user_id
    )
    .where(
        replies.c.state == bindparam("state"),
        replies.c.next_attempt_at <= bindparam("now", type_=replies.c.queued_at.type),
    )
    .order_by(replies.c.triggered_at, replies.c.id)
    .limit(bindparam("limit"))
)


def claim(engine: Engine, row_id: int, holder: str, now: datetime) -> ReplyRow | None:
    """Mark a queued row as being sent, and commit, before any request leaves: a row found
    "sending" later is never sent again. None when another sender was faster."""
    with engine.begin() as connection:
        row = connection.execute(
            _CLAIM, {"row_id": row_id, "holder": holder, "lease_until": now + LEASE, "now": now}
        ).one_or_none()
    return None if row is None else ReplyRow.of(row)


# Built once: a pass claims a row per reply, and building the statement each time cost
# about as much as running it (benchmarks/replies_send.py).
_CLAIM = (
    update(replies)
    .where(replies.c.id == bindparam("row_id"), replies.c.state == ReplyState.QUEUED.value)
    .values(
        state=ReplyState.SENDING.value,
        holder=bindparam("holder"),
        lease_until=bindparam("lease_until"),
        sending_since=bindparam("now"),
        rounds=replies.c.rounds + 1,
    )
    .returning(
        replies.c.id,
        replies.c.trigger_id,
        replies.c.wa_id,
        replies.c.user_id,
        replies.c.text,
        replies.c.triggered_at,
        replies.c.rounds,
    )
)


def close_unsent(engine: Engine, row_id: int, error_code: str, error: str, now: datetime) -> None:
    """A queued row that will not be sent at all (its window closed, or it was refused too
    often): failed, with why."""
    with engine.begin() as connection:
        connection.execute(
            update(replies)
            .where(replies.c.id == row_id, replies.c.state == ReplyState.QUEUED.value)
            .values(
                state=ReplyState.FAILED.value,
                settled_at=now,
                error_code=error_code,
                error=error[:ERROR_LENGTH],
            )
        )


def record(engine: Engine, row_id: int, seen: Observation, now: datetime) -> None:
    """Meta's answer to the send: accepted (with the reply's id) or refused for good."""
    with engine.begin() as connection:
        observe(connection, {row_id: [seen]}, now)


def put_back(
    engine: Engine,
    row: ReplyRow,
    holder: str,
    now: datetime,
    *,
    error_code: str,
    error: str,
    counts: bool = True,
) -> None:
    """A refusal that says nothing was sent and that may heal: queued again, for later
    (`counts`), or at once without spending a round (the sender stopped before asking)."""
    with engine.begin() as connection:
        connection.execute(
            update(replies)
            .where(
                replies.c.id == row.id,
                replies.c.state == ReplyState.SENDING.value,
                replies.c.holder == holder,
            )
            .values(
                state=ReplyState.QUEUED.value,
                lease_until=None,
                sending_since=None,
                next_attempt_at=retry_at(row.rounds, now) if counts else now,
                rounds=row.rounds if counts else row.rounds - 1,
                error_code=error_code,
                error=error[:ERROR_LENGTH],
            )
        )


def note_no_answer(engine: Engine, row_id: int, holder: str, error: str) -> None:
    """No answer from Meta (a timeout, a dropped connection after the request left): the
    row stays "sending" for its own statuses to settle. Only why is noted."""
    with engine.begin() as connection:
        connection.execute(
            update(replies)
            .where(
                replies.c.id == row_id,
                replies.c.state == ReplyState.SENDING.value,
                replies.c.holder == holder,
            )
            .values(error=error[:ERROR_LENGTH])
        )


def mark_unknown(engine: Engine, now: datetime) -> int:
    """Rows left "sending" that no sender holds and no status settled within
    `UNKNOWN_AFTER`: unknown. They are never sent again; a status arriving later still
    settles them. Looked for with a read first: a pass runs every few seconds, and on
    SQLite a write transaction would take the lock the receiver waits for."""
    stale = (
        replies.c.state == ReplyState.SENDING.value,
        replies.c.lease_until < now,
        replies.c.sending_since <= now - UNKNOWN_AFTER,
    )
    with reading(engine) as connection:
        if connection.execute(select(replies.c.id).where(*stale).limit(1)).first() is None:
            return 0
    with engine.begin() as connection:
        result = connection.execute(
            update(replies)
            .where(*stale)
            .values(
                state=ReplyState.UNKNOWN.value,
                settled_at=now,
                error="no answer and no status from Meta: perhaps sent, never resent",
            )
        )
    return int(result.rowcount or 0)

"""The queue of confirmation replies: queued with their trigger, claimed before each send,
settled by Meta's answer or by the reply's own statuses.

Every move is one short transaction that touches one row under a condition on its state
(`UPDATE ... WHERE state = 'queued'`), so two senders on two nodes never both claim a row:
the second finds it claimed. Within a transaction the reply row is locked before the
evidence chain's head, in every path (receiver and sender alike), so the two never wait
for each other in opposite order.

Evidence: the first time a row learns its reply's message id (from Meta's answer, or from
a status after a crash lost that answer) an evidence row of kind "reply" is appended in
the same transaction: trigger, reply id, the exact text and its SHA-256, the time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, bindparam, func, or_, select, update

from waconsent.domain import Event, error_codes_text, jsonable
from waconsent.phones import user_id_key, wa_id_key
from waconsent.replies.rules import PlannedReply, ReplyState, advance, state_of_status, trigger_of
from waconsent.store import evidence as evidence_store
from waconsent.store.engine import among, insert_ignoring
from waconsent.store.tables import replies

ERROR_LENGTH = 300


@dataclass(frozen=True, slots=True)
class ReplyRow:
    """What a sender needs of a claimed row."""

    id: int
    trigger_id: str
    wa_id: str | None
    user_id: str | None
    text: str
    triggered_at: datetime
    rounds: int

    @classmethod
    def of(cls, row: Row[Any]) -> ReplyRow:
        return cls(
            row.id, row.trigger_id, row.wa_id, row.user_id, row.text, row.triggered_at, row.rounds
        )


@dataclass(frozen=True, slots=True)
class Observation:
    """Something learnt about a reply: a state, perhaps its message id, perhaps why not."""

    state: ReplyState
    at: datetime
    reply_id: str | None = None
    error_code: str | None = None
    error: str | None = None
    source: str = "send"  # "send": Meta's answer to our request; "status": a webhook status


# ---- queueing (the receiver, in the delivery's transaction) ----------------------------------


def enqueue(connection: Connection, plans: Sequence[PlannedReply], now: datetime) -> int:
    """Queue replies in the caller's transaction; a trigger already queued is a no-op (the
    unique trigger id decides, however deliveries interleave). Returns how many are new."""
    if not plans:
        return 0
    rows = [
        {
            "trigger_id": plan.trigger_id,
            "trigger_key": plan.trigger_key,
            "wa_id": plan.wa_id,
            "user_id": plan.user_id,
            "phone_key": wa_id_key(plan.wa_id),
            "uid_key": user_id_key(plan.user_id),
            "signal": plan.signal.value,
            "keyword": plan.keyword,
            "text": plan.text,
            "text_sha256": plan.text_sha256,
            "triggered_at": plan.triggered_at,
            "queued_at": now,
            "state": ReplyState.QUEUED.value,
            "next_attempt_at": now,
            "rounds": 0,
        }
        for plan in sorted(plans, key=lambda plan: plan.trigger_id)
    ]
    statement = insert_ignoring(connection, replies, ["trigger_id"]).returning(replies.c.id)
    return len(connection.execute(statement, rows).scalars().all())


def settle(connection: Connection, statuses: Iterable[Event], now: datetime) -> int:
    """Apply the statuses of waconsent's own replies, in the caller's transaction: found by
    their callback data (which names the trigger, so a reply whose send was never recorded
    is found too), or, for a `failed` status without it, by the reply's message id.
    Returns how many statuses matched a reply. A delivery costs two statements however
    many of its statuses are ours (plus the evidence of rows that learn their reply's id)."""
    by_trigger: dict[str, list[Event]] = {}
    failed_by_id: dict[str, list[Event]] = {}
    for event in statuses:
        trigger = trigger_of(event.callback_data)
        if trigger is not None:
            by_trigger.setdefault(trigger, []).append(event)
        elif event.status == "failed" and event.message_id:
            failed_by_id.setdefault(event.message_id, []).append(event)
    if not by_trigger and not failed_by_id:
        return 0
    conditions = [
        among(connection, column, sorted(wanted))
        for column, wanted in (
            (replies.c.trigger_id, by_trigger),
            (replies.c.reply_id, failed_by_id),
        )
        if wanted
    ]
    ids = connection.execute(
        select(replies.c.id, replies.c.trigger_id, replies.c.reply_id).where(or_(*conditions))
    ).all()
    seen: dict[int, list[Observation]] = {}
    for row_id, trigger_id, reply_id in ids:
        found = by_trigger.get(trigger_id, []) + failed_by_id.get(reply_id or "", [])
        seen[row_id] = [o for o in map(_from_status, found) if o is not None]
    observe(connection, seen, now)
    return sum(len(observations) for observations in seen.values())


def _from_status(event: Event) -> Observation | None:
    state = state_of_status(event.status)
    if state is None:
        return None
    code = error_codes_text(event.error_codes)
    return Observation(
        state,
        event.occurred_at,
        reply_id=event.message_id,
        error_code=code,
        error=f"Meta reported the reply failed (error {code})"
        if state is ReplyState.FAILED
        else None,
        source="status",
    )


# Built once (a delivery of statuses, and every reply sent, runs these).
_LOCKED_ROWS = (
    select(replies)
    .where(replies.c.id.in_(bindparam("ids", expanding=True)))
    .order_by(replies.c.id)
    .with_for_update()
)
_MOVED = (
    "state",
    "reply_id",
    "sent_at",
    "delivered_at",
    "read_at",
    "settled_at",
    "error_code",
    "error",
)
_MOVE = (
    update(replies)
    .where(replies.c.id == bindparam("row_id"))
    .values({name: bindparam(f"new_{name}") for name in _MOVED})
)
_STAMPS = {
    ReplyState.SENT: "sent_at",
    ReplyState.DELIVERED: "delivered_at",
    ReplyState.READ: "read_at",
}


def observe(
    connection: Connection, seen: Mapping[int, Sequence[Observation]], now: datetime
) -> None:
    """Move rows forwards (never back), each by its observations, and append the evidence
    of each reply whose row first learns its message id. Rows are locked first, in id
    order (see the module's docstring on lock order)."""
    if not seen:
        return
    rows = connection.execute(_LOCKED_ROWS, {"ids": sorted(seen)}).all()
    moves, entries = [], []
    for row in rows:
        values, learnt = _folded(row, sorted(seen[row.id], key=lambda o: o.at), now)
        moves.append({"row_id": row.id, **{f"new_{k}": v for k, v in values.items()}})
        if learnt is not None:
            entries.append(
                evidence_store.EvidenceEntry(
                    kind="reply",
                    phone_key=row.phone_key,
                    uid_key=row.uid_key,
                    body={
                        "trigger_id": row.trigger_id,
                        "trigger_key": row.trigger_key,
                        "reply_id": values["reply_id"],
                        "signal": row.signal,
                        "keyword": row.keyword,
                        "text": row.text,
                        "text_sha256": row.text_sha256,
                        "sent_at": values["sent_at"],
                        "learnt_from": learnt.source,
                    },
                )
            )
    if moves:
        connection.execute(_MOVE, moves)
    evidence_store.append(connection, entries, now)


def _folded(
    row: Row[Any], observations: Sequence[Observation], now: datetime
) -> tuple[dict[str, Any], Observation | None]:
    """The row's moved columns after the observations (oldest first), and the observation
    that taught it its reply's id, if one did."""
    values = {name: getattr(row, name) for name in _MOVED}
    learnt = None
    for seen in observations:
        state = advance(ReplyState(values["state"]), seen.state)
        if values["reply_id"] is None and seen.reply_id is not None:
            values.update(reply_id=seen.reply_id, sent_at=values["sent_at"] or seen.at)
            learnt = seen
        stamp = _STAMPS.get(seen.state)
        if stamp and values[stamp] is None:
            values[stamp] = seen.at
        if state is ReplyState.FAILED and values["state"] != ReplyState.FAILED.value:
            values.update(
                settled_at=now,
                error_code=seen.error_code,
                error=(seen.error or "")[:ERROR_LENGTH] or None,
            )
        values["state"] = state.value
    return values, learnt


# ---- reading ---------------------------------------------------------------------------------


def counts(connection: Connection) -> dict[str, int]:
    found = Counter({state.value: 0 for state in ReplyState})
    for state, number in connection.execute(
        select(replies.c.state, func.count()).group_by(replies.c.state)
    ):
        found[state] = int(number)
    return dict(found)


def listing(connection: Connection, states: Sequence[str], limit: int) -> list[Row[Any]]:
    """The newest rows first, optionally only in the given states."""
    query = select(replies).order_by(replies.c.queued_at.desc(), replies.c.id.desc()).limit(limit)
    if states:
        query = query.where(replies.c.state.in_(states))
    return list(connection.execute(query))


def for_keys(connection: Connection, keys: Sequence[str]) -> list[Row[Any]]:
    """The replies to the person behind the match keys (numbers and user ids)."""
    if not keys:
        return []
    return list(
        connection.execute(
            select(replies)
            .where(
                or_(
                    among(connection, replies.c.phone_key, keys),
                    among(connection, replies.c.uid_key, keys),
                )
            )
            .order_by(replies.c.triggered_at, replies.c.id)
        )
    )


# ---- `waconsent proof` -----------------------------------------------------------------------


def under_triggers(entries: list[dict[str, Any]], rows: Sequence[Row[Any]]) -> list[dict[str, Any]]:
    """The proof's entries with each reply placed right under the message it answered (or,
    when that message is not among them, at the time it was queued)."""
    result = list(entries)
    for row in rows:
        entry = _proof_entry(row)
        at = next((i for i, e in enumerate(result) if e.get("id") == row.trigger_id), None)
        if at is None:
            at = next(
                (i - 1 for i, e in enumerate(result) if e["at"] > entry["at"]), len(result) - 1
            )
        while at + 1 < len(result) and result[at + 1].get("trigger_id") == row.trigger_id:
            at += 1
        result.insert(at + 1, entry)
    return result


def _proof_entry(row: Row[Any]) -> dict[str, Any]:
    when = [
        f"{name} {jsonable(moment)}"
        for name, moment in (("delivered", row.delivered_at), ("read", row.read_at))
        if moment is not None
    ]
    if row.error:
        when.append(f"{row.error_code}: {row.error}" if row.error_code else row.error)
    detail = f'"{row.text}" (sha256 {row.text_sha256[:16]}...)'
    return {
        "at": jsonable(row.sent_at or row.queued_at),
        "what": f"WhatsApp reply {row.state}",
        "detail": "; ".join([detail, *when]),
        "id": row.reply_id or "",
        "source": f"reply to {row.trigger_id}",
        "trigger_id": row.trigger_id,
        "state": row.state,
        "text": row.text,
        "text_sha256": row.text_sha256,
    }

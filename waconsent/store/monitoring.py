"""What a monitoring scrape reads from the store: the outbox's depth and age, and when each
CRM last finished a run. Two small grouped queries, cheap enough for every scrape: the
outbox is read through its send-order index (crm, permanent, ...), the runs table holds
a few rows a day per mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, func, select

from waconsent.store.tables import outbox, runs

#: a run "succeeded" when it finished its write-back; a partial run's failed writes stay
#: queued, and the outbox's age says so (the same statuses that may move the watermarks)
SUCCEEDED = ("ok", "partial")


@dataclass(frozen=True, slots=True)
class OutboxState:
    crm: str
    pending: int  # waiting to be sent (or re-sent) by the next run
    permanent: int  # refused by the CRM for good: they wait for a person, not for a run
    oldest_pending: datetime | None  # when the oldest pending row was queued


def outbox_state(connection: Connection) -> list[OutboxState]:
    """One state per CRM that has rows in the outbox, by CRM name."""
    rows = connection.execute(
        select(
            outbox.c.crm, outbox.c.permanent, func.count(), func.min(outbox.c.created_at)
        ).group_by(outbox.c.crm, outbox.c.permanent)
    )
    states: dict[str, OutboxState] = {}
    for crm, permanent, count, oldest in rows:
        state = states.get(crm, OutboxState(crm, 0, 0, None))
        if permanent:
            state = OutboxState(crm, state.pending, int(count), state.oldest_pending)
        else:
            state = OutboxState(crm, int(count), state.permanent, oldest)
        states[crm] = state
    return [states[crm] for crm in sorted(states)]


def last_successes(connection: Connection) -> dict[tuple[str, str], datetime]:
    """(crm, mode) -> when the newest run of that mode finished its write-back."""
    rows = connection.execute(
        select(runs.c.crm, runs.c.mode, func.max(runs.c.finished_at))
        .where(runs.c.status.in_(SUCCEEDED), runs.c.finished_at.is_not(None))
        .group_by(runs.c.crm, runs.c.mode)
    )
    return {(crm, mode): finished for crm, mode, finished in rows if finished is not None}

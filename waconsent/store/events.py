"""Stored WhatsApp events: deduplicated by a unique key, found again by match key."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from operator import attrgetter
from typing import Any

from sqlalchemy import Connection, Row, String, func, or_, select

from waconsent.domain import CONSENT_SIGNALS, Event, EventKind, Signal, error_codes_text
from waconsent.phones import user_id_key, wa_id_key
from waconsent.store import evidence as evidence_store
from waconsent.store import identity
from waconsent.store.engine import among, insert_ignoring
from waconsent.store.tables import events

EVIDENCE_SIGNALS = frozenset(
    {Signal.OPT_IN, Signal.OPT_OUT, Signal.RESUME, Signal.NUMBER_CHANGED, Signal.USER_ID_CHANGED}
)
# Events the rules read whole (the rest only as aggregates): consent, and user-id changes.
WHOLE_SIGNALS = sorted(signal.value for signal in (*CONSENT_SIGNALS, Signal.USER_ID_CHANGED))
_CHUNK = 500


@dataclass(frozen=True, slots=True)
class IngestCounts:
    stored: int
    duplicates: int
    stored_keys: frozenset[str] = frozenset()  # the keys of the events new to the store


def _row(event: Event, source: str, now: datetime) -> dict[str, Any]:
    return {
        "key": event.key,
        "kind": event.kind.value,
        "occurred_at": event.occurred_at,
        "wa_id": event.wa_id,
        "user_id": event.user_id,
        "new_user_id": event.new_user_id,
        "phone_key": wa_id_key(event.wa_id),
        "uid_key": user_id_key(event.match_user_id),
        "message_id": event.message_id,
        "message_type": event.message_type,
        "status": event.status,
        "error_codes": error_codes_text(event.error_codes),
        "signal": event.signal.value,
        "keyword": event.keyword,
        "opens_session": event.opens_session,
        "window_expires_at": event.window_expires_at,
        "referral_source_id": event.referral_source_id,
        "new_wa_id": event.new_wa_id,
        "detail": event.detail,
        "source": source[:300],
        "received_at": now,
        "opt_in_ip": event.opt_in_ip,
        "opt_in_form": event.opt_in_form,  # issue 15
    }


# The longest value of each stored text column, read from the `events` table itself (the
# one source of truth): a longer value is garbage, and its item is skipped here rather than
# failing the whole delivery in the store. The derived columns fit whenever these do
# (`phone_key` holds at most 16 characters, `uid_key` is `uid:` + a user id). The key is
# checked last: it is built from the other fields, and a skip should name the field at fault.
_EVENT_FIELDS = frozenset(f.name for f in fields(Event))
FIELD_LIMITS: dict[str, int] = {
    column.name: column.type.length
    for column in sorted(events.columns, key=lambda column: column.name == "key")
    if isinstance(column.type, String) and column.type.length and column.name in _EVENT_FIELDS
}


_CHECKED = tuple(
    (name, limit, attrgetter(name)) for name, limit in FIELD_LIMITS.items() if name != "error_codes"
)


def unstorable(event: Event) -> str | None:
    """Why the store could not hold the event (None: it can): a value longer than its
    column, or text UTF-8 cannot encode. Error codes are checked as the store writes them:
    one comma-separated text. (Runs for every item of every delivery: kept lean.)"""
    for name, limit, read in _CHECKED:
        value = read(event)
        if value is not None and (len(value) > limit or not value.isascii()):
            problem = _why_unstorable(name, limit, value)
            if problem is not None:
                return problem
    if event.error_codes:
        text = error_codes_text(event.error_codes) or ""
        if len(text) > FIELD_LIMITS["error_codes"]:
            return f"error_codes longer than {FIELD_LIMITS['error_codes']} characters"
    return None


def _why_unstorable(name: str, limit: int, value: str) -> str | None:
    if len(value) > limit:
        return f"{name} longer than {limit} characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"{name} is not valid Unicode (a lone surrogate)"
    return None


def _insert_ignoring_duplicates(connection: Connection) -> Any:
    return insert_ignoring(connection, events, ["key"])


def ingest(
    connection: Connection, batch: Sequence[Event], source: str, now: datetime
) -> IngestCounts:
    """Store new events and their evidence in the caller's transaction; duplicates are no-ops.

    Deduplication is the unique constraint's job, so concurrent identical
    deliveries store one row however they interleave.
    """
    # key order: two deliveries with overlapping keys lock rows in the same order (no deadlock)
    unique = sorted({event.key: event for event in batch}.values(), key=lambda e: e.key)
    stored_keys: set[str] = set()
    for start in range(0, len(unique), _CHUNK):
        chunk = unique[start : start + _CHUNK]
        statement = _insert_ignoring_duplicates(connection).returning(events.c.key)
        result = connection.execute(statement, [_row(e, source, now) for e in chunk])
        stored_keys.update(result.scalars().all())
    entries = [
        evidence_store.EvidenceEntry(
            kind="event",
            body=_evidence_body(event, source),
            phone_key=wa_id_key(event.wa_id),
            uid_key=user_id_key(event.match_user_id),
        )
        for event in unique
        if event.key in stored_keys and event.signal in EVIDENCE_SIGNALS
    ]
    evidence_store.append(connection, entries, now)
    identity.record(
        connection,
        [e for e in unique if e.key in stored_keys and e.signal is Signal.USER_ID_CHANGED],
    )
    return IngestCounts(
        stored=len(stored_keys),
        duplicates=len(batch) - len(stored_keys),
        stored_keys=frozenset(stored_keys),
    )


def _evidence_body(event: Event, source: str) -> dict[str, Any]:
    return {
        "event_key": event.key,
        "signal": event.signal.value,
        "occurred_at": event.occurred_at,
        "keyword": event.keyword,
        "message_id": event.message_id,
        "evidence": event.evidence,
        "new_wa_id": event.new_wa_id,
        "new_user_id": event.new_user_id,
        "source": source,
        **(
            {"opt_in_ip": event.opt_in_ip, "opt_in_form": event.opt_in_form}
            if event.opt_in_form
            else {}
        ),
    }  # issue 15: older bodies (and hashes) unchanged


_KINDS = {kind.value: kind for kind in EventKind}
_SIGNALS = {signal.value: signal for signal in Signal}


# What an Event needs, in this order; the bookkeeping columns (source, received_at) stay
# in the database.
EVENT_COLUMNS = [
    events.c[name]
    for name in (
        "key",
        "kind",
        "occurred_at",
        "wa_id",
        "user_id",
        "phone_key",
        "uid_key",
        "message_id",
        "message_type",
        "status",
        "error_codes",
        "signal",
        "keyword",
        "opens_session",
        "window_expires_at",
        "referral_source_id",
        "new_wa_id",
        "detail",
        "new_user_id",
        "opt_in_ip",
        "opt_in_form",
    )
]


def to_event(row: Row[Any]) -> Event:
    """A row of `select(*EVENT_COLUMNS)`, unpacked by position: this runs once per event
    per sync, and attribute access by name costs more than the rest of it."""
    (
        key,
        kind,
        occurred_at,
        wa_id,
        user_id,
        _phone_key,
        _uid_key,
        message_id,
        message_type,
        status,
        error_codes,
        signal,
        keyword,
        opens_session,
        window_expires_at,
        referral_source_id,
        new_wa_id,
        detail,
        new_user_id,
        opt_in_ip,
        opt_in_form,
    ) = tuple(row)
    return Event(
        key=key,
        kind=_KINDS[kind],
        occurred_at=occurred_at,
        wa_id=wa_id,
        user_id=user_id,
        message_id=message_id,
        message_type=message_type,
        status=status,
        error_codes=tuple(int(c) for c in error_codes.split(",")) if error_codes else (),
        signal=_SIGNALS[signal],
        keyword=keyword,
        opens_session=opens_session,
        window_expires_at=window_expires_at,
        referral_source_id=referral_source_id,
        new_wa_id=new_wa_id,
        detail=detail,
        new_user_id=new_user_id,
        opt_in_ip=opt_in_ip,
        opt_in_form=opt_in_form,
    )


def newest_id(connection: Connection) -> int:
    return int(connection.execute(select(func.coalesce(func.max(events.c.id), 0))).scalar_one())


# What can change a record's fields: a consent signal, a user message (the session), a free
# entry point window, a changed number or user id. The plain statuses of the business's own
# messages (sent, delivered, read) cannot, so after a campaign they cost no read.
_MEANINGFUL = or_(
    events.c.signal.in_(
        [s.value for s in (*CONSENT_SIGNALS, Signal.NUMBER_CHANGED, Signal.USER_ID_CHANGED)]
    ),
    events.c.opens_session.is_(True),
    events.c.window_expires_at.is_not(None),
)


def keys_after(
    connection: Connection,
    after_id: int,
    up_to_id: int,
    received_since: datetime | None = None,
    *,
    meaningful_only: bool = False,
) -> Iterator[str]:
    """Match keys of events stored in (after_id, up_to_id]; `meaningful_only`: only events
    that can change a field (whose records need a look in an incremental run).

    `received_since` widens the window to rows received since then whatever their id: on
    PostgreSQL ids are handed out at insert but rows appear at commit, so a delivery that
    committed late can sit below the last run's id watermark.
    """
    newer = events.c.id > after_id
    if received_since is not None:
        newer = or_(newer, events.c.received_at >= received_since)
    query = (
        select(events.c.phone_key, events.c.uid_key)
        .where(newer, events.c.id <= up_to_id)
        .distinct()
    )
    if meaningful_only:
        query = query.where(_MEANINGFUL)
    for phone_key, uid_key in connection.execute(query):
        if phone_key:
            yield phone_key
        if uid_key:
            yield uid_key


def in_range(
    connection: Connection, after_id: int, up_to_id: int, signal: Signal | None = None
) -> Iterator[Event]:
    query = select(*EVENT_COLUMNS).where(events.c.id > after_id, events.c.id <= up_to_id)
    if signal is not None:
        query = query.where(events.c.signal == signal.value)
    for row in connection.execute(query.order_by(events.c.id)):
        yield to_event(row)


def for_proof(connection: Connection, keys: Sequence[str]) -> list[Any]:
    return list(
        connection.execute(
            select(events)
            .where(
                or_(
                    among(connection, events.c.phone_key, keys),
                    among(connection, events.c.uid_key, keys),
                )
            )
            .order_by(events.c.occurred_at, events.c.id)
        )
    )

"""May we message this number now? The pre-send check's rules, pure (issue 16).

The last sync left, per record, the consent fields it read with its decided writes applied
(`Held`, kept in the store's consent snapshot). What arrived on WhatsApp since (a STOP, a
`user_preferences` stop, a 131050, a START, a user message) is applied to that with the very
rules a sync uses (`rules.decide`), so the answer is the one the next sync will write, now.
Applying an event the sync already saw changes nothing (the rules are idempotent and the
newest consent change wins), so "since" may safely reach a little further back.

Marketing: at least one record opted in with complete proof, and none revoked (a number on
several records is allowed only if none of them is revoked). Service: a customer service or
free entry point window is open now.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from waconsent.domain import (
    LAST_INBOUND,
    OPT_IN,
    OPT_IN_DATE,
    OPT_IN_SOURCE,
    OPT_OUT_DATE,
    SESSION_EXPIRES,
    Activity,
    CrmRecord,
    Decision,
    FieldValue,
    to_second,
)
from waconsent.sync import rules

MARKETING, SERVICE = "marketing", "service"
PURPOSES = (MARKETING, SERVICE)

OPTED_IN = "opted_in"
NO_CONSENT = "no_consent"
REVOKED = "revoked"
PROOF_MISSING = "proof_missing"
NO_RECORD = "no_record"
UNPARSEABLE_NUMBER = "unparseable_number"
SESSION_OPEN = "session_open"
SESSION_CLOSED = "session_closed"
REASONS = (
    OPTED_IN,
    NO_CONSENT,
    REVOKED,
    PROOF_MISSING,
    NO_RECORD,
    UNPARSEABLE_NUMBER,
    SESSION_OPEN,
    SESSION_CLOSED,
)

# What the check lets the rules write: consent and the session, never the proof fields
# (the snapshot keeps whether proof was complete, not the IP or the source themselves).
_CHECKED_FIELDS = frozenset(
    {OPT_IN, OPT_IN_DATE, OPT_IN_SOURCE, OPT_OUT_DATE, LAST_INBOUND, SESSION_EXPIRES}
)


class Held(NamedTuple):
    """One record as the last sync left it: read, with the writes it decided applied.
    A named tuple, not a frozen dataclass: a full sync builds one per record, and a tuple
    is built in a third of the time."""

    record_id: str
    opt_in: bool | None
    opt_in_date: datetime | None
    opt_out_date: datetime | None
    proof_complete: bool
    session_expires: datetime | None


@dataclass(frozen=True, slots=True)
class Answer:
    may_send: bool
    reason: str
    session_open_until: datetime | None = None
    records: tuple[str, ...] = ()


UNPARSEABLE = Answer(False, UNPARSEABLE_NUMBER)


def _when(value: FieldValue) -> datetime | None:
    return value if isinstance(value, datetime) else None


def held_after(record: CrmRecord, decision: Decision, activity: Activity) -> Held:
    """What the sync leaves in the snapshot: the record with its decided writes applied.

    The session is the rules' own (the newest user message + 24 h, or a later free entry
    point window), also where the CRM maps no `session_expires` field.
    """
    # Most records of a run change nothing: read their fields as they are, without a copy.
    after = rules.apply(record, decision).fields if decision.changes else record.fields
    session = _session_from(activity)
    expires = after.get(SESSION_EXPIRES)
    if isinstance(expires, datetime) and (session is None or expires > session):
        session = expires
    opt_in = after.get(OPT_IN)
    return Held(
        record.record_id,
        opt_in if isinstance(opt_in, bool) else None,
        _when(after.get(OPT_IN_DATE)),
        _when(after.get(OPT_OUT_DATE)),
        opt_in is True and not decision.proof_missing,
        session,
    )


def _session_from(activity: Activity) -> datetime | None:
    window, inbound = activity.window_expires_at, activity.last_inbound
    if window is None and inbound is None:
        return None  # most records: no message ever, so no window (a full sync asks each)
    ends = [to_second(window)] if window is not None else []
    if inbound is not None:
        ends.append(to_second(inbound) + rules.SERVICE_WINDOW)
    return max(ends)


@dataclass(frozen=True, slots=True)
class Now:
    """A record's consent at the moment of the check."""

    record_id: str
    opted_in: bool
    revoked: bool
    proof_complete: bool
    session_expires: datetime | None


def consent_now(held: Held, since: Activity, now: datetime) -> Now:
    """The held record with the events received since applied by the sync's own rules."""
    if not since:  # nothing arrived: the held record is the answer (most numbers, most days)
        opted_in = held.opt_in is True
        return Now(
            held.record_id,
            opted_in,
            not opted_in and held.opt_out_date is not None,
            opted_in and held.proof_complete,
            held.session_expires,
        )
    fields: dict[str, FieldValue] = {
        OPT_IN: held.opt_in,
        OPT_IN_DATE: held.opt_in_date,
        OPT_OUT_DATE: held.opt_out_date,
        SESSION_EXPIRES: held.session_expires,
    }
    record = CrmRecord(held.record_id, fields)
    decision = rules.decide(record, since, _CHECKED_FIELDS, now)
    after = rules.apply(record, decision).fields if decision.changes else fields
    opted_in = after.get(OPT_IN) is True
    # a fresh opt-in in WhatsApp brings its own proof (the message id); otherwise the proof
    # is what the sync found
    proof = not decision.proof_missing if decision.changed(OPT_IN_SOURCE) else held.proof_complete
    session = max(
        (m for m in (_when(after.get(SESSION_EXPIRES)), _session_from(since)) if m is not None),
        default=None,
    )
    return Now(
        held.record_id,
        opted_in,
        not opted_in and _when(after.get(OPT_OUT_DATE)) is not None,
        opted_in and proof,
        session,
    )


def answer(
    purpose: str, records: Sequence[tuple[Held, Activity]], unmatched: Activity, now: datetime
) -> Answer:
    """The answer for one number: `records` are its records with what arrived since each
    was synced; `unmatched` is what arrived for a number no record carries (it can only
    open a service window)."""
    states = [consent_now(held, since, now) for held, since in records]
    ids = tuple(sorted(state.record_id for state in states))
    ends = [s.session_expires for s in states if s.session_expires is not None]
    if not states and (loose := _session_from(unmatched)) is not None:
        ends.append(loose)
    session_end = max(ends, default=None)
    open_until = session_end if session_end is not None and session_end > now else None
    if purpose == SERVICE:
        if open_until is not None:
            return Answer(True, SESSION_OPEN, open_until, ids)
        return Answer(False, SESSION_CLOSED if states else NO_RECORD, None, ids)
    if not states:
        return Answer(False, NO_RECORD, open_until)
    reason = _marketing_reason(states)
    return Answer(reason == OPTED_IN, reason, open_until, ids)


def _marketing_reason(states: Sequence[Now]) -> str:
    """One revoked record makes the number a no; else one opted-in record with complete
    proof is enough, and missing proof outranks no consent."""
    if any(state.revoked for state in states):
        return REVOKED
    if any(state.proof_complete for state in states):
        return OPTED_IN
    if any(state.opted_in for state in states):
        return PROOF_MISSING
    return NO_CONSENT

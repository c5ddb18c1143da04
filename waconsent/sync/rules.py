"""The consent rules of SPEC section 5, as pure functions over plain data.

`decide` takes one record's current consent fields, the activity of the events
matched to it (`Activity`: every consent signal, the newest user message, the
latest window expiry, the newest user id), the set of logical fields the CRM has
mapped, and `now`; it returns the field changes and notes. No clock, database or
HTTP in here: that is what makes the rules property-testable (idempotence, order
independence, no implied consent).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime, timedelta

from waconsent.domain import (
    CONSENT_BASIS,
    LAST_INBOUND,
    OPT_IN,
    OPT_IN_DATE,
    OPT_IN_IP,
    OPT_IN_SOURCE,
    OPT_OUT_DATE,
    PROOF_MISSING,
    SESSION_EXPIRES,
    WHATSAPP_USER_ID,
    Activity,
    CrmRecord,
    Decision,
    Event,
    FieldChange,
    FieldValue,
    Signal,
    UserIdChange,
    to_second,
)

SERVICE_WINDOW = timedelta(hours=24)


def _when(value: FieldValue) -> datetime | None:
    return to_second(value) if isinstance(value, datetime) else None


def _stamp(moment: datetime) -> str:
    return to_second(moment).isoformat().replace("+00:00", "Z")


def has_message_evidence(source: str | None) -> bool:
    """A WhatsApp message id in the source: a raw `wamid.` id, or exactly our own
    `whatsapp:keyword:<KEYWORD>:<message id>` form (a free-text `whatsapp:...` is not)."""
    if not source:
        return False
    if "wamid." in source:
        return True
    parts = source.split(":")
    if parts[0] == "website":  # issue 15: website:form:<form>:token:<ref>:<message id>
        return len(parts) >= 6 and parts[1] == "form" and bool(":".join(parts[5:]).strip())
    return (
        len(parts) == 4
        and parts[:2] == ["whatsapp", "keyword"]
        and bool(parts[2].strip())
        and bool(parts[3].strip())
    )


def proof_gaps(fields: Mapping[str, FieldValue]) -> list[str]:
    """SPEC 5.7: what an opted-in record lacks for complete proof (empty: complete)."""
    gaps = []
    if _when(fields.get(OPT_IN_DATE)) is None:
        gaps.append("opt_in_date")
    source = fields.get(OPT_IN_SOURCE)
    source_text = source if isinstance(source, str) and source.strip() else None
    if source_text is None:
        gaps.append("opt_in_source")
    ip = fields.get(OPT_IN_IP)
    if not (isinstance(ip, str) and ip.strip()) and not has_message_evidence(source_text):
        gaps.append("opt_in_ip or a WhatsApp message id in opt_in_source")
    return gaps


def _consent_winner(events: Iterable[Event]) -> Event | None:
    """The newest consent event; at the same second an opt-out beats an opt-in."""
    candidates = [e for e in events if e.signal in (Signal.OPT_IN, Signal.OPT_OUT)]
    if not candidates:
        return None
    return max(
        candidates, key=lambda e: (to_second(e.occurred_at), e.signal is Signal.OPT_OUT, e.key)
    )


def _is_fresh(event: Event, opt_in_date: datetime | None, opt_out_date: datetime | None) -> bool:
    """Newest wins (5.5): newer than the CRM's last consent change, to the second.

    At the same second an opt-out beats an opt-in (as within one run), so a STOP at the
    second of a recorded opt-in still applies; nothing repeats a change already recorded.
    """
    at = to_second(event.occurred_at)
    if event.signal is Signal.OPT_OUT:
        return (opt_out_date is None or at > opt_out_date) and (
            opt_in_date is None or at >= opt_in_date
        )
    return (opt_in_date is None or at > opt_in_date) and (opt_out_date is None or at > opt_out_date)


def _consent_targets(
    fields: Mapping[str, FieldValue], events: Sequence[Event]
) -> tuple[dict[str, tuple[FieldValue, str]], list[str]]:
    """Only events newer than the CRM's own last consent change apply; the newest wins."""
    opt_in_date = _when(fields.get(OPT_IN_DATE))
    opt_out_date = _when(fields.get(OPT_OUT_DATE))
    signals = [e for e in events if e.signal in (Signal.OPT_IN, Signal.OPT_OUT)]
    fresh = [e for e in signals if _is_fresh(e, opt_in_date, opt_out_date)]
    targets: dict[str, tuple[FieldValue, str]] = {}
    winner = _consent_winner(fresh)
    if winner is not None:
        at = to_second(winner.occurred_at)
        if winner.signal is Signal.OPT_OUT:
            why = f"opt-out by {winner.evidence} at {_stamp(at)}"
            targets[OPT_IN] = (False, why)
            targets[OPT_OUT_DATE] = (at, why)
        else:
            why = f"opt-in by {winner.evidence} at {_stamp(at)}"
            targets[OPT_IN] = (True, why)
            targets[OPT_IN_DATE] = (at, why)
            targets[OPT_IN_SOURCE] = (winner.evidence, why)
            if winner.opt_in_ip:  # issue 15: a website opt-in confirmed in the chat
                targets[OPT_IN_IP] = (winner.opt_in_ip, why)
    stale = [e for e in signals if not _is_fresh(e, opt_in_date, opt_out_date)]
    return targets, _stale_conflicts(fields, stale, opt_in_date, opt_out_date)


def _stale_conflicts(
    fields: Mapping[str, FieldValue],
    stale: Sequence[Event],
    opt_in_date: datetime | None,
    opt_out_date: datetime | None,
) -> list[str]:
    """WhatsApp signals the CRM overrode with a newer change it made itself (the CRM stands).

    A signal the CRM already recorded (its date is the recorded one) is history, not a
    conflict.
    """
    opted_in = fields.get(OPT_IN) is True
    notes = []
    for event in sorted(stale, key=lambda e: (e.occurred_at, e.key)):
        at = to_second(event.occurred_at)
        if (
            event.signal is Signal.OPT_OUT
            and opted_in
            and opt_in_date is not None
            and at < opt_in_date
            and (opt_out_date is None or opt_out_date < at)
        ):
            notes.append(
                f"WhatsApp opt-out ({event.evidence}) at {_stamp(at)} is older than "
                f"the CRM's opt-in of {_stamp(opt_in_date)}; the CRM's "
                "re-subscription stands"
            )
        elif (
            event.signal is Signal.OPT_IN
            and not opted_in
            and opt_out_date is not None
            and at < opt_out_date
            and (opt_in_date is None or opt_in_date < at)
        ):
            notes.append(
                f"WhatsApp opt-in ({event.evidence}) at {_stamp(at)} is older than "
                f"the CRM's opt-out of {_stamp(opt_out_date)}; the CRM's opt-out stands"
            )
    return notes


def _session_targets(
    fields: Mapping[str, FieldValue], activity: Activity
) -> dict[str, tuple[FieldValue, str]]:
    """5.1: the newest user message opens 24 h; a later free-entry-point expiry extends it."""
    targets: dict[str, tuple[FieldValue, str]] = {}
    inbound = _when(activity.last_inbound)
    expiry_at = activity.window_expires_at
    expiries = [to_second(expiry_at)] if expiry_at else []
    if inbound is not None:
        current = _when(fields.get(LAST_INBOUND))
        if current is None or inbound > current:
            targets[LAST_INBOUND] = (inbound, f"user message at {_stamp(inbound)}")
        expiries.append(inbound + SERVICE_WINDOW)
    if expiries:
        expiry = max(expiries)
        current_expiry = _when(fields.get(SESSION_EXPIRES))
        if current_expiry is None or expiry > current_expiry:
            why = (
                "free entry point window"
                if inbound is None or expiry > inbound + SERVICE_WINDOW
                else "24-hour customer service window"
            )
            targets[SESSION_EXPIRES] = (expiry, why)
    return targets


def current_user_id(start: str, changes: Sequence[UserIdChange]) -> str:
    """Where announced changes lead from `start`: each change from the id in hand moves it
    on (the newest first where two changes leave one id); a loop ends where it began."""
    seen = {start}
    current = start
    while True:
        onward = [c for c in changes if c.previous == current and c.new not in seen]
        if not onward:
            return current
        current = max(onward, key=lambda c: (c.at, c.new)).new
        seen.add(current)


def _user_id_target(
    fields: Mapping[str, FieldValue], activity: Activity
) -> dict[str, tuple[FieldValue, str]]:
    """The record's business-scoped user id: the newest seen, written once a record is
    matched by number; after that it moves only where Meta announced the change."""
    held = fields.get(WHATSAPP_USER_ID)
    start = held if isinstance(held, str) and held else None
    if start is None:
        if activity.newest_user_id is None:
            return {}
        start = activity.newest_user_id[1]
    target = current_user_id(start, activity.user_id_changes)
    if target == held:
        return {}
    why = (
        "business-scoped user id seen on WhatsApp"
        if held is None or held == ""
        else f"business-scoped user id changed from {held} to {target}"
    )
    return {WHATSAPP_USER_ID: (target, why)}


def _differs(old: FieldValue, new: FieldValue) -> bool:
    if isinstance(old, datetime) or isinstance(new, datetime):
        return _when(old) != _when(new)
    return old != new


def decide(
    record: CrmRecord, activity: Activity, mapped: Collection[str], now: datetime
) -> Decision:
    """Every rule of SPEC section 5 for one record; `mapped` limits what may be written.

    `activity` is `Activity.of(events)` for the events matched to the record (a store may
    compute it in SQL); the rules need nothing else of them.
    """
    fields = record.fields
    targets: dict[str, tuple[FieldValue, str]] = {}
    conflicts: list[str] = []
    if activity:  # most records of an org have no WhatsApp activity: only proof applies
        consent, conflicts = _consent_targets(fields, activity.consent)
        targets = {
            **consent,
            **_session_targets(fields, activity),
            **_user_id_target(fields, activity),
        }
    after = (
        {**fields, **{name: value for name, (value, _) in targets.items()}} if targets else fields
    )
    gaps = proof_gaps(after) if after.get(OPT_IN) is True else []
    proof_missing = bool(gaps)
    if (fields.get(PROOF_MISSING) is True) != proof_missing:
        targets[PROOF_MISSING] = (
            proof_missing,
            f"proof lacks {', '.join(gaps)}" if proof_missing else "proof complete or not opted in",
        )
    changes = tuple(
        FieldChange(name, fields.get(name), value, why)
        for name, (value, why) in targets.items()
        if name in mapped and _differs(fields.get(name), value)
    )
    expiry = _when(after.get(SESSION_EXPIRES)) if SESSION_EXPIRES in mapped else None
    return Decision(
        record_id=record.record_id,
        changes=changes,
        conflicts=tuple(conflicts),
        proof_missing=proof_missing,
        session_open=expiry is not None and expiry > now,
        # the precondition of a write; a decision without changes is never queued (most
        # records of a full sync), so it needs none
        basis=tuple((name, fields.get(name)) for name in CONSENT_BASIS if name in mapped)
        if changes
        else (),
    )


def apply(record: CrmRecord, decision: Decision) -> CrmRecord:
    """The record as it will read after the decision is written (for tests and dry runs)."""
    fields = dict(record.fields)
    fields.update({c.field: c.new for c in decision.changes})
    return CrmRecord(record.record_id, fields, record.phones, record.modified_at, record.name)

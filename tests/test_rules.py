"""The consent rules of SPEC section 5: a table of cases and Hypothesis properties."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waconsent.domain import (
    LOGICAL_FIELDS,
    Activity,
    CrmRecord,
    Decision,
    Event,
    EventKind,
    FieldValue,
    Signal,
)
from waconsent.sync.rules import apply, decide, has_message_evidence, proof_gaps

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
T = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
ALL = frozenset(LOGICAL_FIELDS)
WA = "4915123456789"
_n = iter(range(10**9))


def at(hours: float) -> datetime:
    return T + timedelta(hours=hours)


def msg(
    hours: float,
    signal: Signal = Signal.NONE,
    keyword: str | None = None,
    user_id: str | None = None,
) -> Event:
    i = next(_n)
    return Event(
        key=f"msg:wamid.{i}",
        kind=EventKind.MESSAGE,
        occurred_at=at(hours),
        wa_id=WA,
        user_id=user_id,
        message_id=f"wamid.{i}",
        message_type="text",
        signal=signal,
        keyword=keyword,
        opens_session=True,
    )


def stop(hours: float) -> Event:
    return msg(hours, Signal.OPT_OUT, "STOP")


def start(hours: float) -> Event:
    return msg(hours, Signal.OPT_IN, "START")


def failed_131050(hours: float) -> Event:
    i = next(_n)
    return Event(
        key=f"status:wamid.s{i}:failed",
        kind=EventKind.STATUS,
        occurred_at=at(hours),
        wa_id=WA,
        message_id=f"wamid.s{i}",
        status="failed",
        error_codes=(131050,),
        signal=Signal.OPT_OUT,
        detail="status:failed:131050",
    )


def preference(hours: float, value: str) -> Event:
    signal = {"stop": Signal.OPT_OUT, "resume": Signal.RESUME}[value]
    return Event(
        key=f"pref:{WA}:{value}:{hours}",
        kind=EventKind.PREFERENCE,
        occurred_at=at(hours),
        wa_id=WA,
        signal=signal,
        detail=f"user_preferences:{value}",
    )


def fep_status(hours: float, expires_hours: float) -> Event:
    i = next(_n)
    return Event(
        key=f"status:wamid.f{i}:sent",
        kind=EventKind.STATUS,
        occurred_at=at(hours),
        wa_id=WA,
        status="sent",
        window_expires_at=at(expires_hours),
    )


def record(**fields: FieldValue) -> CrmRecord:
    return CrmRecord("R1", fields, {"MobilePhone": "+" + WA})


OPTED_IN = {
    "opt_in": True,
    "opt_in_date": at(-100),
    "opt_in_ip": "203.0.113.1",
    "opt_in_source": "web-form",
}


def decide_events(
    rec: CrmRecord, events: list[Event], mapped: frozenset[str], now: datetime
) -> Decision:
    return decide(rec, Activity.of(events), mapped, now)


def changes(rec: CrmRecord, events: list[Event], mapped: frozenset[str] = ALL) -> dict:
    return {c.field: c.new for c in decide_events(rec, events, mapped, NOW).changes}


# ---- the table -------------------------------------------------------------------------------


def test_stop_revokes_an_opted_in_record() -> None:
    """A STOP newer than the consent revokes it at the event's time."""
    result = changes(record(**OPTED_IN), [stop(1)])
    assert result["opt_in"] is False and result["opt_out_date"] == at(1)


def test_a_write_carries_the_values_it_was_decided_on_and_no_write_carries_none() -> None:
    """The basis is the queued write's precondition (the consent read from the CRM); a
    decision with nothing to write needs none."""
    rec = record(**OPTED_IN)
    revoked = decide_events(rec, [stop(1)], ALL, NOW)
    assert dict(revoked.basis) == {"opt_in": True, "opt_in_date": at(-100), "opt_out_date": None}
    assert decide_events(rec, [], ALL, NOW).basis == ()


def test_plain_message_opens_session_only() -> None:
    """A plain message sets last_inbound and a 24-hour window, and never grants consent."""
    result = changes(record(opt_in=False), [msg(1)])
    assert result == {"last_inbound": at(1), "session_expires": at(25)}


def test_start_grants_with_message_proof() -> None:
    """START opts in with the message id as proof, so the proof is complete."""
    event = start(1)
    result = changes(record(opt_in=False), [event])
    assert result["opt_in"] is True and result["opt_in_date"] == at(1)
    assert result["opt_in_source"] == f"whatsapp:keyword:START:{event.message_id}"
    assert "proof_missing" not in result


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        (lambda: [stop(1), start(2)], True),  # STOP then START
        (lambda: [start(1), stop(2)], False),  # START then STOP
        (lambda: [stop(1), msg(2)], False),  # plain chat after STOP
        (lambda: [start(1), failed_131050(2)], False),  # 131050 after START
        (lambda: [preference(1, "stop"), preference(2, "resume")], False),  # resume after stop
        (lambda: [start(1), stop(1)], False),  # same second: the opt-out wins
    ],
)
def test_conflicting_signals(events, expected: bool) -> None:  # type: ignore[no-untyped-def]
    """The newest consent signal decides; resume restores nothing; ties go to the opt-out."""
    result = apply(record(opt_in=False), decide_events(record(opt_in=False), events(), ALL, NOW))
    assert result.fields["opt_in"] is expected


def test_crm_resubscription_after_stop_stands_and_is_reported() -> None:
    """A CRM opt-in newer than a WhatsApp STOP stands, and the conflict is named."""
    rec = record(opt_in=True, opt_in_date=at(5), opt_in_ip="1.2.3.4", opt_in_source="form")
    decision = decide_events(rec, [stop(1)], ALL, NOW)
    assert "opt_in" not in {c.field for c in decision.changes}
    assert len(decision.conflicts) == 1 and "re-subscription stands" in decision.conflicts[0]


def test_recorded_stop_then_resubscription_is_no_conflict() -> None:
    """A STOP already written before the CRM re-subscription is history, not a conflict."""
    rec = record(
        opt_in=True,
        opt_in_date=at(5),
        opt_out_date=at(1),
        opt_in_ip="1.2.3.4",
        opt_in_source="form",
    )
    assert decide_events(rec, [stop(1)], ALL, NOW).conflicts == ()


def test_event_older_than_crm_change_is_ignored() -> None:
    """Newest wins: a START older than the CRM's opt-out changes nothing."""
    rec = record(opt_in=False, opt_out_date=at(5))
    assert changes(rec, [start(1)]) == {"last_inbound": at(1), "session_expires": at(25)}


def test_event_at_the_same_second_as_crm_change_is_not_newer() -> None:
    """An event exactly at the CRM's last change (to the second) does not apply again."""
    rec = record(opt_in=False, opt_out_date=at(1) + timedelta(microseconds=400_000))
    assert "opt_in" not in changes(rec, [stop(1)])


@pytest.mark.parametrize(
    "revoker", [lambda: stop(1), lambda: failed_131050(1), lambda: preference(1, "stop")]
)
def test_every_opt_out_signal_revokes(revoker) -> None:  # type: ignore[no-untyped-def]
    """Keyword, 131050 failure and user_preferences stop all revoke."""
    assert changes(record(**OPTED_IN), [revoker()])["opt_in"] is False


def test_resume_alone_restores_nothing() -> None:
    """A user_preferences resume is evidence only."""
    assert changes(record(opt_in=False, opt_out_date=at(0)), [preference(1, "resume")]) == {}


def test_status_does_not_open_a_session() -> None:
    """Statuses of our own messages never open the service window."""
    assert changes(record(), [failed_131050(1)]).get("last_inbound") is None


def test_free_entry_point_extends_the_window() -> None:
    """A later free-entry-point expiry replaces the 24-hour expiry."""
    result = changes(record(), [msg(1), fep_status(1.5, 73)])
    assert result["session_expires"] == at(73)
    shorter = changes(record(), [msg(1), fep_status(1.5, 10)])
    assert shorter["session_expires"] == at(25)


def test_session_never_moves_backwards() -> None:
    """An older message than the recorded last_inbound changes nothing."""
    assert changes(record(last_inbound=at(10), session_expires=at(34)), [msg(1)]) == {}


def test_session_open_flag_uses_now() -> None:
    """The decision says whether the window is open at `now`."""
    recent = NOW - timedelta(hours=2)
    event = Event(
        key="msg:x", kind=EventKind.MESSAGE, occurred_at=recent, wa_id=WA, opens_session=True
    )
    assert decide_events(record(), [event], ALL, NOW).session_open
    assert not decide_events(record(), [msg(1)], ALL, NOW).session_open


@pytest.mark.parametrize(
    ("fields", "gaps"),
    [
        ({"opt_in_date": T, "opt_in_source": "form", "opt_in_ip": "1.2.3.4"}, []),
        ({"opt_in_date": T, "opt_in_source": "whatsapp:keyword:START:wamid.1"}, []),
        (
            {"opt_in_date": T, "opt_in_source": "import"},
            ["opt_in_ip or a WhatsApp message id in opt_in_source"],
        ),
        ({"opt_in_source": "form", "opt_in_ip": "1.2.3.4"}, ["opt_in_date"]),
        ({"opt_in_date": T, "opt_in_ip": "1.2.3.4"}, ["opt_in_source"]),
    ],
)
def test_proof_gaps(fields: dict, gaps: list[str]) -> None:
    """Complete proof: date, source, and an IP or a WhatsApp message id in the source."""
    assert proof_gaps(fields) == gaps


def test_proof_flag_set_and_cleared() -> None:
    """An opted-in record without proof is flagged; the flag clears when proof is complete."""
    flagged = changes(record(opt_in=True, opt_in_date=at(0)), [])
    assert flagged == {"proof_missing": True}
    cleared = changes(record(proof_missing=True, **OPTED_IN), [])
    assert cleared == {"proof_missing": False}
    revoked = changes(record(opt_in=True, proof_missing=True), [stop(1)])
    assert revoked["proof_missing"] is False


def test_message_evidence_recognised() -> None:
    """Our own source format and raw wamids count as WhatsApp message evidence; free text
    that merely starts with whatsapp: does not."""
    assert has_message_evidence("whatsapp:keyword:START:ABGGFlA5Fpa")
    assert has_message_evidence("chat wamid.HBgL")
    assert not has_message_evidence("web-form")
    assert not has_message_evidence("whatsapp:landing-page:summer")
    assert not has_message_evidence("whatsapp:keyword:START:")


def test_stop_at_the_second_of_a_recorded_opt_in_still_revokes() -> None:
    """A STOP in the same second as an opt-in an earlier run wrote applies, as it would have
    had both arrived in one run; and it is not applied twice."""
    started = start(1)
    rec = record(opt_in=False)
    after_start = apply(rec, decide_events(rec, [started], ALL, NOW))
    late_stop = stop(1)
    after_stop = apply(after_start, decide_events(after_start, [started, late_stop], ALL, NOW))
    assert after_stop.fields["opt_in"] is False and after_stop.fields["opt_out_date"] == at(1)
    assert decide_events(after_stop, [started, late_stop], ALL, NOW).changes == ()


def test_unmapped_fields_are_not_written() -> None:
    """Only mapped fields appear in the changes."""
    mapped = frozenset({"opt_in", "opt_in_date", "opt_out_date"})
    assert changes(record(**OPTED_IN), [stop(1), msg(2)], mapped) == {
        "opt_in": False,
        "opt_out_date": at(1),
    }


def test_user_id_written_once() -> None:
    """A business-scoped user id seen on WhatsApp is written when the field is empty."""
    assert changes(record(), [msg(1, user_id="US.9")])["whatsapp_user_id"] == "US.9"
    assert "whatsapp_user_id" not in changes(
        record(whatsapp_user_id="US.1"), [msg(1, user_id="US.9")]
    )


# ---- properties ------------------------------------------------------------------------------

hours = st.integers(min_value=-48, max_value=48).map(float)
event_strategy = st.one_of(
    hours.map(msg),
    hours.map(stop),
    hours.map(start),
    hours.map(failed_131050),
    hours.map(lambda h: preference(h, "stop")),
    hours.map(lambda h: preference(h, "resume")),
    st.tuples(hours, hours).map(lambda hh: fep_status(hh[0], hh[0] + abs(hh[1]))),
)
maybe_time = st.none() | hours.map(at)
record_strategy = st.builds(
    lambda opt_in, d_in, d_out, ip, src, flag, last: record(
        opt_in=opt_in,
        opt_in_date=d_in,
        opt_out_date=d_out,
        opt_in_ip=ip,
        opt_in_source=src,
        proof_missing=flag,
        last_inbound=last,
    ),
    st.none() | st.booleans(),
    maybe_time,
    maybe_time,
    st.none() | st.just("1.2.3.4"),
    st.none() | st.just("form"),
    st.none() | st.booleans(),
    maybe_time,
)


@settings(max_examples=300, deadline=None)
@given(record_strategy, st.lists(event_strategy, max_size=8))
def test_second_decision_changes_nothing(rec: CrmRecord, events: list[Event]) -> None:
    """Idempotence: deciding again over the applied result writes nothing."""
    after = apply(rec, decide_events(rec, events, ALL, NOW))
    assert decide_events(after, events, ALL, NOW).changes == ()


@settings(max_examples=300, deadline=None)
@given(record_strategy, st.lists(event_strategy, max_size=8), st.randoms())
def test_event_order_does_not_matter(rec: CrmRecord, events: list[Event], rnd) -> None:  # type: ignore[no-untyped-def]
    """The order events arrive in does not change the decision."""
    shuffled = list(events)
    rnd.shuffle(shuffled)
    assert decide_events(rec, events, ALL, NOW) == decide_events(rec, shuffled, ALL, NOW)


@settings(max_examples=300, deadline=None)
@given(record_strategy, st.lists(hours.map(msg), max_size=8))
def test_plain_messages_never_grant(rec: CrmRecord, events: list[Event]) -> None:
    """No implied consent: plain messages never set opt_in or its proof."""
    touched = {c.field for c in decide_events(rec, events, ALL, NOW).changes}
    assert not touched & {"opt_in", "opt_in_date", "opt_in_source", "opt_in_ip", "opt_out_date"}


@settings(max_examples=300, deadline=None)
@given(record_strategy, st.lists(event_strategy, max_size=8))
def test_opt_out_newer_than_everything_revokes(rec: CrmRecord, events: list[Event]) -> None:
    """An opt-out newer than every opt-in and every CRM change always revokes."""
    final = stop(60)
    after = apply(rec, decide_events(rec, [*events, final], ALL, NOW))
    assert after.fields["opt_in"] is False and after.fields["opt_out_date"] == at(60)


@settings(max_examples=300, deadline=None)
@given(st.lists(event_strategy, max_size=8), st.lists(event_strategy, max_size=8))
def test_activity_of_parts_merges_to_the_activity_of_all(
    first: list[Event], second: list[Event]
) -> None:
    """A record matched by several keys: merging each key's activity equals reducing all of
    its events at once (what lets the store aggregate per number)."""
    second = [event for event in second if event.key not in {e.key for e in first}]
    merged = Activity.merged([Activity.of(first), Activity.of(second)])
    assert merged == Activity.of([*first, *second])
    assert merged.event_count == len({event.key for event in [*first, *second]})

"""The pre-send check's pure rules (issue 16), property-tested with Hypothesis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from waconsent.domain import NO_ACTIVITY, Activity, Event, EventKind, Signal
from waconsent.sync.audience import (
    MARKETING,
    NO_CONSENT,
    OPTED_IN,
    PROOF_MISSING,
    REVOKED,
    SERVICE,
    SESSION_OPEN,
    Held,
    answer,
)

BASE = datetime(2026, 1, 1, tzinfo=UTC)
NOW = BASE + timedelta(days=400)
seconds = st.integers(min_value=0, max_value=300 * 86_400)


def at(offset: int) -> datetime:
    return BASE + timedelta(seconds=offset)


def consent_event(n: int, signal: Signal, offset: int) -> Event:
    return Event(
        key=f"e{n}",
        kind=EventKind.MESSAGE,
        occurred_at=at(offset),
        wa_id="4915100",
        message_id=f"wamid.{n}",
        signal=signal,
        keyword="STOP" if signal is Signal.OPT_OUT else "START",
    )


@st.composite
def held_before(draw: st.DrawFn, stop: int, n: int) -> Held:
    """A record as a sync may leave it, every consent change of it no later than `stop`."""
    opted_in = draw(st.booleans())
    if opted_in:
        opt_in_date = draw(st.integers(0, stop))
        opt_out = draw(st.none() | st.integers(0, max(0, opt_in_date - 1)))
        return Held(
            f"R{n}",
            True,
            at(opt_in_date),
            None if opt_out is None or opt_out >= opt_in_date else at(opt_out),
            draw(st.booleans()),
            draw(st.none() | seconds.map(at)),
        )
    opt_out = draw(st.none() | st.integers(0, stop))
    opt_in_date = draw(st.none() | st.integers(0, stop))
    return Held(
        f"R{n}",
        draw(st.sampled_from([False, None])),
        None if opt_in_date is None else at(opt_in_date),
        None if opt_out is None else at(opt_out),
        False,
        draw(st.none() | seconds.map(at)),
    )


@st.composite
def newest_is_an_opt_out(draw: st.DrawFn) -> tuple[list[tuple[Held, Activity]], Activity]:
    """Records and the WhatsApp consent events received since, the newest an opt-out (at
    the same second as an opt-in, the opt-out is the newer, as everywhere in the rules)."""
    stop = draw(st.integers(1, 300 * 86_400))
    earlier = draw(
        st.lists(
            st.tuples(st.sampled_from([Signal.OPT_IN, Signal.OPT_OUT]), st.integers(0, stop)),
            max_size=6,
        )
    )
    events = [consent_event(i, signal, offset) for i, (signal, offset) in enumerate(earlier)]
    events.append(consent_event(len(events), Signal.OPT_OUT, stop))
    since = Activity.of(events)
    count = draw(st.integers(1, 3))
    records = [(draw(held_before(stop, n)), since) for n in range(count)]
    return records, since


@given(newest_is_an_opt_out())
def test_marketing_is_never_allowed_when_the_newest_consent_event_is_an_opt_out(
    case: tuple[list[tuple[Held, Activity]], Activity],
) -> None:
    """Whatever the CRM held and whatever came before, a number whose newest consent event
    is an opt-out may not be sent marketing."""
    records, _ = case
    result = answer(MARKETING, records, NO_ACTIVITY, NOW)
    assert not result.may_send
    assert result.reason == REVOKED


def held(record_id: str, opt_in: bool | None, proof: bool = True, revoked: bool = False) -> Held:
    return Held(
        record_id,
        opt_in,
        at(10) if opt_in else None,
        at(5) if revoked else None,
        proof and bool(opt_in),
        None,
    )


def test_several_records_allowed_only_if_none_is_revoked() -> None:
    """One revoked record makes the number no; else one opted in with proof is enough."""

    def reason(*records: Held) -> str:
        return answer(MARKETING, [(r, NO_ACTIVITY) for r in records], NO_ACTIVITY, NOW).reason

    assert reason(held("A", True), held("B", False, revoked=True)) == REVOKED
    assert reason(held("A", True), held("B", None)) == OPTED_IN
    assert reason(held("A", True, proof=False), held("B", None)) == PROOF_MISSING
    assert reason(held("A", None), held("B", False)) == NO_CONSENT


def test_a_user_message_since_opens_the_service_window_but_grants_nothing() -> None:
    """A plain message since the sync opens 24 hours of service and no marketing."""
    message = Event(
        key="m",
        kind=EventKind.MESSAGE,
        occurred_at=NOW - timedelta(hours=2),
        wa_id="4915100",
        message_type="text",
        opens_session=True,
    )
    since = Activity.of([message])
    record = [(held("A", None), since)]
    service = answer(SERVICE, record, NO_ACTIVITY, NOW)
    assert (service.may_send, service.reason) == (True, SESSION_OPEN)
    assert service.session_open_until == NOW + timedelta(hours=22)
    assert answer(MARKETING, record, NO_ACTIVITY, NOW).reason == NO_CONSENT

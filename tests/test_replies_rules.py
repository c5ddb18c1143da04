"""The reply channel's pure decisions: who gets a reply with which text, how a row's
state climbs, when a queued row is sent or given up; with Hypothesis properties."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests import payloads as p
from waconsent.connectors.whatsapp import parse_payload
from waconsent.domain import Event, EventKind, Signal
from waconsent.keywords import KeywordRules
from waconsent.replies.rules import (
    SERVICE_WINDOW,
    DueAction,
    ReplyPolicy,
    ReplyState,
    advance,
    callback_data_for,
    due_action,
    plan_reply,
    retry_at,
    trigger_of,
)

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
POLICY = ReplyPolicy(
    opt_in="IN", opt_out="OUT", by_keyword={"stopp": "GESTOPPT"}, max_age=timedelta(minutes=60)
)
KEYWORDS = KeywordRules.build(
    ["START", "ANMELDEN"], ["STOP", "STOPP"], ["Stop promotions", "Werbung stoppen"]
)


def events(*changes: dict[str, object]) -> tuple[Event, ...]:
    return parse_payload(p.payload(*changes), KEYWORDS, NOW).events


def planned(*changes: dict[str, object]) -> list[str | None]:
    return [
        None if (plan := plan_reply(e, POLICY, NOW)) is None else plan.text
        for e in events(*changes)
    ]


def test_what_the_user_sent_in_the_chat_is_answered() -> None:
    """Typed START and STOP, a keyword's own text, and a localized Stop promotions tap are
    answered; the reply names the trigger and its sender."""
    assert planned(
        p.message("491511", NOW, "start"),
        p.message("491512", NOW, "STOP"),
        p.message("491513", NOW, "Stopp"),
        p.button("491514", NOW, "Stop promotions", "Werbung stoppen"),
    ) == ["IN", "OUT", "GESTOPPT", "OUT"]
    [event] = events(p.message("491511", NOW, "START", message_id="wamid.T", user_id="US.7"))
    plan = plan_reply(event, POLICY, NOW)
    assert plan is not None
    assert (plan.trigger_id, plan.wa_id, plan.user_id, plan.keyword) == (
        "wamid.T",
        "491511",
        "US.7",
        "START",
    )


def test_nothing_the_user_did_not_write_is_answered() -> None:
    """user_preferences, a 131050 failure, a system preference change, a plain message and
    a button whose payload only the business chose get no reply."""
    assert (
        planned(
            p.preference("491511", NOW, "stop"),
            p.status("491511", NOW, "failed", codes=(131050,)),
            p.system("491511", NOW, type="user_preference_changed", marketing="stop"),
            p.message("491511", NOW, "hello"),
            p.button("491511", NOW, "START", "Get started"),
        )
        == [None] * 5
    )


@pytest.mark.parametrize(("age", "answered"), [(59, True), (60, True), (61, False)])
def test_events_older_than_max_age_are_not_answered(age: int, answered: bool) -> None:
    """Up to max_age old a STOP is answered; older (an import, a late redelivery) not."""
    assert (
        planned(p.message("491511", NOW - timedelta(minutes=age), "STOP")) == ["OUT"]
    ) is answered


def test_callback_data_names_the_trigger() -> None:
    """A reply's callback data gives its trigger back; anyone else's gives nothing."""
    assert trigger_of(callback_data_for("wamid.ABC")) == "wamid.ABC"
    assert trigger_of("campaign-42") is None and trigger_of(None) is None


STATES = st.sampled_from(
    [ReplyState.SENT, ReplyState.DELIVERED, ReplyState.READ, ReplyState.FAILED, ReplyState.UNKNOWN]
)


@given(st.lists(STATES, max_size=8), st.randoms())
def test_statuses_in_any_order_reach_the_same_state(
    seen: list[ReplyState], shuffle: object
) -> None:
    """Property: a row's state after a set of observations does not depend on their order,
    and never falls back below what was observed."""

    def final(order: list[ReplyState]) -> ReplyState:
        state = ReplyState.SENDING
        for new in order:
            before, state = state, advance(state, new)
            assert advance(state, before) == state  # never back
        return state

    shuffled = list(seen)
    shuffle.shuffle(shuffled)  # type: ignore[attr-defined]
    assert final(seen) == final(shuffled)


def test_a_delivered_reply_stays_delivered_and_a_failure_outranks_sent() -> None:
    """A late 'failed' does not undo a delivery; a failure after 'sent' is kept."""
    assert advance(ReplyState.DELIVERED, ReplyState.FAILED) is ReplyState.DELIVERED
    assert advance(ReplyState.SENT, ReplyState.FAILED) is ReplyState.FAILED
    assert advance(ReplyState.UNKNOWN, ReplyState.SENT) is ReplyState.SENT


def test_due_rows_are_sent_until_the_window_closes_or_rounds_run_out() -> None:
    """A queued row is sent inside the 24-hour window; after it, or after five rounds of
    refusals, it is closed without sending."""
    assert due_action(NOW, 0, NOW + timedelta(hours=23)) is DueAction.SEND
    assert due_action(NOW, 0, NOW + SERVICE_WINDOW) is DueAction.EXPIRE
    assert due_action(NOW, 5, NOW) is DueAction.GIVE_UP


@given(st.integers(min_value=0, max_value=50))
def test_retry_waits_grow_and_are_capped(rounds: int) -> None:
    """Property: each later round waits at least as long, never more than an hour."""
    wait = retry_at(rounds, NOW) - NOW
    assert timedelta(minutes=1) <= wait <= timedelta(hours=1)
    assert retry_at(rounds + 1, NOW) - NOW >= wait


def test_a_system_message_and_a_status_never_plan_a_reply_even_with_a_keyword() -> None:
    """Whatever a status or system event carries, only a user's message is answered."""
    for kind, message_type in ((EventKind.STATUS, None), (EventKind.MESSAGE, "system")):
        event = Event(
            key="k",
            kind=kind,
            occurred_at=NOW,
            wa_id="491511",
            message_id="w",
            message_type=message_type,
            signal=Signal.OPT_OUT,
            keyword="STOP",
        )
        assert plan_reply(event, POLICY, NOW) is None

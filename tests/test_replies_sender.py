"""The Cloud API sender against the fake: the request Meta documents, and each answer
read from Meta's error codes, retried only when nothing can have been sent."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import requests
from sqlalchemy import Engine

from tests import payloads as p
from tests.fakes.meta_messages import FakeCloudApi, SentMessage
from tests.replies_support import NOW, USER, deliver, meta, replies_config, rows, send_pass, sender
from waconsent.connectors.whatsapp_send import Sent, request_body
from waconsent.replies.rules import UNKNOWN_AFTER
from waconsent.replies.sending import CONCURRENCY


def send(fake: FakeCloudApi, waits: list[float] | None = None, **who: Any) -> Any:
    target = who or {"wa_id": USER, "user_id": None}
    return sender(waits).send_text(
        text="Confirmed.",
        reply_to="wamid.TRIGGER",
        callback_data="waconsent:reply:wamid.TRIGGER",
        **target,
    )


def test_request_body_is_a_contextual_text_reply() -> None:
    """The body Meta documents: individual recipient, the number in `to`, the trigger in
    context.message_id, plain text without preview, the callback data naming the trigger."""
    assert request_body(
        wa_id=USER,
        user_id="US.1",
        text="Hi",
        reply_to="wamid.T",
        callback_data="waconsent:reply:wamid.T",
    ) == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": USER,
        "context": {"message_id": "wamid.T"},
        "type": "text",
        "text": {"preview_url": False, "body": "Hi"},
        "biz_opaque_callback_data": "waconsent:reply:wamid.T",
    }


def test_a_user_known_only_by_user_id_is_sent_to_by_recipient() -> None:
    """Without a number, the business-scoped user id goes in `recipient` (Meta's BSUID
    field); Meta answers with the user id instead of a wa_id."""
    with meta() as fake:
        result = send(fake, wa_id=None, user_id="US.13491208655302741918")
    assert result.outcome is Sent.ACCEPTED
    assert (fake.sent[0].to, fake.sent[0].recipient) == (None, "US.13491208655302741918")


@pytest.mark.parametrize(
    ("code", "outcome"),
    [(131047, Sent.REFUSED), (131026, Sent.REFUSED), (190, Sent.CREDENTIALS_REJECTED)],
)
def test_refusals_that_cannot_heal_are_not_retried(code: int, outcome: Sent) -> None:
    """131047, 131026 and 190 are answered once: no retry, Meta's code and trace kept."""
    waits: list[float] = []
    with meta() as fake:
        fake.fail_next(code)
        result = send(fake, waits)
    assert (result.outcome, result.code, result.trace, fake.calls, waits) == (
        outcome,
        str(code),
        "AbCdEf123",
        1,
        [],
    )


@pytest.mark.parametrize("code", [131056, 130429, 131000, 131016])
def test_refusals_that_may_heal_are_retried_with_backoff(code: int) -> None:
    """Rate limits (131056 waits Meta's 6 s per user pair) and Meta's own 5xx errors are
    retried by the shared policy, then the reply goes."""
    waits: list[float] = []
    with meta() as fake:
        fake.fail_next(code, times=2)
        result = send(fake, waits)
    assert result.outcome is Sent.ACCEPTED and fake.calls == 3
    assert waits == ([6.0, 6.0] if code == 131056 else [1.0, 2.0])


def test_retry_after_is_honoured_and_exhaustion_means_later() -> None:
    """A Retry-After header sets the wait; when the policy gives up, nothing was sent and
    the reply is for a later round."""
    waits: list[float] = []
    with meta() as fake:
        fake.fail_next(130429, times=4, retry_after="3")
        result = send(fake, waits)
    assert (result.outcome, result.code, fake.calls, waits) == (
        Sent.RETRY_LATER,
        "130429",
        4,
        [3.0, 3.0, 3.0],
    )


def test_a_connection_never_made_is_retried() -> None:
    """A connect timeout cannot have reached Meta: retried."""
    with meta() as fake:
        fake.drop_next(requests.exceptions.ConnectTimeout("connect timed out"))
        result = send(fake)
    assert result.outcome is Sent.ACCEPTED and fake.calls == 2


@pytest.mark.parametrize(
    "error",
    [
        requests.exceptions.ReadTimeout("read timed out"),
        requests.exceptions.ConnectionError("Connection aborted."),
    ],
)
def test_no_answer_after_the_request_left_is_never_repeated(error: Exception) -> None:
    """A read timeout or a connection dropped while waiting may come after Meta took the
    message: no retry, the outcome is left to the reply's statuses."""
    with meta() as fake:
        fake.drop_next(error)
        result = send(fake)
    assert (result.outcome, fake.calls) == (Sent.NO_ANSWER, 1)


def test_a_proxys_5xx_is_no_answer_but_503_is_retried() -> None:
    """A 502 without Meta's error body says nothing about the message: not repeated. A 503
    says the service did not take it: retried."""
    with meta() as fake:
        fake.answer_next(502)
        assert send(fake).outcome is Sent.NO_ANSWER
        fake.answer_next(503, "<html>unavailable</html>")
        assert send(fake).outcome is Sent.ACCEPTED
    assert fake.calls == 3


def test_an_invalid_token_stops_the_pass_and_keeps_the_queue(
    engine: Engine, store_url: str
) -> None:
    """A rejected token (190, 401) ends the pass: what was refused goes back to the queue
    without spending a round, nothing more is tried once the refusal is known (only the
    requests already in flight to other people), and the pass says why."""
    cfg = replies_config(store_url)
    deliver(engine, cfg, *[p.message(f"491512345{n:04d}", NOW, "STOP") for n in range(40)])
    with meta() as fake:
        fake.revoke_token()
        summary = send_pass(engine)
    assert summary.stopped is not None and "190" in summary.stopped
    assert 1 <= fake.calls <= CONCURRENCY and summary.sent == 0
    assert [(r.state, r.rounds) for r in rows(engine)] == [("queued", 0)] * 40
    with meta() as fake:
        assert send_pass(engine).sent == 40


def test_a_reply_without_answer_is_never_resent_and_becomes_unknown(
    engine: Engine, store_url: str
) -> None:
    """A reply whose answer was lost stays "sending"; after an hour without a status it is
    "unknown"; it is never sent again, and a late status still settles it."""
    cfg = replies_config(store_url)
    deliver(engine, cfg, p.message(USER, NOW, "STOP"))
    with meta() as fake:
        fake.drop_next(requests.exceptions.ReadTimeout("read timed out"))
        assert send_pass(engine).no_answer == 1
    assert rows(engine)[0].state == "sending"
    with meta(strict=False) as fake:
        assert send_pass(engine, now=NOW + timedelta(minutes=30)).marked_unknown == 0
        later = send_pass(engine, now=NOW + UNKNOWN_AFTER + timedelta(minutes=11))
    assert later.marked_unknown == 1 and fake.calls == 0
    assert rows(engine)[0].state == "unknown"
    trigger = rows(engine)[0].trigger_id
    lost = SentMessage(
        id="wamid.LOST",
        to=USER,
        recipient=None,
        body="",
        reply_to=trigger,
        callback_data=f"waconsent:reply:{trigger}",
    )
    deliver(
        engine, cfg, body=FakeCloudApi().status_payload(lost, "delivered", NOW + timedelta(hours=2))
    )
    assert (rows(engine)[0].state, rows(engine)[0].reply_id) == ("delivered", "wamid.LOST")

"""The reply channel end to end on SQLite and PostgreSQL: queued with the trigger, sent
once against the Cloud API fake, settled by its statuses, kept as evidence."""

from __future__ import annotations

import json
from datetime import timedelta

from sqlalchemy import Engine, select

from tests import payloads as p
from tests.replies_support import (
    BUSINESS,
    NOW,
    USER,
    deliver,
    meta,
    replies_config,
    rows,
    send_pass,
    sender,
)
from waconsent.replies.rules import callback_data_for, sha256_of
from waconsent.store import evidence as evidence_store
from waconsent.store import proof as proof_store
from waconsent.store.tables import events, evidence


def test_start_and_stop_are_each_answered_once_with_text_and_context(
    engine: Engine, store_url: str
) -> None:
    """START and STOP each get one reply: the configured text, quoting the trigger, with
    callback data naming it; evidence holds the text and its SHA-256."""
    cfg = replies_config(store_url)
    start, stop = p.new_id(), p.new_id()
    report = deliver(
        engine,
        cfg,
        p.message(USER, NOW - timedelta(minutes=2), "Start", message_id=start),
        p.message(USER, NOW - timedelta(minutes=1), "stop!", message_id=stop),
    )
    assert report.replies_queued == 2
    with meta() as fake:
        summary = send_pass(engine)
    assert (summary.sent, summary.failed) == (2, 0)
    by_trigger = {m.reply_to: m for m in fake.sent}
    assert set(by_trigger) == {start, stop} and fake.calls == 2
    assert by_trigger[start].to == USER
    assert (
        by_trigger[start].body.startswith(
            f"You are subscribed to WhatsApp messages from {BUSINESS}"
        )
        and "reply STOP" in by_trigger[start].body
    )
    assert "reply START" in by_trigger[stop].body
    assert by_trigger[stop].callback_data == callback_data_for(stop)
    assert [r.state for r in rows(engine)] == ["sent", "sent"]
    with engine.connect() as connection:
        bodies = [
            json.loads(b)
            for b in connection.execute(
                select(evidence.c.body).where(evidence.c.kind == "reply")
            ).scalars()
        ]
        assert evidence_store.verify(connection) == []
    assert {b["trigger_id"]: b["reply_id"] for b in bodies} == {
        start: by_trigger[start].id,
        stop: by_trigger[stop].id,
    }
    assert all(b["text_sha256"] == sha256_of(b["text"]) for b in bodies)
    with meta(strict=False) as fake:
        assert send_pass(engine).looked_at == 0
    assert fake.calls == 0


def test_keyword_texts_and_stop_promotions_tap(engine: Engine, store_url: str) -> None:
    """A per-keyword text answers its keyword (STOPP in German); a localized Stop
    promotions tap is answered with its configured text."""
    cfg = replies_config(
        store_url,
        keywords={
            "STOPP": "Sie erhalten keine WhatsApp-Werbung mehr von {business}.",
            "STOP_PROMOTIONS": "Promotions from {business} stopped. Reply {opt_in_keyword}.",
        },
    )
    deliver(
        engine,
        cfg,
        p.message(USER, NOW, "STOPP"),
        p.button("4915123456790", NOW, "Stop promotions", "Werbung stoppen"),
    )
    with meta() as fake:
        send_pass(engine)
    assert sorted(m.body for m in fake.sent) == [
        f"Promotions from {BUSINESS} stopped. Reply START.",
        f"Sie erhalten keine WhatsApp-Werbung mehr von {BUSINESS}.",
    ]


def test_the_same_delivery_twice_queues_and_sends_one_reply(engine: Engine, store_url: str) -> None:
    """A redelivered STOP (and a second pass) never makes a second reply."""
    cfg = replies_config(store_url)
    body = p.payload(p.message(USER, NOW, "STOP"))
    first, second = deliver(engine, cfg, body=body), deliver(engine, cfg, body=body)
    assert (first.replies_queued, second.replies_queued) == (1, 0)
    with meta() as fake:
        send_pass(engine)
        send_pass(engine)
        deliver(engine, cfg, body=body)
        send_pass(engine)
    assert fake.calls == 1 and len(rows(engine)) == 1


def test_no_reply_for_preferences_131050_or_plain_messages(engine: Engine, store_url: str) -> None:
    """A user_preferences stop, a 131050 failure, a system preference change and a plain
    message revoke or open windows, but nobody wrote a keyword: no reply is queued."""
    cfg = replies_config(store_url)
    report = deliver(
        engine,
        cfg,
        p.preference(USER, NOW, "stop"),
        p.status(USER, NOW, "failed", codes=(131050,)),
        p.system(USER, NOW, type="user_preference_changed", marketing="stop"),
        p.message(USER, NOW, "hello, please stop sending the catalogue"),
    )
    assert report.stored == 4 and report.replies_queued == 0 and rows(engine) == []


def test_old_events_and_disabled_replies_answer_nobody(engine: Engine, store_url: str) -> None:
    """A STOP older than replies.max_age_minutes (an archive import, a late redelivery) and
    any STOP while replies are off queue nothing."""
    cfg = replies_config(store_url, max_age_minutes=30)
    assert (
        deliver(engine, cfg, p.message(USER, NOW - timedelta(minutes=31), "STOP")).replies_queued
        == 0
    )
    off = replies_config(store_url, enabled=False)
    assert deliver(engine, off, p.message(USER, NOW, "STOP")).replies_queued == 0
    assert (
        deliver(engine, cfg, p.message(USER, NOW - timedelta(minutes=29), "STOP")).replies_queued
        == 1
    )


def test_statuses_settle_the_reply_before_the_worth_a_row_decision(
    engine: Engine, store_url: str
) -> None:
    """The reply's sent, delivered and read statuses (recognised by their callback data)
    settle its row, arriving in any order, though none of them becomes an event row."""
    cfg = replies_config(store_url)
    trigger = p.new_id()
    deliver(engine, cfg, p.message(USER, NOW, "STOP", message_id=trigger))
    with meta() as fake:
        send_pass(engine)
    reply = fake.sent[0]
    with engine.connect() as connection:
        stored_before = connection.execute(select(events.c.key)).scalars().all()
    for status in ("read", "sent", "delivered"):
        report = deliver(engine, cfg, body=fake.status_payload(reply, status, NOW))
        assert report.replies_settled == 1 and report.acknowledged == 1
    row = rows(engine)[0]
    assert (row.state, row.reply_id) == ("read", reply.id)
    assert row.delivered_at is not None and row.read_at is not None
    with engine.connect() as connection:
        assert connection.execute(select(events.c.key)).scalars().all() == stored_before
        proof = proof_store.evidence_for(connection, ["+4915123456789"])
    at = [entry["id"] for entry in proof].index(trigger)
    assert proof[at + 1]["what"] == "WhatsApp reply read"
    assert proof[at + 1]["text_sha256"] == sha256_of(reply.body)
    assert proof[at + 1]["id"] == reply.id


def test_131047_is_recorded_without_retry(engine: Engine, store_url: str) -> None:
    """Meta's 131047 (the window closed) fails the reply at once: one call, the code and
    why on the row, never tried again."""
    cfg = replies_config(store_url)
    deliver(engine, cfg, p.message(USER, NOW, "STOP"))
    waits: list[float] = []
    with meta() as fake:
        fake.window_closed.add(USER)
        summary = send_pass(engine, sender(waits))
        send_pass(engine, now=NOW + timedelta(hours=2))
    assert (fake.calls, waits, summary.failed) == (1, [], 1)
    row = rows(engine)[0]
    assert (row.state, row.error_code) == ("failed", "131047")
    assert "window is closed" in row.error


def test_an_asynchronous_failure_settles_the_reply(engine: Engine, store_url: str) -> None:
    """A reply Meta accepted and later reported failed (by webhook, without callback
    data) is matched by its message id and marked failed with the code."""
    cfg = replies_config(store_url)
    deliver(engine, cfg, p.message(USER, NOW, "START"))
    with meta() as fake:
        send_pass(engine)
    failed = fake.status_payload(fake.sent[0], "failed", NOW, errors=(131026,), with_callback=False)
    assert deliver(engine, cfg, body=failed).replies_settled == 1
    row = rows(engine)[0]
    assert (row.state, row.error_code) == ("failed", "131026")


def test_rate_limits_are_retried_then_put_back_for_a_later_round(
    engine: Engine, store_url: str
) -> None:
    """131056 waits Meta's six seconds and succeeds; a limit that outlasts the policy puts
    the row back for a later round instead of failing it."""
    cfg = replies_config(store_url)
    deliver(engine, cfg, p.message(USER, NOW, "STOP"), p.message("4915123456790", NOW, "STOP"))
    waits: list[float] = []
    with meta() as fake:
        fake.fail_next(131056)
        first = send_pass(engine, sender(waits))
    assert (first.sent, fake.calls) == (2, 3) and waits == [6.0]
    deliver(engine, cfg, p.message("4915123456791", NOW, "STOP"))
    with meta() as fake:
        fake.fail_next(130429, times=4)
        later = send_pass(engine, sender([]))
    assert (later.deferred, fake.calls) == (1, 4)
    row = rows(engine)[-1]
    assert (row.state, row.error_code, row.rounds) == ("queued", "130429", 1)
    assert row.next_attempt_at > NOW
    with meta() as fake:
        assert send_pass(engine, now=row.next_attempt_at).sent == 1


def test_replies_go_out_in_the_order_the_user_wrote(engine: Engine, store_url: str) -> None:
    """A START and a STOP typed a second apart are confirmed in that order, whatever their
    message ids, so the last word in the chat matches the consent recorded."""
    cfg = replies_config(store_url)
    deliver(
        engine,
        cfg,
        p.message(USER, NOW - timedelta(seconds=1), "START", message_id="wamid.ZZZ"),
        p.message(USER, NOW, "STOP", message_id="wamid.AAA"),
    )
    with meta() as fake:
        send_pass(engine)
    assert [m.reply_to for m in fake.sent] == ["wamid.ZZZ", "wamid.AAA"]

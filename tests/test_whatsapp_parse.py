"""Parsing webhook payloads: every entry, change and item; garbage never fails the rest."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import payloads as p
from tests.conftest import SHARED_FIXTURES
from waconsent.connectors.webhook_signature import sign, verify_signature
from waconsent.connectors.whatsapp import parse_payload
from waconsent.domain import EventKind, Signal
from waconsent.keywords import KeywordRules, normalize_text

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
KEYWORDS = KeywordRules.build(
    ["START", "ANMELDEN"], ["STOP", "STOPP", "UNSUBSCRIBE"], ["Stop promotions", "Werbung stoppen"]
)


def one(change: dict[str, Any]) -> Any:
    parsed = parse_payload(p.payload(change), KEYWORDS)
    assert not parsed.skipped, parsed.skipped
    assert len(parsed.events) == 1
    return parsed.events[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  Stop!  ", "stop"),
        ("S.T.O.P", "stop"),
        ("ＳＴＯＰ", "stop"),
        ("Stop   promotions", "stop promotions"),
    ],
)
def test_normalize_text(text: str, expected: str) -> None:
    """Keywords are trimmed, case-folded and stripped of punctuation."""
    assert normalize_text(text) == expected


@pytest.mark.parametrize(
    ("body", "signal", "keyword"),
    [
        ("STOP", Signal.OPT_OUT, "STOP"),
        (" stop. ", Signal.OPT_OUT, "STOP"),
        ("Stopp!", Signal.OPT_OUT, "STOPP"),
        ("start", Signal.OPT_IN, "START"),
        ("Anmelden", Signal.OPT_IN, "ANMELDEN"),
        ("please stop calling", Signal.NONE, None),
        ("Hi!", Signal.NONE, None),
    ],
)
def test_text_keywords(body: str, signal: Signal, keyword: str | None) -> None:
    """Only a message that is exactly a keyword (after normalization) is a signal."""
    event = one(p.message("4915123456789", T0, body))
    assert (event.signal, event.keyword) == (signal, keyword)
    assert event.opens_session and event.kind is EventKind.MESSAGE


def test_message_body_is_not_kept() -> None:
    """Message bodies are dropped; only the matched keyword survives."""
    event = one(p.message("4915123456789", T0, "my secret address is Hauptstr. 1"))
    assert "Hauptstr" not in repr(event)


@pytest.mark.parametrize(
    ("payload", "text"),
    [
        ("Werbung stoppen", "Werbung stoppen"),
        ("Stop promotions", "Stop promotions"),
        ("STOP_PROMO_123", "Werbung stoppen"),
        ("STOP", "Abbestellen"),
    ],
)
def test_stop_promotions_button(payload: str, text: str) -> None:
    """A Stop promotions quick reply revokes by payload or by any configured label."""
    event = one(p.button("4915123456789", T0, payload, text))
    assert event.signal is Signal.OPT_OUT


def interactive(kind: str, reply_id: str, title: str) -> dict[str, Any]:
    return p.message(
        "4915123456789",
        T0,
        None,
        type_="interactive",
        interactive={"type": kind, kind: {"id": reply_id, "title": title}},
    )


def test_interactive_replies_match_keywords() -> None:
    """Interactive button and list replies are matched on their visible title."""
    assert one(interactive("button_reply", "opt-in", "Start")).signal is Signal.OPT_IN
    assert one(interactive("list_reply", "x", "Unsubscribe")).signal is Signal.OPT_OUT


@pytest.mark.parametrize(
    "change",
    [
        interactive("button_reply", "START", "Get started"),
        interactive("list_reply", "start", "Start a return"),
        p.button("4915123456789", T0, "START", "Start return"),
    ],
    ids=["button id", "list row id", "quick reply payload"],
)
def test_business_chosen_id_or_payload_never_opts_in(change: dict[str, Any]) -> None:
    """A button id or payload is the business's word, not the user's: no opt-in."""
    event = one(change)
    assert event.signal is Signal.NONE and event.keyword is None and event.opens_session


def test_declared_opt_in_payload_opts_in() -> None:
    """A payload listed in opt_in_button_payloads opts in, with the payload as its keyword."""
    rules = KeywordRules.build(["START"], ["STOP"], ["Stop promotions"], ["JOIN_WA_NEWS"])
    button = p.button("4915123456789", T0, "JOIN_WA_NEWS", "Yes, please")
    event = parse_payload(p.payload(button), rules).events[0]
    assert (event.signal, event.keyword) == (Signal.OPT_IN, "JOIN_WA_NEWS")
    assert event.evidence == f"whatsapp:keyword:JOIN_WA_NEWS:{event.message_id}"
    other = parse_payload(
        p.payload(p.button("4915123456789", T0, "join_wa_news", "Yes")), rules
    ).events[0]
    assert other.signal is Signal.NONE  # payloads are compared exactly


@pytest.mark.parametrize(
    "change",
    [
        interactive("button_reply", "STOP", "Thanks"),
        interactive("list_reply", "unsubscribe", "Manage my options"),
        p.button("4915123456789", T0, "STOPP", "Weiter"),
    ],
    ids=["button id", "list row id", "quick reply payload"],
)
def test_opt_out_is_read_from_ids_and_payloads_too(change: dict[str, Any]) -> None:
    """Opt-outs stay generous: an id or payload that is an opt-out keyword revokes."""
    assert one(change).signal is Signal.OPT_OUT


_words = st.sampled_from(["START", "start", "Anmelden", "JOIN", "STOP", "stopp", "Hi", ""])
_any_text = st.one_of(_words, st.text(max_size=12))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["button", "button_reply", "list_reply"]), _any_text, _any_text)
def test_no_business_chosen_value_ever_opts_in(kind: str, chosen: str, visible: str) -> None:
    """Whatever id or payload the business chose, only the visible text can opt in."""
    change = (
        p.message(
            "4915123456789", T0, None, type_="button", button={"payload": chosen, "text": visible}
        )
        if kind == "button"
        else interactive(kind, chosen, visible)
    )
    events = parse_payload(p.payload(change), KEYWORDS).events
    visible_opts_in = normalize_text(visible) in KEYWORDS.opt_in
    for event in events:
        if event.signal is Signal.OPT_IN:
            assert visible_opts_in


@pytest.mark.parametrize(
    "type_",
    [
        "image",
        "video",
        "audio",
        "document",
        "sticker",
        "location",
        "contacts",
        "reaction",
        "order",
        "unsupported",
        "request_welcome",
    ],
)
def test_media_and_other_types_open_a_session_without_consent(type_: str) -> None:
    """Every non-system user message opens the window and never changes consent."""
    event = one(p.message("4915123456789", T0, None, type_=type_, **{type_: {}}))
    assert event.opens_session and event.signal is Signal.NONE and event.message_type == type_


def test_unknown_future_type_is_kept() -> None:
    """A message type not known yet is stored as other:<type>, not dropped."""
    event = one(p.message("4915123456789", T0, None, type_="hologram"))
    assert event.message_type == "other:hologram" and event.opens_session


def test_referral_is_recorded() -> None:
    """A click-to-WhatsApp referral keeps its source id."""
    event = one(
        p.message("4915123456789", T0, "info?", referral={"source_id": "AD42", "source_type": "ad"})
    )
    assert event.referral_source_id == "AD42"


def test_system_number_change() -> None:
    """user_changed_number is recorded with the new number and opens no session."""
    change = p.message(
        "4915123456789",
        T0,
        None,
        type_="system",
        system={"type": "user_changed_number", "wa_id": "4915199999999", "body": "changed"},
    )
    event = one(change)
    assert event.signal is Signal.NUMBER_CHANGED and event.new_wa_id == "4915199999999"
    assert not event.opens_session


def test_system_preference_change_stop() -> None:
    """The messages-field form of a marketing stop (system user_preference_changed) revokes."""
    change = p.message(
        "4915123456789",
        T0,
        None,
        type_="system",
        system={"type": "user_preference_changed", "marketing": "stop"},
    )
    assert one(change).signal is Signal.OPT_OUT


def test_status_131050_revokes_and_others_do_not() -> None:
    """A failed status with 131050 is an opt-out; other failures are not."""
    assert one(p.status("4915123456789", T0, "failed", codes=(131050,))).signal is Signal.OPT_OUT
    other = one(p.status("4915123456789", T0, "failed", codes=(131047,)))
    assert other.signal is Signal.NONE and other.error_codes == (131047,)
    assert not other.opens_session


def test_status_free_entry_point_window() -> None:
    """A referral_conversion status carries its window expiry; a plain one does not."""
    expiry = T0 + timedelta(hours=72)
    fep = one(
        p.status(
            "4915123456789",
            T0,
            conversation={
                "id": "c",
                "expiration_timestamp": p.unix(expiry),
                "origin": {"type": "referral_conversion"},
            },
        )
    )
    assert fep.window_expires_at == expiry
    plain = parse_payload(
        p.payload(
            p.status(
                "4915123456789",
                T0,
                conversation={
                    "id": "c",
                    "expiration_timestamp": p.unix(expiry),
                    "origin": {"type": "marketing"},
                },
            )
        )
    )
    assert plain.events == () and [s.wa_id for s in plain.plain] == ["4915123456789"]


def test_status_dedup_key_includes_state() -> None:
    """Statuses are identified by message id and status."""
    free = {"pricing": {"type": "free_entry_point"}}  # a status the full parse reads
    sent = one(p.status("4915123456789", T0, "sent", message_id="wamid.X", **free))
    read = one(p.status("4915123456789", T0, "read", message_id="wamid.X", **free))
    assert sent.key != read.key


@pytest.mark.parametrize(
    ("value", "signal"),
    [("stop", Signal.OPT_OUT), ("resume", Signal.RESUME), ("signup", Signal.NONE)],
)
def test_user_preferences(value: str, signal: Signal) -> None:
    """user_preferences stop revokes; resume is evidence only."""
    event = one(p.preference("4915123456789", T0, value))
    assert event.signal is signal and event.kind is EventKind.PREFERENCE
    assert event.key == f"pref:4915123456789:{value}:{int(T0.timestamp())}"


def test_user_id_only_message() -> None:
    """A 2026 message with a business-scoped user id and no number is kept."""
    change = p.message("4915123456789", T0, "STOP", user_id="US.123")
    del change["value"]["messages"][0]["from"]
    change["value"]["contacts"] = [{"user_id": "US.123"}]
    event = one(change)
    assert event.wa_id is None and event.user_id == "US.123" and event.signal is Signal.OPT_OUT


def test_batched_payload_reads_every_entry_change_and_item() -> None:
    """Several entries, several changes and many items: nothing is lost."""
    changes = [p.message(f"49151000000{i:02d}", T0, "hi") for i in range(30)]
    changes += [p.status(f"49151000000{i:02d}", T0) for i in range(20)]
    changes += [p.preference("4915100000001", T0 + timedelta(seconds=i), "stop") for i in range(5)]
    batch = p.payload(*changes, entries=4)
    batch["entry"][0]["changes"][0]["value"]["messages"].append(
        p.message("4915199999999", T0, "STOP")["value"]["messages"][0]
    )
    parsed = parse_payload(batch, KEYWORDS)
    assert len(parsed.events) == 36 and len(parsed.plain) == 20  # statuses read lightly
    assert sum(e.signal is Signal.OPT_OUT for e in parsed.events) == 6


def test_garbage_items_are_skipped_with_location() -> None:
    """Bad items are counted with where they were; good neighbours are kept."""
    good = p.message("4915123456789", T0, "STOP")
    broken = p.message("4915123456789", T0, "x")
    broken["value"]["messages"].extend(
        [
            "not an object",
            {"id": "wamid.B", "from": "49151", "timestamp": "yesterday"},
            {"from": "49151", "timestamp": "1700000000"},
        ]
    )
    parsed = parse_payload(p.payload(good, broken, {"field": "messages", "value": 7}), KEYWORDS)
    assert len(parsed.events) == 2
    locations = {s.location for s in parsed.skipped}
    assert "entry[0].changes[1].value.messages[1]" in locations
    assert "entry[0].changes[1].value.messages[2]" in locations
    assert "entry[0].changes[1].value.messages[3]" in locations
    assert "entry[0].changes[2]" in locations


@pytest.mark.parametrize(
    "garbage",
    [None, 3, "x", [], {}, {"entry": "x"}, {"entry": [1]}, {"entry": [{"changes": [None]}]}],
)
def test_garbage_payloads_never_raise(garbage: Any) -> None:
    """Whatever the shape, the parser answers with skipped items, not an exception."""
    parsed = parse_payload(garbage, KEYWORDS)
    assert parsed.events == ()


def test_non_consent_fields_are_ignored_not_skipped() -> None:
    """Account, template and call updates are counted as ignored, not as errors."""
    parsed = parse_payload(p.payload({"field": "account_update", "value": {"event": "X"}}))
    assert parsed.ignored_changes == 1 and not parsed.skipped


def test_signature_over_raw_bytes() -> None:
    """The signature is checked over the raw bytes, in constant time, and fails on any change."""
    body = json.dumps({"a": "Jos\u00e9"}).encode()
    header = sign(body, "secret")
    assert verify_signature(body, header, "secret")
    assert not verify_signature(body + b" ", header, "secret")
    assert not verify_signature(body, header, "other")
    assert not verify_signature(body, None, "secret")
    assert not verify_signature(body, header.removeprefix("sha256="), "secret")


# ---- conformance: every real sample under ../shared, when it is there ------------------------


def _samples() -> list[tuple[str, Any]]:
    root = SHARED_FIXTURES / "whatsapp-webhooks"
    if not root.exists():
        return []
    found = []
    for path in sorted(root.rglob("*.json")):
        document = json.loads(path.read_text(encoding="utf-8"))
        if "entry" in document:
            found.append((f"{path.parent.name}/{path.name}", document))
        else:  # pywa's files are dicts of named samples
            found.extend((f"{path.parent.name}/{path.name}:{k}", v) for k, v in document.items())
    return found


SAMPLES = _samples()


@pytest.mark.skipif(not SAMPLES, reason="../shared/fixtures/whatsapp-webhooks is not present")
@pytest.mark.parametrize(("name", "sample"), SAMPLES, ids=[n for n, _ in SAMPLES])
def test_conformance_every_shared_sample_parses(name: str, sample: Any) -> None:
    """Every real sample parses without an exception and every messages/statuses item counts
    (an event, a skip, or a plain status read no further)."""
    parsed = parse_payload(sample, KEYWORDS)
    items = sum(
        len(change["value"].get(key) or [])
        for entry in sample["entry"]
        for change in entry["changes"]
        if change.get("field") in ("messages", "user_preferences")
        for key in ("messages", "statuses", "user_preferences")
    )
    assert len(parsed.events) + len(parsed.skipped) + len(parsed.plain) == items
    for event in parsed.events:
        assert event.occurred_at.tzinfo is not None
        assert event.wa_id or event.user_id


@pytest.mark.skipif(not SAMPLES, reason="../shared/fixtures/whatsapp-webhooks is not present")
def test_conformance_known_meanings() -> None:
    """The samples with a known consent meaning are read that way."""
    by_name = dict(SAMPLES)
    unsubscribe = parse_payload(
        by_name["meta-docs-examples/template_quick_reply_button.json"], KEYWORDS
    ).events[0]
    assert unsubscribe.signal is Signal.OPT_OUT and unsubscribe.keyword == "UNSUBSCRIBE"
    resume = parse_payload(by_name["meta-docs-examples/user_preferences_resume.json"]).events[0]
    assert resume.signal is Signal.RESUME
    moved = parse_payload(by_name["meta-docs-examples/system_user_changed_number.json"]).events[0]
    assert moved.signal is Signal.NUMBER_CHANGED and moved.new_wa_id == "12195555358"
    bsuid = parse_payload(by_name["whatsapp-api-js/incoming.json"]).events[0]
    assert bsuid.user_id == "US.13491208655302741918" and bsuid.wa_id == "16315551181"
    failed = parse_payload(by_name["meta-docs-examples/status_failed_131049.json"]).events[0]
    assert failed.error_codes == (131049,) and failed.signal is Signal.NONE
    plain = parse_payload(by_name["meta-docs-examples/text_message.json"]).events[0]
    assert plain.signal is Signal.NONE and plain.opens_session


def test_oversized_identifiers_and_nul_bytes() -> None:
    """An item with an absurdly long id is skipped by location; NUL bytes are stripped."""
    long_id = p.message("4915123456789", T0, "STOP", message_id="wamid." + "x" * 300)
    nul = p.message("4915123456789\x00", T0, "STOP")
    parsed = parse_payload(p.payload(long_id, nul), KEYWORDS)
    assert [e.wa_id for e in parsed.events] == ["4915123456789"]
    assert parsed.skipped[0].reason == "message_id longer than 200 characters"

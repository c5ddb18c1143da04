"""Issue 11: no broken item, byte or timestamp in a delivery costs the STOPs beside it.

Parser-level cases, then the receiver served for real (uvicorn on loopback) over SQLite
and PostgreSQL, then the Hypothesis property over any delivery of valid STOPs plus junk.
"""

from __future__ import annotations

import json
import socket
import tempfile
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select, text
from starlette.exceptions import StarletteDeprecationWarning

from tests import payloads as p
from tests.test_run import NOW, T0, contact, loaded, opted_in
from tests.test_web import (
    APP_SECRET,
    PATH,
    Live,
    body_of,
    live_server,
    make_config,
    post,
    signed_headers,
    stored_keys,
)
from waconsent.connectors.webhook_signature import (
    SIGNATURE_HEADER,
    decode_json,
    sign,
    verify_signature,
)
from waconsent.connectors.whatsapp import parse_payload
from waconsent.domain import Event, EventKind, Signal
from waconsent.keywords import KeywordRules, normalize_text
from waconsent.store import evidence as evidence_store
from waconsent.store.contacts import upsert_contacts
from waconsent.store.engine import open_engine
from waconsent.store.events import FIELD_LIMITS
from waconsent.store.tables import events
from waconsent.sync.ingest import ingest_payload, keyword_rules
from waconsent.sync.run import run_once
from waconsent.web import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

KEYWORDS = KeywordRules.build(["START"], ["STOP", "STOPP"], ["Stop promotions"])
RECENT = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)


def stamp(moment: datetime) -> str:
    return str(int(moment.timestamp()))


def stop_item(n: int, at: datetime = RECENT) -> dict[str, Any]:
    return {
        "from": f"4915123{n:06d}",
        "id": f"wamid.STOP{n}",
        "timestamp": stamp(at),
        "type": "text",
        "text": {"body": "STOP"},
    }


def change(
    messages: list[Any] | None = None,
    statuses: list[Any] | None = None,
    contacts: list[Any] | None = None,
) -> dict[str, Any]:
    value: dict[str, Any] = {"messaging_product": "whatsapp"}
    for key, items in (("messages", messages), ("statuses", statuses), ("contacts", contacts)):
        if items is not None:
            value[key] = items
    return {"field": "messages", "value": value}


def delivery(*changes: dict[str, Any]) -> dict[str, Any]:
    return {"object": "whatsapp_business_account", "entry": [{"id": "W", "changes": list(changes)}]}


def stop_keys(engine: Engine) -> set[str]:
    return {key for key in stored_keys(engine) if key.startswith("msg:wamid.STOP")}


@pytest.fixture
def live(engine: Engine, store_url: str) -> Iterator[Live]:
    """The receiver served by uvicorn over the parametrized store (SQLite and PostgreSQL)."""
    with live_server(engine, store_url) as server:
        yield server


# ---------------------------------------------------------------------------- 1. over-long


def test_failed_status_with_40_error_codes_is_skipped_and_the_stops_beside_it_stored(
    live: Live,
) -> None:
    """A status with 40 error codes beside 3 STOPs: 200, the STOPs stored, the status skipped."""
    failed = {
        "id": "wamid.out.1",
        "status": "failed",
        "timestamp": stamp(RECENT),
        "recipient_id": "4915123000999",
        "errors": [{"code": 131000 + i, "title": "x"} for i in range(40)],
    }
    document = delivery(change([stop_item(1), stop_item(2), stop_item(3)], [failed]))
    body = body_of(document)
    response = post(live, body, signed_headers(body))
    assert response.status_code == 200
    assert response.json() == {"stored": 3, "duplicates": 0, "skipped": 1}
    assert stop_keys(live.engine) == {"msg:wamid.STOP1", "msg:wamid.STOP2", "msg:wamid.STOP3"}


# the item that carries each limited field at a given length, and where that value lands
LIMITED = {
    "message_id": lambda n: {**stop_item(1), "id": "w" * n},
    "wa_id": lambda n: {**stop_item(1), "from": "4" * n},
    "user_id": lambda n: {**stop_item(1), "from_user_id": "U" * n},
    "message_type": lambda n: {**stop_item(1), "type": "t" * (n - len("other:"))},
    "referral_source_id": lambda n: {**stop_item(1), "referral": {"source_id": "r" * n}},
    "new_wa_id": lambda n: {
        **stop_item(1),
        "type": "system",
        "system": {"type": "user_changed_number", "wa_id": "5" * n},
    },
    "detail": lambda n: {**stop_item(1), "type": "system", "system": {"type": "s" * n}},
    "new_user_id": lambda n: {
        **stop_item(1),
        "type": "system",
        "system": {"type": "user_changed_user_id", "user_id": "U" * n},
    },
    "status": lambda n: {
        "id": "wamid.s",
        "status": "x" * n,
        "timestamp": stamp(RECENT),
        "recipient_id": "4915123000001",
        "errors": [{"code": 131047}],
    },
    # 131050 and n - 7 more digits: the stored text is exactly n characters
    "error_codes": lambda n: {
        "id": "wamid.e",
        "status": "failed",
        "timestamp": stamp(RECENT),
        "recipient_id": "4915123000001",
        "errors": [{"code": 131050}, {"code": "9" * (n - 7)}],
    },
}


def test_every_limited_column_is_checked_at_parse_time() -> None:
    """The parser's limits are the events table's lengths, for every text column an item fills."""
    # issue 15: opt_in_ip / opt_in_form come from the store's own validated request, never
    # from a payload (a form id is at most 64 characters, an IP at most 45)
    assert set(LIMITED) | {"key", "kind", "signal", "keyword", "opt_in_ip", "opt_in_form"} == set(
        FIELD_LIMITS
    )
    assert FIELD_LIMITS["error_codes"] == 200 and FIELD_LIMITS["message_id"] == 200


@pytest.mark.parametrize("name", sorted(LIMITED))
def test_a_value_at_its_column_length_is_stored_and_one_longer_skipped(
    engine: Engine, name: str
) -> None:
    """A value at its column's length is stored; one character more skips only that item."""
    limit = FIELD_LIMITS[name]
    item = LIMITED[name]
    section = "statuses" if name in ("status", "error_codes") else "messages"
    at_limit = ingest_payload(
        engine, delivery(change(**{section: [item(limit)]})), KEYWORDS, "test"
    )
    assert (at_limit.stored, at_limit.skipped) == (1, ())
    over = ingest_payload(
        engine,
        delivery(change(**{section: [item(limit + 1)]}), change([stop_item(7)])),
        KEYWORDS,
        "test",
    )
    assert over.stored == 1 and len(over.skipped) == 1
    assert over.skipped[0].reason == f"{name} longer than {limit} characters"
    assert over.skipped[0].location == f"entry[0].changes[0].value.{section}[0]"


@pytest.fixture
def poisoned(engine: Engine) -> Engine:
    """The store refuses one message id the parser has no reason to refuse (a constraint
    the parser does not know of), as a future column or a driver quirk might."""
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(
                text(
                    "ALTER TABLE events ADD CONSTRAINT poison CHECK "
                    "(message_id IS NULL OR message_id NOT LIKE 'wamid.poison%')"
                )
            )
        else:
            connection.execute(
                text(
                    "CREATE TRIGGER poison BEFORE INSERT ON events "
                    "WHEN NEW.message_id LIKE 'wamid.poison%' BEGIN SELECT RAISE(ABORT, 'x'); END"
                )
            )
    return engine


def test_a_value_the_store_refuses_costs_only_its_own_item(
    poisoned: Engine, store_url: str
) -> None:
    """Items the store refuses are skipped by location; the rest and their evidence commit."""
    items = [stop_item(n) for n in range(40)]
    items[5] = {**items[5], "id": "wamid.poison.5"}
    items[31] = {**items[31], "id": "wamid.poison.31"}
    with live_server(poisoned, store_url) as server:
        body = body_of(delivery(change(items)))
        response = post(server, body, signed_headers(body))
        assert response.status_code == 200
        assert response.json() == {"stored": 38, "duplicates": 0, "skipped": 2}
        again = post(server, body, signed_headers(body))
        assert again.json() == {"stored": 0, "duplicates": 38, "skipped": 2}
    assert len(stop_keys(poisoned)) == 38
    report = ingest_payload(poisoned, delivery(change(items)), KEYWORDS, "test")
    assert [s.location for s in report.skipped] == [
        "entry[0].changes[0].value.messages[5]",
        "entry[0].changes[0].value.messages[31]",
    ]
    assert all(s.reason.startswith("refused by the store (") for s in report.skipped)
    assert len(report.events) == 38 and not any("poison" in e.key for e in report.events)
    with poisoned.connect() as connection:
        assert evidence_store.verify(connection) == []
        assert evidence_store.chain_length(connection) == 38


# ---------------------------------------------------------------------------- 2. time range


@pytest.mark.parametrize(
    ("when", "reason"),
    [
        ("253402300799", "timestamp 9999-12-31 23:59 UTC is later than"),
        (str(int((datetime.now(UTC) + timedelta(days=3)).timestamp())), "is later than"),
        ("1199145600", "timestamp before 2009"),
        ("1" * 5000, "timestamp is not Unix seconds"),
        ("-1", "timestamp before 2009"),
        (1e300, "timestamp is not Unix seconds"),
    ],
)
def test_a_time_outside_the_sane_window_skips_only_that_item(when: Any, reason: str) -> None:
    """A time before 2009 or over a day ahead skips its item with its location; the STOP stays."""
    bad = {**stop_item(1), "timestamp": when}
    parsed = parse_payload(delivery(change([bad, stop_item(2)])), KEYWORDS, now=datetime.now(UTC))
    assert [e.key for e in parsed.events] == ["msg:wamid.STOP2"]
    assert parsed.skipped[0].location == "entry[0].changes[0].value.messages[0]"
    assert reason in parsed.skipped[0].reason


def test_without_a_clock_the_window_ends_in_2100() -> None:
    """A pure call (no `now`) still refuses the year 9999 but accepts a near-future time."""
    near = datetime(2090, 1, 1, tzinfo=UTC)
    parsed = parse_payload(
        delivery(
            change(
                [
                    {**stop_item(1), "timestamp": stamp(near)},
                    {**stop_item(2), "timestamp": "253402300799"},
                ]
            )
        )
    )
    assert [e.occurred_at for e in parsed.events] == [near]
    assert len(parsed.skipped) == 1


@pytest.mark.parametrize("expiry", ["253402300799", "1000", "nonsense"])
def test_an_implausible_window_expiry_is_ignored_and_the_status_kept(expiry: str) -> None:
    """An implausible window expiry is dropped; the status (a 131050 opt-out) is kept."""
    status = {
        "id": "wamid.s",
        "status": "failed",
        "timestamp": stamp(RECENT),
        "recipient_id": "4915123000001",
        "errors": [{"code": 131050}],
        "conversation": {
            "id": "c",
            "expiration_timestamp": expiry,
            "origin": {"type": "referral_conversion"},
        },
    }
    parsed = parse_payload(delivery(change(statuses=[status])), now=datetime.now(UTC))
    assert [(e.signal, e.window_expires_at) for e in parsed.events] == [(Signal.OPT_OUT, None)]


def test_a_window_expiry_within_a_week_is_kept() -> None:
    """A 72-hour free entry point window is still read (the bound does not cut real ones)."""
    expiry = RECENT + timedelta(hours=72)
    status = {
        "id": "wamid.s",
        "status": "delivered",
        "timestamp": stamp(RECENT),
        "recipient_id": "4915123000001",
        "conversation": {
            "id": "c",
            "expiration_timestamp": stamp(expiry),
            "origin": {"type": "referral_conversion"},
        },
    }
    parsed = parse_payload(delivery(change(statuses=[status])), now=datetime.now(UTC))
    assert parsed.events[0].window_expires_at == expiry


def test_a_year_9999_event_already_in_the_store_fails_one_record_not_the_run(
    engine: Engine, store_url: str
) -> None:
    """A stored year-9999 event fails only its record (reported); other STOPs are written."""
    cfg = loaded(store_url)
    upsert_contacts(engine, [opted_in("A", "0151 23456789"), opted_in("B", "0170 1112233")], NOW)
    legacy = Event(
        key="msg:wamid.FAR",
        kind=EventKind.MESSAGE,
        occurred_at=datetime(9999, 12, 31, 23, 0, tzinfo=UTC),
        wa_id="4915123456789",
        message_id="wamid.FAR",
        message_type="text",
        opens_session=True,
    )
    from waconsent.store import events as event_store

    with engine.begin() as connection:
        event_store.ingest(connection, [legacy], "legacy", NOW)
    ingest_payload(
        engine,
        p.payload(p.message("491701112233", T0, "STOP")),
        keyword_rules(cfg.settings),
        "test",
        lambda: NOW,
    )
    for _ in range(2):
        report = run_once(cfg, engine=engine, clock=lambda: NOW)
        assert report.status == "partial"
        assert report.records_failed == 1
        assert report.record_errors == [{"record_id": "A", "error": "OverflowError"}]
    assert contact(engine, "B").opt_in is False
    assert contact(engine, "A").opt_in is True  # untouched, and listed for the admin


# ---------------------------------------------------------------------------- 3. bad bytes


def test_lone_surrogate_in_one_item_skips_that_item_on_both_stores(live: Live) -> None:
    """A lone surrogate in one id skips that item; the STOP beside it is stored, answer 200."""
    body = (
        b'{"entry":[{"changes":[{"field":"messages","value":{"messages":['
        b'{"from":"4915123000001","id":"wamid.\\ud800x","timestamp":"'
        + stamp(RECENT).encode()
        + b'","type":"text","text":{"body":"STOP"}},'
        + body_of(stop_item(2))
        + b"]}}]}]}"
    )
    response = post(live, body, signed_headers(body))
    assert response.status_code == 200
    assert response.json() == {"stored": 1, "duplicates": 0, "skipped": 1}
    assert stop_keys(live.engine) == {"msg:wamid.STOP2"}


def test_a_lone_surrogate_in_a_sender_or_status_is_skipped_too() -> None:
    """Every stored text is checked for what UTF-8 can encode, not just the id."""
    items = [
        {**stop_item(1), "from": "49151\udc80"},
        {**stop_item(2), "from_user_id": "US.\ud83d"},
        stop_item(3),
    ]
    status = {
        "id": "wamid.s",
        "status": "read\udfff",
        "timestamp": stamp(RECENT),
        "recipient_id": "4915123000001",
    }
    parsed = parse_payload(delivery(change(items, [status])))
    assert [e.key for e in parsed.events] == ["msg:wamid.STOP3"]
    assert [s.reason for s in parsed.skipped] == [
        "wa_id is not valid Unicode (a lone surrogate)",
        "user_id is not valid Unicode (a lone surrogate)",
        "status is not valid Unicode (a lone surrogate)",
    ]


@pytest.mark.parametrize("header", ["sha256=é" + "0" * 63, "sha256=\u00ff\u00fe", "é"])
def test_non_ascii_signature_is_refused_not_raised(header: str) -> None:
    """A signature header with a non-ASCII character is simply not a match (was TypeError)."""
    assert verify_signature(b"{}", header, APP_SECRET) is False


def test_non_ascii_byte_in_the_signature_header_answers_403(live: Live) -> None:
    """Sent as raw bytes on the wire, a non-ASCII signature is a 403, and nothing is stored."""
    body = body_of(delivery(change([stop_item(1)])))
    forged = sign(body, APP_SECRET)[:-2].encode() + b"\xe9\xff"
    head = (
        (
            f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
        ).encode()
        + SIGNATURE_HEADER.encode()
        + b": "
        + forged
        + b"\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as conn:
        conn.sendall(head + body)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert stop_keys(live.engine) == set()


def test_an_integer_too_long_for_python_fails_its_item_not_the_delivery(live: Live) -> None:
    """A 5,000-digit integer skips only the item holding it, not the whole delivery."""
    body = (
        b'{"entry":[{"changes":[{"field":"messages","value":{"messages":['
        b'{"from":"4915123000001","id":"wamid.BIG","timestamp":'
        + b"7" * 5000
        + b',"type":"text","text":{"body":"STOP"}},'
        + body_of(stop_item(2))
        + b"]}}]}]}"
    )
    assert decode_json(b'{"n": ' + b"7" * 5000 + b"}")["n"] == "7" * 5000
    response = post(live, body, signed_headers(body))
    assert response.status_code == 200
    assert response.json() == {"stored": 1, "duplicates": 0, "skipped": 1}


# ---------------------------------------------------------------------------- 4. contacts


def test_contacts_are_matched_by_wa_id_as_before() -> None:
    """The contacts index keeps the old lookup: first contact per wa_id, else the only contact."""
    contacts = [
        {"wa_id": "4915123000001", "user_id": "US.first"},
        {"wa_id": "4915123000001", "user_id": "US.second"},
        {"wa_id": "4915123000002"},
        "not a contact",
    ]
    items = [stop_item(1), stop_item(2), stop_item(3)]
    parsed = parse_payload(delivery(change(items, contacts=contacts)))
    assert [e.user_id for e in parsed.events] == ["US.first", None, None]
    lone = {"wa_id": None, "user_id": "US.only"}
    without_sender = {**stop_item(4), "from_user_id": None}
    del without_sender["from"]
    alone = parse_payload(delivery(change([without_sender], contacts=[lone])))
    assert alone.events[0].user_id == "US.only"


def test_a_thousand_messages_with_twenty_thousand_contacts_parse_in_well_under_a_second() -> None:
    """1,000 messages beside 20,000 contacts parse in well under a second, each user id found."""
    items = [stop_item(n) for n in range(1000)]
    contacts = [{"wa_id": item["from"], "user_id": f"US.{n}"} for n, item in enumerate(items)]
    contacts += [{"wa_id": f"4917000{n:06d}", "user_id": f"US.x{n}"} for n in range(19_000)]
    document = delivery(change(items, contacts=contacts[::-1]))
    started = time.perf_counter()
    parsed = parse_payload(document, KEYWORDS)
    elapsed = time.perf_counter() - started
    assert [e.user_id for e in parsed.events] == [f"US.{n}" for n in range(1000)]
    assert elapsed < 1.0, elapsed


# ---------------------------------------------------------------------------- 5. invisible


@pytest.mark.parametrize(
    "body",
    [
        "\u200fSTOP",
        "STOP\u200b",
        "\ufeffSTOP",
        "ST\u00adOP",
        "STOP\ufe0f",
        "S\u200dT\u200cOP",
        "\u2066STOP\u2069",
        "STOP\U000e0101",
        "\u202eSTOP",
        "ＳＴＯＰ\u2060",
    ],
)
def test_invisible_characters_do_not_hide_a_stop(body: str) -> None:
    """Format characters and variation selectors around or inside STOP do not hide it."""
    event = parse_payload(
        delivery(change([{**stop_item(1), "text": {"body": body}}])), KEYWORDS
    ).events[0]
    assert (event.signal, event.keyword) == (Signal.OPT_OUT, "STOP")


def test_visible_differences_still_count() -> None:
    """Only invisible characters are dropped: a visible letter, digit or accent is another word."""
    assert normalize_text("ST\u00d6P") != "stop"
    assert normalize_text("STO\u0301P") != "stop"
    assert normalize_text("STOP2") != "stop"
    assert normalize_text("\u200bStop\u00a0promotions\ufe0f") == "stop promotions"


# ---------------------------------------------------------------------------- the property

stops = st.lists(st.integers(min_value=0, max_value=999_999), min_size=1, max_size=6, unique=True)
leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(["\ud800", "x\udfff", "\x00", "STOP", "253402300799", "9" * 400])
)
junk = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "from",
                    "id",
                    "timestamp",
                    "type",
                    "text",
                    "status",
                    "errors",
                    "wa_id",
                    "value",
                    "user_id",
                    "body",
                    "code",
                    "system",
                    "expiration_timestamp",
                    "conversation",
                    "x",
                ]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=20,
)
deep = st.integers(min_value=1, max_value=300).map(
    lambda depth: json.loads("[" * depth + "]" * depth)
)
broken_items = (
    junk
    | deep
    | st.builds(
        lambda base, extra: {**base, **extra},
        st.builds(stop_item, st.integers(min_value=1_000_000, max_value=1_000_100)),
        st.dictionaries(
            st.sampled_from(
                ["id", "from", "timestamp", "type", "text", "from_user_id", "referral"]
            ),
            junk,
            min_size=1,
            max_size=2,
        ),
    )
)

failed_statuses = st.builds(  # a valid failed status, its error codes anything at all
    lambda n, codes, extra: {
        "id": f"wamid.out{n}",
        "status": "failed",
        "timestamp": stamp(RECENT),
        "recipient_id": f"4917{n:08d}",
        "errors": [{"code": code} for code in codes],
        **extra,
    },
    st.integers(min_value=0, max_value=10**6),
    st.lists(
        st.integers(min_value=0, max_value=10**12)
        | st.sampled_from([131050, "9" * 300, "-1", "x"]),
        max_size=60,
    ),
    st.dictionaries(
        st.sampled_from(["id", "status", "recipient_id", "recipient_user_id", "conversation"]),
        junk,
        max_size=1,
    ),
)


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[dict[str, Any], set[str]]:
    """Valid STOPs spread over changes and entries, with broken items, broken changes and
    broken entries anywhere between them; (the delivery, the keys of its STOPs)."""
    numbers = draw(stops)
    parts = draw(st.integers(min_value=1, max_value=3))
    entries: list[Any] = []
    for part in range(parts):
        items: list[Any] = [stop_item(n) for n in numbers[part::parts]]
        for _ in range(draw(st.integers(min_value=0, max_value=4))):
            items.insert(draw(st.integers(min_value=0, max_value=len(items))), draw(broken_items))
        value: dict[str, Any] = {"messages": items}
        if draw(st.booleans()):
            value["statuses"] = draw(st.lists(broken_items | failed_statuses, max_size=3))
        if draw(st.booleans()):
            value["contacts"] = draw(st.lists(junk, max_size=3))
        changes: list[Any] = draw(st.lists(junk, max_size=2))
        changes.insert(
            draw(st.integers(min_value=0, max_value=len(changes))),
            {"field": "messages", "value": value},
        )
        entries.append({"id": "W", "changes": changes})
        entries.extend(draw(st.lists(junk, max_size=1)))
    expected = {f"msg:wamid.STOP{n}" for n in numbers}
    return {"object": "whatsapp_business_account", "entry": entries}, expected


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_any_delivery_of_stops_and_junk_stores_every_stop_and_answers_200(
    store: str, request: pytest.FixtureRequest
) -> None:
    """Any signed delivery of STOPs plus arbitrary junk answers 200 with every STOP stored."""
    with tempfile.TemporaryDirectory() as folder:
        url = (
            f"sqlite:///{folder}/ledger.db"
            if store == "sqlite"
            else str(request.getfixturevalue("postgres_url"))
        )
        engine = open_engine(url)
        try:
            with TestClient(
                create_app(make_config(url), engine), raise_server_exceptions=True
            ) as client:
                _check_deliveries(client, engine)
        finally:
            engine.dispose()


def _check_deliveries(client: TestClient, engine: Engine) -> None:
    @settings(
        max_examples=120,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(drawn=deliveries())
    def check(drawn: tuple[dict[str, Any], set[str]]) -> None:
        document, expected = drawn
        body = json.dumps(document, separators=(",", ":")).encode()
        response = client.post(PATH, content=body, headers=signed_headers(body))
        assert response.status_code == 200, response.text
        with engine.connect() as connection:
            found = set(
                connection.execute(select(events.c.key).where(events.c.key.in_(expected))).scalars()
            )
        assert found == expected

    check()

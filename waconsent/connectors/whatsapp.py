"""WhatsApp Cloud API webhook payloads: signature check and parsing into typed events.

The parser reads every `entry[]`, every `changes[]` and every item (a POST may
batch up to 1,000 updates). It keeps only what consent needs: who, when, the
message id, the matched keyword (never the body), status error codes and
window expiries. An item it cannot understand is skipped with its location;
it never fails the rest of the payload. That includes an item the store could not
hold: every value is checked against the `events` table's own column lengths and for
text UTF-8 can encode (a lone surrogate cannot), and every time against a sane window,
so one such item never makes the store refuse its neighbours.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import String

from waconsent.domain import (
    Event,
    EventKind,
    ParsedPayload,
    Signal,
    SkippedItem,
    error_codes_text,
    utc_from_unix,
)
from waconsent.store.tables import events as events_table

SIGNATURE_HEADER = "X-Hub-Signature-256"
STOP_MARKETING_ERROR = 131050
FREE_ENTRY_POINT_ORIGINS = frozenset({"referral_conversion"})
FREE_ENTRY_POINT_PRICING = frozenset({"free_entry_point"})
# Meta's marketing opt-out quick reply, as its payload arrives when not localized.
STOP_BUTTON_PAYLOADS = frozenset({"stop promotions"})
# The webhook fields that can carry consent or identity; account, template and call
# updates carry neither. `user_id_update` was documented by Meta until August 2026 (then
# replaced by the `user_changed_user_id` system message); deliveries of it are still read.
CONSENT_FIELDS = frozenset({"messages", "user_preferences", "user_id_update"})
KNOWN_USER_MESSAGE_TYPES = frozenset({
    "text", "button", "interactive", "image", "video", "audio", "document", "sticker",
    "location", "contacts", "reaction", "order", "system", "unsupported", "request_welcome",
    "revoke", "edit", "unknown",
})


# Variation selectors (VS1-16, VS17-256, Mongolian free variation selectors) are
# combining marks, not format characters, yet just as invisible: "STOP\ufe0f" shows as STOP.
_VARIATION_SELECTORS = frozenset(
    [*map(chr, range(0xFE00, 0xFE10)), *map(chr, range(0xE0100, 0xE01F0)),
     *map(chr, range(0x180B, 0x1810))])


def _dropped(ch: str) -> bool:
    """Punctuation, and what displays as nothing: format characters (category Cf: the
    zero-width space and joiners, direction marks, the soft hyphen, the BOM) and variation
    selectors. A STOP with any of them around or inside it still reads STOP to the user."""
    category = unicodedata.category(ch)
    return category[0] == "P" or category == "Cf" or ch in _VARIATION_SELECTORS


def normalize_text(text: str) -> str:
    """SPEC 5.3: trimmed, case-folded, punctuation stripped (inner spaces folded to one).

    NFKC first, so full-width or compatibility forms of a keyword match too; invisible
    characters are dropped with the punctuation (see `_dropped`).
    """
    folded = unicodedata.normalize("NFKC", text)
    kept = "".join(ch for ch in folded if not _dropped(ch))
    return " ".join(kept.casefold().split())


@dataclass(frozen=True)
class KeywordRules:
    """The configured keywords, pre-normalized; maps normalized text back to the keyword.

    `opt_in_payloads` are button ids / payloads (chosen by the business, never seen by the
    user) that the business declared as opt-ins; they are compared exactly, not normalized.
    """

    opt_in: Mapping[str, str]
    opt_out: Mapping[str, str]
    stop_labels: frozenset[str]
    opt_in_payloads: frozenset[str] = frozenset()

    @classmethod
    def build(cls, opt_in: Iterable[str], opt_out: Iterable[str],
              stop_labels: Iterable[str], opt_in_payloads: Iterable[str] = ()) -> KeywordRules:
        return cls(
            opt_in={normalize_text(k): k.strip().upper() for k in opt_in},
            opt_out={normalize_text(k): k.strip().upper() for k in opt_out},
            stop_labels=frozenset(normalize_text(s) for s in stop_labels) | STOP_BUTTON_PAYLOADS,
            opt_in_payloads=frozenset(p.strip() for p in opt_in_payloads if p.strip()),
        )


DEFAULT_KEYWORDS = KeywordRules.build(["START"], ["STOP", "UNSUBSCRIBE"], ["Stop promotions"])


def verify_signature(raw_body: bytes, header_value: str | None, app_secret: str) -> bool:
    """HMAC-SHA256 over the raw bytes as sent, compared in constant time.

    A header with a non-ASCII character is no hex digest; it is refused up front, because
    `hmac.compare_digest` raises on non-ASCII text instead of answering False.
    """
    if not header_value or not header_value.startswith("sha256="):
        return False
    given = header_value.removeprefix("sha256=").strip().lower()
    if not given.isascii():
        return False
    expected = hmac.new(app_secret.encode(), raw_body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), given.encode())


def _int_or_digits(digits: str) -> int | str:
    try:
        return int(digits)
    except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
        return digits


def decode_json(raw: bytes | str) -> Any:
    """`json.loads`, except that an integer too long for `int()` stays its digit string.

    Python refuses to convert integers of more than 4,300 digits, and `json.loads` would
    refuse the whole document for one of them; as a string it fails only the item that
    holds it. Raises ValueError (not JSON) or RecursionError (nested too deeply).
    """
    return json.loads(raw, parse_int=_int_or_digits)


def sign(raw_body: bytes, app_secret: str) -> str:
    """The header value Meta would send; for tests, benchmarks and replay tools."""
    return "sha256=" + hmac.new(app_secret.encode(), raw_body, hashlib.sha256).hexdigest()


class _Skip(Exception):
    """An item that cannot be understood; carries the reason."""


# The sane window for an event's time. WhatsApp did not exist before 2009; Meta stamps an
# update when it happens, so one from more than a day ahead of the receiver's clock is
# garbage (and one in the year 9999 would overflow `+ 24 h` in the rules). Without a clock
# (a pure call from a test or a tool) only the absolute bounds apply.
EARLIEST = datetime(2009, 1, 1, tzinfo=UTC)
LATEST_WITHOUT_CLOCK = datetime(2100, 1, 1, tzinfo=UTC)
FUTURE_TOLERANCE = timedelta(days=1)
# A free entry point window lasts 72 hours; an expiry further from its status is garbage
# and the window is ignored (the status itself, perhaps a 131050 STOP, is kept).
LONGEST_WINDOW = timedelta(days=7)


@dataclass(frozen=True, slots=True)
class _Change:
    """What every item of one change shares: its `contacts[]`, indexed once (a message
    looks its sender up by wa_id; scanning the list per item was quadratic), and the
    latest acceptable time."""

    user_ids: Mapping[str, str | None]  # wa_id -> user id; the first contact listed wins
    only_user_id: str | None  # the user id of the single contact, when there is exactly one
    latest: datetime

    @classmethod
    def of(cls, value: Mapping[str, Any], latest: datetime) -> _Change:
        contacts = value.get("contacts")
        candidates = ([c for c in contacts if isinstance(c, Mapping)]
                      if isinstance(contacts, list) else [])
        user_ids: dict[str, str | None] = {}
        for contact in candidates:
            wa_id = _str(contact.get("wa_id"))
            if wa_id is not None and wa_id not in user_ids:
                user_ids[wa_id] = _str(contact.get("user_id"))
        only = _str(candidates[0].get("user_id")) if len(candidates) == 1 else None
        return cls(user_ids, only, latest)

    def user_id_for(self, wa_id: str | None) -> str | None:
        """The business-scoped user id from `contacts[]`, matched by wa_id (or the only
        contact, for an item without a wa_id)."""
        if wa_id is not None:
            return self.user_ids.get(wa_id)
        return self.only_user_id


def parse_payload(payload: Any, keywords: KeywordRules = DEFAULT_KEYWORDS,
                  now: datetime | None = None) -> ParsedPayload:
    """Turn one webhook body into events; never raises for content it does not understand.

    `now` (the receiver's clock) bounds event times from above: an item stamped more than
    `FUTURE_TOLERANCE` ahead of it is skipped. Without it the bound is `LATEST_WITHOUT_CLOCK`.
    """
    events: list[Event] = []
    locations: list[str] = []
    skipped: list[SkippedItem] = []
    ignored = 0
    latest = LATEST_WITHOUT_CLOCK if now is None else now + FUTURE_TOLERANCE
    if not isinstance(payload, Mapping) or not isinstance(payload.get("entry"), list):
        return ParsedPayload((), (SkippedItem("$", "not a webhook payload: no entry list"),))
    for e_index, entry in enumerate(payload["entry"]):
        changes = entry.get("changes") if isinstance(entry, Mapping) else None
        if not isinstance(changes, list):
            skipped.append(SkippedItem(f"entry[{e_index}]", "no changes list"))
            continue
        for c_index, change in enumerate(changes):
            where = f"entry[{e_index}].changes[{c_index}]"
            if not isinstance(change, Mapping) or not isinstance(change.get("value"), Mapping):
                skipped.append(SkippedItem(where, "change without a value object"))
                continue
            field = change.get("field")
            if field not in CONSENT_FIELDS:
                ignored += 1  # account, template and call updates carry no consent
                continue
            shared = _Change.of(change["value"], latest)
            for location, item in _items(change["value"], where):
                try:
                    event = _parse_item(location, item, shared, keywords)
                except _Skip as skip:
                    skipped.append(SkippedItem(location, str(skip)))
                    continue
                except (TypeError, ValueError, KeyError, AttributeError, OverflowError,
                        RecursionError) as exc:
                    skipped.append(SkippedItem(location, f"malformed item ({type(exc).__name__})"))
                    continue
                if event is not None:
                    events.append(event)
                    locations.append(location)
    return ParsedPayload(tuple(events), tuple(skipped), ignored, tuple(locations))


def _items(value: Mapping[str, Any], where: str) -> Iterator[tuple[str, Any]]:
    for key in ("messages", "statuses", "user_preferences", "user_id_update"):
        items = value.get(key)
        if items is None:
            continue
        if not isinstance(items, list):
            yield f"{where}.value.{key}", None
            continue
        for index, item in enumerate(items):
            yield f"{where}.value.{key}[{index}]", item


def _parse_item(location: str, item: Any, change: _Change,
                keywords: KeywordRules) -> Event | None:
    if not isinstance(item, Mapping):
        raise _Skip("item is not an object")
    section = location.rsplit(".", 1)[1].split("[", 1)[0]
    if section == "messages":
        return _storable(_message(item, change, keywords))
    if section == "statuses":
        return _storable(_status(item, change))
    if section == "user_id_update":
        return _storable(_user_id_update(item, change))
    return _storable(_preference(item, change))


def _unix(raw: Any) -> datetime:
    """Unix seconds (a string or a number) as aware UTC; raises for anything else."""
    if raw is None or isinstance(raw, bool):
        raise TypeError("not a time")
    return utc_from_unix(raw)


def _time(item: Mapping[str, Any], change: _Change) -> datetime:
    raw = item.get("timestamp")
    if raw is None or isinstance(raw, bool):
        raise _Skip("no timestamp")
    try:
        moment = _unix(raw)
    except (TypeError, ValueError, OverflowError, OSError):
        raise _Skip(f"timestamp is not Unix seconds: {_shown(raw)}") from None
    if moment < EARLIEST:  # WhatsApp did not exist; a zero or garbage stamp
        raise _Skip("timestamp before 2009")
    if moment > change.latest:
        raise _Skip(f"timestamp {moment:%Y-%m-%d %H:%M} UTC is later than "
                    f"{change.latest:%Y-%m-%d %H:%M} UTC (the future)")
    return moment


def _shown(raw: Any) -> str:
    """A short, printable rendering of a bad value for a skip reason (never a lone
    surrogate, which no log or terminal encoding can write)."""
    return ascii(str(raw)[:20])


def _str(value: Any) -> str | None:
    if value is None or isinstance(value, (Mapping, list)):
        return None
    text = str(value).replace("\x00", "").strip()
    return text or None


# The longest value of each stored text column, read from the `events` table itself (the
# one source of truth): a longer value is garbage, and its item is skipped here rather than
# failing the whole delivery in the store. The derived columns fit whenever these do
# (`phone_key` holds at most 16 characters, `uid_key` is `uid:` + a user id). The key is
# checked last: it is built from the other fields, and a skip should name the field at fault.
_EVENT_FIELDS = frozenset(f.name for f in fields(Event))
FIELD_LIMITS: dict[str, int] = {
    column.name: column.type.length
    for column in sorted(events_table.columns, key=lambda column: column.name == "key")
    if isinstance(column.type, String) and column.type.length and column.name in _EVENT_FIELDS
}


def _storable(event: Event) -> Event:
    """The event, if the store can hold every value of it; else the item is skipped.
    (Error codes are checked as the store writes them: one comma-separated text.)"""
    for name, limit in FIELD_LIMITS.items():
        value = (error_codes_text(event.error_codes) if name == "error_codes"
                 else getattr(event, name))
        if value is None:
            continue
        if len(value) > limit:
            raise _Skip(f"{name} longer than {limit} characters")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _Skip(f"{name} is not valid Unicode (a lone surrogate)") from None
    return event


def _message(item: Mapping[str, Any], change: _Change, keywords: KeywordRules) -> Event:
    message_id = _str(item.get("id"))
    if message_id is None:
        raise _Skip("message without an id")
    raw_type = _str(item.get("type")) or "unknown"
    if raw_type == "system":
        return _system_message(item, message_id, change)
    wa_id = _str(item.get("from"))
    user_id = _str(item.get("from_user_id")) or change.user_id_for(wa_id)
    if wa_id is None and user_id is None:
        raise _Skip("message without a sender (no from, no from_user_id)")
    occurred_at = _time(item, change)
    signal, keyword = _classify(item, raw_type, keywords)
    referral = item.get("referral")
    return Event(
        key=f"msg:{message_id}",
        kind=EventKind.MESSAGE,
        occurred_at=occurred_at,
        wa_id=wa_id,
        user_id=user_id,
        message_id=message_id,
        message_type=raw_type if raw_type in KNOWN_USER_MESSAGE_TYPES else f"other:{raw_type}",
        signal=signal,
        keyword=keyword,
        opens_session=True,
        referral_source_id=_str(referral.get("source_id")) if isinstance(referral, Mapping)
        else None,
    )


def _system_message(item: Mapping[str, Any], message_id: str, change: _Change) -> Event:
    """A `system` message: never a user message (no window); it may announce a changed
    number, a changed business-scoped user id, or a marketing preference.

    Meta documents `user_changed_number` with the old number in `from` and the new one in
    `system.wa_id` (`new_wa_id` before Graph API v12), and `user_changed_user_id` with the
    new id in `system.user_id` and the previous one in `system.previous_user_id` (since
    August 2026); either may come without a number. A `user_changed_user_id` whose `wa_id`
    differs from `from` is read as what it is, a number change: the documentation before
    August 2026 announced number changes under that type.
    """
    raw = item.get("system")
    system: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    kind = _str(system.get("type")) or "system"
    sender = _str(item.get("from"))
    announced = _str(system.get("wa_id")) or _str(system.get("new_wa_id"))
    new_user_id = _str(system.get("user_id"))
    sender_user_id = _str(item.get("from_user_id"))
    previous_user_id = _str(system.get("previous_user_id")) or (
        sender_user_id if sender_user_id != new_user_id else None)
    wa_id, user_id, new_wa_id, new_id = sender, sender_user_id, None, None
    signal, detail = Signal.NONE, kind
    if kind == "user_changed_number" or (kind == "user_changed_user_id" and announced
                                         and sender and announced != sender):
        signal, detail = Signal.NUMBER_CHANGED, "user_changed_number"
        user_id, new_wa_id, new_id = previous_user_id, announced, new_user_id
    elif kind == "user_changed_user_id" and new_user_id:
        signal = Signal.USER_ID_CHANGED
        wa_id, user_id, new_id = announced or sender, previous_user_id, new_user_id
    elif kind == "user_preference_changed":
        marketing = (_str(system.get("marketing")) or "").lower()
        signal = {"stop": Signal.OPT_OUT, "resume": Signal.RESUME}.get(marketing, Signal.NONE)
        detail = f"{kind}:{marketing}" if signal is not Signal.NONE else kind
    if not (wa_id or user_id or new_id):
        raise _Skip("system message without a sender (no from, no user id)")
    return Event(key=f"msg:{message_id}", kind=EventKind.MESSAGE, occurred_at=_time(item, change),
                 wa_id=wa_id, user_id=user_id, message_id=message_id, message_type="system",
                 signal=signal, new_wa_id=new_wa_id, new_user_id=new_id, detail=detail)


@dataclass(frozen=True, slots=True)
class _Reply:
    """What one user message could say about consent.

    `said` is what the user typed or the visible title / text of what they tapped; `chosen`
    is the button id or payload the business chose when it sent the message. Only `said`
    can opt in (unless a payload is declared in `whatsapp.opt_in_button_payloads`); both
    can opt out, because a missed STOP is the worse error.
    """

    said: tuple[str, ...] = ()
    chosen: tuple[str, ...] = ()


def _texts(*values: Any) -> tuple[str, ...]:
    return tuple(text for text in (_str(v) for v in values) if text)


def _reply(item: Mapping[str, Any], raw_type: str) -> _Reply:
    part = item.get(raw_type)
    if not isinstance(part, Mapping):
        return _Reply()
    if raw_type == "text":
        return _Reply(said=_texts(part.get("body")))
    if raw_type == "button":  # a template quick reply: `text` is its label, `payload` ours
        return _Reply(said=_texts(part.get("text")), chosen=_texts(part.get("payload")))
    if raw_type == "interactive":
        tapped = part.get("button_reply") or part.get("list_reply")
        if isinstance(tapped, Mapping):
            return _Reply(said=_texts(tapped.get("title")), chosen=_texts(tapped.get("id")))
    return _Reply()


def _classify(item: Mapping[str, Any], raw_type: str,
              keywords: KeywordRules) -> tuple[Signal, str | None]:
    """Opt-out wins over opt-in when one reply somehow carries both.

    Opt-outs are read generously (typed text, visible title, id, payload, any Stop
    promotions label); opt-ins only from what the user said, or from a payload the
    business declared as an opt-in (GDPR Art. 7(1): consent must be demonstrable, and a
    button id proves only what the business put there).
    """
    reply = _reply(item, raw_type)
    said = [normalize_text(t) for t in reply.said]
    everything = [*said, *(normalize_text(t) for t in reply.chosen)]
    for text in everything:
        if text in keywords.opt_out:
            return Signal.OPT_OUT, keywords.opt_out[text]
    if raw_type != "text" and any(text in keywords.stop_labels for text in everything):
        return Signal.OPT_OUT, "STOP_PROMOTIONS"
    for text in said:
        if text in keywords.opt_in:
            return Signal.OPT_IN, keywords.opt_in[text]
    for payload in reply.chosen:
        if payload in keywords.opt_in_payloads:
            return Signal.OPT_IN, payload
    return Signal.NONE, None


def _status(item: Mapping[str, Any], change: _Change) -> Event:
    message_id = _str(item.get("id"))
    status = _str(item.get("status"))
    if message_id is None or status is None:
        raise _Skip("status without id or status")
    if item.get("recipient_type") == "group":
        wa_id = _str(item.get("recipient_participant_id"))
        user_id = _str(item.get("recipient_participant_user_id"))
    else:
        wa_id = _str(item.get("recipient_id"))
        user_id = _str(item.get("recipient_user_id")) or change.user_id_for(wa_id)
    occurred_at = _time(item, change)
    codes = tuple(
        int(error["code"]) for error in item.get("errors") or ()
        if isinstance(error, Mapping) and str(error.get("code", "")).lstrip("-").isdigit()
    )
    signal = Signal.OPT_OUT if STOP_MARKETING_ERROR in codes else Signal.NONE
    return Event(
        key=f"status:{message_id}:{status}",
        kind=EventKind.STATUS,
        occurred_at=occurred_at,
        wa_id=wa_id,
        user_id=user_id,
        message_id=message_id,
        status=status,
        error_codes=codes,
        signal=signal,
        window_expires_at=_free_entry_expiry(item, occurred_at),
        detail=f"status:{status}:{STOP_MARKETING_ERROR}" if signal is Signal.OPT_OUT else None,
    )


def _free_entry_expiry(item: Mapping[str, Any], occurred_at: datetime) -> datetime | None:
    """The expiry of a free entry point window, when the status shows one and names a
    plausible end (not before 2009, at most `LONGEST_WINDOW` after the status)."""
    conversation = item.get("conversation")
    pricing = item.get("pricing")
    origin = None
    expiry = None
    if isinstance(conversation, Mapping):
        origin_obj = conversation.get("origin")
        origin = _str(origin_obj.get("type")) if isinstance(origin_obj, Mapping) else None
        expiry = conversation.get("expiration_timestamp")
    pricing_type = _str(pricing.get("type")) if isinstance(pricing, Mapping) else None
    pricing_category = _str(pricing.get("category")) if isinstance(pricing, Mapping) else None
    free = (origin in FREE_ENTRY_POINT_ORIGINS or pricing_type in FREE_ENTRY_POINT_PRICING
            or pricing_category in FREE_ENTRY_POINT_ORIGINS)
    if not free or expiry is None:
        return None
    try:
        moment = _unix(expiry)
    except (TypeError, ValueError, OverflowError, OSError):
        return None
    return moment if EARLIEST <= moment <= occurred_at + LONGEST_WINDOW else None


def _preference(item: Mapping[str, Any], change: _Change) -> Event:
    wa_id = _str(item.get("wa_id"))
    user_id = _str(item.get("user_id")) or change.user_id_for(wa_id)
    preference = (_str(item.get("value")) or "").lower()
    if wa_id is None and user_id is None:
        raise _Skip("preference without wa_id or user_id")
    if not preference:
        raise _Skip("preference without a value")
    occurred_at = _time(item, change)
    signal = {"stop": Signal.OPT_OUT, "resume": Signal.RESUME}.get(preference, Signal.NONE)
    return Event(
        key=f"pref:{wa_id or user_id}:{preference}:{int(occurred_at.timestamp())}",
        kind=EventKind.PREFERENCE,
        occurred_at=occurred_at,
        wa_id=wa_id,
        user_id=user_id,
        signal=signal,
        detail=f"user_preferences:{preference}",
    )


def _user_id_update(item: Mapping[str, Any], change: _Change) -> Event:
    """A `user_id_update` item, `user_id: {previous, current}` (Meta's documentation from
    May to August 2026; the same change now arrives as a `user_changed_user_id` system
    message, and both are read)."""
    ids = item.get("user_id")
    if not isinstance(ids, Mapping):
        raise _Skip("user_id_update without a user_id object")
    previous, current = _str(ids.get("previous")), _str(ids.get("current"))
    if current is None:
        raise _Skip("user_id_update without user_id.current")
    occurred_at = _time(item, change)
    wa_id = _str(item.get("wa_id"))
    return Event(
        key=f"uidupd:{previous or wa_id or '-'}:{current}:{int(occurred_at.timestamp())}",
        kind=EventKind.ID_CHANGE,
        occurred_at=occurred_at,
        wa_id=wa_id,
        user_id=previous,
        new_user_id=current,
        signal=Signal.USER_ID_CHANGED,
        detail="user_id_update",
    )

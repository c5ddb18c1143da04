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

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from waconsent.domain import (
    Event,
    EventKind,
    ParsedPayload,
    PlainStatus,
    Signal,
    SkippedItem,
    utc_from_unix,
)
from waconsent.keywords import DEFAULT_KEYWORDS, KeywordRules, Reply
from waconsent.store import events as event_store

STOP_MARKETING_ERROR = 131050
FREE_ENTRY_POINT_ORIGINS = frozenset({"referral_conversion"})
FREE_ENTRY_POINT_PRICING = frozenset({"free_entry_point"})
# The webhook fields that can carry consent or identity; account, template and call
# updates carry neither. `user_id_update` was documented by Meta until August 2026 (then
# replaced by the `user_changed_user_id` system message); deliveries of it are still read.
CONSENT_FIELDS = frozenset({"messages", "user_preferences", "user_id_update"})
KNOWN_USER_MESSAGE_TYPES = frozenset({
    "text", "button", "interactive", "image", "video", "audio", "document", "sticker",
    "location", "contacts", "reaction", "order", "system", "unsupported", "request_welcome",
    "revoke", "edit", "unknown",
})


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
    plain: list[PlainStatus] = []
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
            for section, location, item in _items(change["value"], where):
                try:
                    if section == "statuses" and (status := _plain(item, shared)) is not None:
                        plain.append(status)
                        continue
                    event = _parse_item(section, item, shared, keywords)
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
    return ParsedPayload(tuple(events), tuple(skipped), ignored, tuple(locations), tuple(plain))


def _items(value: Mapping[str, Any], where: str) -> Iterator[tuple[str, str, Any]]:
    """(section, location, item) for every item of a change's value."""
    for key in ("messages", "statuses", "user_preferences", "user_id_update"):
        items = value.get(key)
        if items is None:
            continue
        if not isinstance(items, list):
            yield key, f"{where}.value.{key}", None
            continue
        for index, item in enumerate(items):
            yield key, f"{where}.value.{key}[{index}]", item


_PLAIN_STATES = frozenset({"sent", "delivered", "read"})


def _plain(item: Any, change: _Change) -> PlainStatus | None:
    """A status of the business's own message that carries nothing the rules can use:
    read no further (a campaign brings three per recipient). None for anything else (an
    error, a free entry point window, a reply's callback data, a group, a malformed
    item), which the full parse takes. Never raises, whatever the item holds."""
    if (type(item) is not dict or _text(item.get("status")) not in _PLAIN_STATES
            or type(item.get("id")) is not str or "errors" in item
            or "biz_opaque_callback_data" in item or item.get("recipient_type") == "group"):
        return None
    conversation, pricing = item.get("conversation"), item.get("pricing")
    if conversation is not None:
        origin = conversation.get("origin") if type(conversation) is dict else None
        if type(origin) is not dict or _text(origin.get("type")) in FREE_ENTRY_POINT_ORIGINS:
            return None
    if pricing is not None and (type(pricing) is not dict
                                or _text(pricing.get("type")) in FREE_ENTRY_POINT_PRICING
                                or _text(pricing.get("category")) in FREE_ENTRY_POINT_ORIGINS):
        return None
    wa_id = _str(item.get("recipient_id"))
    return PlainStatus(item["id"], wa_id,
                       _str(item.get("recipient_user_id")) or change.user_id_for(wa_id))


def _text(value: Any) -> str | None:
    return value if type(value) is str else None


def _parse_item(section: str, item: Any, change: _Change,
                keywords: KeywordRules) -> Event | None:
    if not isinstance(item, Mapping):
        raise _Skip("item is not an object")
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
    """A value as text, stripped, without NUL bytes; None for nothing, an object or a list.
    (Decoded JSON holds only dicts and lists: checking those concrete types, not the
    Mapping ABC, matters in a 1,000-status delivery.)"""
    if value is None or isinstance(value, dict | list):
        return None
    text = (value if type(value) is str else str(value)).strip()
    if "\x00" in text:
        text = text.replace("\x00", "").strip()
    return text or None


def _storable(event: Event) -> Event:
    """The event, if the store can hold every value of it; else the item is skipped."""
    problem = event_store.unstorable(event)
    if problem is not None:
        raise _Skip(problem)
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
    signal, keyword = keywords.classify(_reply(item, raw_type))
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


def _texts(*values: Any) -> tuple[str, ...]:
    return tuple(text for text in (_str(v) for v in values) if text)


def _reply(item: Mapping[str, Any], raw_type: str) -> Reply:
    """What the user typed or tapped, and what the business chose, as Meta sends each."""
    part = item.get(raw_type)
    if not isinstance(part, Mapping):
        return Reply()
    if raw_type == "text":
        return Reply(said=_texts(part.get("body")))
    if raw_type == "button":  # a template quick reply: `text` is its label, `payload` ours
        return Reply(said=_texts(part.get("text")), chosen=_texts(part.get("payload")),
                     tapped=True)
    if raw_type == "interactive":
        tapped = part.get("button_reply") or part.get("list_reply")
        if isinstance(tapped, Mapping):
            return Reply(said=_texts(tapped.get("title")), chosen=_texts(tapped.get("id")),
                         tapped=True)
    return Reply()


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
    errors = item.get("errors")
    codes = tuple(
        int(error["code"]) for error in errors
        if isinstance(error, dict) and str(error.get("code", "")).lstrip("-").isdigit()
    ) if errors else ()
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
    if isinstance(conversation, dict):
        origin_obj = conversation.get("origin")
        origin = _str(origin_obj.get("type")) if isinstance(origin_obj, dict) else None
        expiry = conversation.get("expiration_timestamp")
    pricing_type = _str(pricing.get("type")) if isinstance(pricing, dict) else None
    pricing_category = _str(pricing.get("category")) if isinstance(pricing, dict) else None
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

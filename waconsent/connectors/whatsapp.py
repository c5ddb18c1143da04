"""WhatsApp Cloud API webhook payloads: parsing into typed events (the signature is checked
in `webhook_signature`, before anything here runs).

Statuses are read in `whatsapp_status`, the helpers every item shares in `whatsapp_items`;
the parser reads every `entry[]`, every `changes[]` and every item (a POST may
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
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from waconsent.connectors import whatsapp_status as statuses
from waconsent.connectors.whatsapp_items import (
    FUTURE_TOLERANCE,
    LATEST_WITHOUT_CLOCK,
    Change,
    Skip,
    text_of,
    time_of,
)
from waconsent.domain import Event, EventKind, ParsedPayload, PlainStatus, Signal, SkippedItem
from waconsent.keywords import DEFAULT_KEYWORDS, KeywordRules, Reply
from waconsent.store import events as event_store

# The webhook fields that can carry consent or identity; account, template and call
# updates carry neither. `user_id_update` was documented by Meta until August 2026 (then
# replaced by the `user_changed_user_id` system message); deliveries of it are still read.
CONSENT_FIELDS = frozenset({"messages", "user_preferences", "user_id_update"})
KNOWN_USER_MESSAGE_TYPES = frozenset(
    {
        "text",
        "button",
        "interactive",
        "image",
        "video",
        "audio",
        "document",
        "sticker",
        "location",
        "contacts",
        "reaction",
        "order",
        "system",
        "unsupported",
        "request_welcome",
        "revoke",
        "edit",
        "unknown",
    }
)


# A marketing preference (system message or `user_preferences`) as a consent signal.
_MARKETING_SIGNALS = {"stop": Signal.OPT_OUT, "resume": Signal.RESUME}
MALFORMED = (TypeError, ValueError, KeyError, AttributeError, OverflowError, RecursionError)


@dataclass
class _Found:
    """What one payload yields, gathered item by item."""

    events: list[Event] = field(default_factory=list)
    locations: list[str] = field(default_factory=list)
    plain: list[PlainStatus] = field(default_factory=list)
    skipped: list[SkippedItem] = field(default_factory=list)
    ignored: int = 0

    def parsed(self) -> ParsedPayload:
        return ParsedPayload(
            tuple(self.events),
            tuple(self.skipped),
            self.ignored,
            tuple(self.locations),
            tuple(self.plain),
        )


def parse_payload(
    payload: Any, keywords: KeywordRules = DEFAULT_KEYWORDS, now: datetime | None = None
) -> ParsedPayload:
    """Turn one webhook body into events; never raises for content it does not understand.

    `now` (the receiver's clock) bounds event times from above: an item stamped more than
    `FUTURE_TOLERANCE` ahead of it is skipped. Without it the bound is `LATEST_WITHOUT_CLOCK`.
    """
    latest = LATEST_WITHOUT_CLOCK if now is None else now + FUTURE_TOLERANCE
    if not isinstance(payload, Mapping) or not isinstance(payload.get("entry"), list):
        return ParsedPayload((), (SkippedItem("$", "not a webhook payload: no entry list"),))
    found = _Found()
    for where, value in _consent_changes(payload["entry"], found):
        shared = Change.of(value, latest)
        for section, location, item in _items(value, where):
            _read_item(found, section, location, item, shared, keywords)
    return found.parsed()


def _consent_changes(entries: list[Any], found: _Found) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(location, value) of every change that can carry consent; the others are counted or
    skipped with their location."""
    for e_index, entry in enumerate(entries):
        changes = entry.get("changes") if isinstance(entry, Mapping) else None
        if not isinstance(changes, list):
            found.skipped.append(SkippedItem(f"entry[{e_index}]", "no changes list"))
            continue
        for c_index, change in enumerate(changes):
            where = f"entry[{e_index}].changes[{c_index}]"
            if not isinstance(change, Mapping) or not isinstance(change.get("value"), Mapping):
                found.skipped.append(SkippedItem(where, "change without a value object"))
            elif change.get("field") not in CONSENT_FIELDS:
                found.ignored += 1  # account, template and call updates carry no consent
            else:
                yield where, change["value"]


def _read_item(
    found: _Found, section: str, location: str, item: Any, shared: Change, keywords: KeywordRules
) -> None:
    """One item into `found`: a plain status, an event, nothing, or a skip with its location."""
    try:
        plain = statuses.plain(item, shared) if section == "statuses" else None
        if plain is not None:
            found.plain.append(plain)
            return
        event = _parse_item(section, item, shared, keywords)
    except Skip as skip:
        found.skipped.append(SkippedItem(location, str(skip)))
        return
    except MALFORMED as exc:
        found.skipped.append(SkippedItem(location, f"malformed item ({type(exc).__name__})"))
        return
    if event is not None:
        found.events.append(event)
        found.locations.append(location)


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


def _parse_item(section: str, item: Any, change: Change, keywords: KeywordRules) -> Event | None:
    if not isinstance(item, Mapping):
        raise Skip("item is not an object")
    if section == "messages":
        return _storable(_message(item, change, keywords))
    if section == "statuses":
        return _storable(statuses.status(item, change))
    if section == "user_id_update":
        return _storable(_user_id_update(item, change))
    return _storable(_preference(item, change))


def _storable(event: Event) -> Event:
    """The event, if the store can hold every value of it; else the item is skipped."""
    problem = event_store.unstorable(event)
    if problem is not None:
        raise Skip(problem)
    return event


def _message(item: Mapping[str, Any], change: Change, keywords: KeywordRules) -> Event:
    message_id = text_of(item.get("id"))
    if message_id is None:
        raise Skip("message without an id")
    raw_type = text_of(item.get("type")) or "unknown"
    if raw_type == "system":
        return _system_message(item, message_id, change)
    wa_id, user_id = change.ids_of(item, "from", "from_user_id")
    if wa_id is None and user_id is None:
        raise Skip("message without a sender (no from, no from_user_id)")
    occurred_at = time_of(item, change)
    reply = _reply(item, raw_type)
    signal, keyword = keywords.classify(reply)
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
        referral_source_id=text_of(referral.get("source_id"))
        if isinstance(referral, Mapping)
        else None,
        optin_token=keywords.optin_token(reply) if signal is Signal.OPT_IN else None,
    )


def _system_message(item: Mapping[str, Any], message_id: str, change: Change) -> Event:
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
    kind = text_of(system.get("type")) or "system"
    sender = text_of(item.get("from"))
    announced = text_of(system.get("wa_id")) or text_of(system.get("new_wa_id"))
    new_user_id = text_of(system.get("user_id"))
    sender_user_id = text_of(item.get("from_user_id"))
    previous_user_id = text_of(system.get("previous_user_id")) or (
        sender_user_id if sender_user_id != new_user_id else None
    )
    wa_id, user_id, new_wa_id, new_id = sender, sender_user_id, None, None
    signal, detail = Signal.NONE, kind
    if kind == "user_changed_number" or (
        kind == "user_changed_user_id" and announced and sender and announced != sender
    ):
        signal, detail = Signal.NUMBER_CHANGED, "user_changed_number"
        user_id, new_wa_id, new_id = previous_user_id, announced, new_user_id
    elif kind == "user_changed_user_id" and new_user_id:
        signal = Signal.USER_ID_CHANGED
        wa_id, user_id, new_id = announced or sender, previous_user_id, new_user_id
    elif kind == "user_preference_changed":
        marketing = (text_of(system.get("marketing")) or "").lower()
        signal = _MARKETING_SIGNALS.get(marketing, Signal.NONE)
        detail = f"{kind}:{marketing}" if signal is not Signal.NONE else kind
    if not (wa_id or user_id or new_id):
        raise Skip("system message without a sender (no from, no user id)")
    return Event(
        key=f"msg:{message_id}",
        kind=EventKind.MESSAGE,
        occurred_at=time_of(item, change),
        wa_id=wa_id,
        user_id=user_id,
        message_id=message_id,
        message_type="system",
        signal=signal,
        new_wa_id=new_wa_id,
        new_user_id=new_id,
        detail=detail,
    )


def _texts(*values: Any) -> tuple[str, ...]:
    return tuple(text for text in (text_of(v) for v in values) if text)


def _reply(item: Mapping[str, Any], raw_type: str) -> Reply:
    """What the user typed or tapped, and what the business chose, as Meta sends each."""
    part = item.get(raw_type)
    if not isinstance(part, Mapping):
        return Reply()
    if raw_type == "text":
        return Reply(said=_texts(part.get("body")))
    if raw_type == "button":  # a template quick reply: `text` is its label, `payload` ours
        return Reply(said=_texts(part.get("text")), chosen=_texts(part.get("payload")), tapped=True)
    if raw_type == "interactive":
        tapped = part.get("button_reply") or part.get("list_reply")
        if isinstance(tapped, Mapping):
            return Reply(
                said=_texts(tapped.get("title")), chosen=_texts(tapped.get("id")), tapped=True
            )
    return Reply()


def _preference(item: Mapping[str, Any], change: Change) -> Event:
    wa_id, user_id = change.ids_of(item, "wa_id", "user_id")
    preference = (text_of(item.get("value")) or "").lower()
    if wa_id is None and user_id is None:
        raise Skip("preference without wa_id or user_id")
    if not preference:
        raise Skip("preference without a value")
    occurred_at = time_of(item, change)
    signal = _MARKETING_SIGNALS.get(preference, Signal.NONE)
    return Event(
        key=f"pref:{wa_id or user_id}:{preference}:{int(occurred_at.timestamp())}",
        kind=EventKind.PREFERENCE,
        occurred_at=occurred_at,
        wa_id=wa_id,
        user_id=user_id,
        signal=signal,
        detail=f"user_preferences:{preference}",
    )


def _user_id_update(item: Mapping[str, Any], change: Change) -> Event:
    """A `user_id_update` item, `user_id: {previous, current}` (Meta's documentation from
    May to August 2026; the same change now arrives as a `user_changed_user_id` system
    message, and both are read)."""
    ids = item.get("user_id")
    if not isinstance(ids, Mapping):
        raise Skip("user_id_update without a user_id object")
    previous, current = text_of(ids.get("previous")), text_of(ids.get("current"))
    if current is None:
        raise Skip("user_id_update without user_id.current")
    occurred_at = time_of(item, change)
    wa_id = text_of(item.get("wa_id"))
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

"""What every item of a WhatsApp webhook change shares: reading values, times, the
change's `contacts[]`, and the skip that names why an item could not be understood."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from waconsent.domain import utc_from_unix


class Skip(Exception):
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
class Change:
    """What every item of one change shares: its `contacts[]`, indexed once (a message
    looks its sender up by wa_id; scanning the list per item was quadratic), and the
    latest acceptable time."""

    user_ids: Mapping[str, str | None]  # wa_id -> user id; the first contact listed wins
    only_user_id: str | None  # the user id of the single contact, when there is exactly one
    latest: datetime

    @classmethod
    def of(cls, value: Mapping[str, Any], latest: datetime) -> Change:
        contacts = value.get("contacts")
        candidates = (
            [c for c in contacts if isinstance(c, Mapping)] if isinstance(contacts, list) else []
        )
        user_ids: dict[str, str | None] = {}
        for contact in candidates:
            wa_id = text_of(contact.get("wa_id"))
            if wa_id is not None and wa_id not in user_ids:
                user_ids[wa_id] = text_of(contact.get("user_id"))
        only = text_of(candidates[0].get("user_id")) if len(candidates) == 1 else None
        return cls(user_ids, only, latest)

    def user_id_for(self, wa_id: str | None) -> str | None:
        """The business-scoped user id from `contacts[]`, matched by wa_id (or the only
        contact, for an item without a wa_id)."""
        if wa_id is not None:
            return self.user_ids.get(wa_id)
        return self.only_user_id

    def ids_of(
        self, item: Mapping[str, Any], wa_id_field: str, user_id_field: str
    ) -> tuple[str | None, str | None]:
        """(wa_id, user id) of the person an item names in these two fields. Meta may leave
        the user id out of the item and give it in `contacts[]` only, so it is looked up
        there by wa_id when the item has none: every kind of item is read the same way."""
        wa_id = text_of(item.get(wa_id_field))
        return wa_id, text_of(item.get(user_id_field)) or self.user_id_for(wa_id)


def unix(raw: Any) -> datetime:
    """Unix seconds (a string or a number) as aware UTC; raises for anything else."""
    if raw is None or isinstance(raw, bool):
        raise TypeError("not a time")
    return utc_from_unix(raw)


def time_of(item: Mapping[str, Any], change: Change) -> datetime:
    raw = item.get("timestamp")
    if raw is None or isinstance(raw, bool):
        raise Skip("no timestamp")
    try:
        moment = unix(raw)
    except (TypeError, ValueError, OverflowError, OSError):
        raise Skip(f"timestamp is not Unix seconds: {shown(raw)}") from None
    if moment < EARLIEST:  # WhatsApp did not exist; a zero or garbage stamp
        raise Skip("timestamp before 2009")
    if moment > change.latest:
        raise Skip(
            f"timestamp {moment:%Y-%m-%d %H:%M} UTC is later than "
            f"{change.latest:%Y-%m-%d %H:%M} UTC (the future)"
        )
    return moment


def shown(raw: Any) -> str:
    """A short, printable rendering of a bad value for a skip reason (never a lone
    surrogate, which no log or terminal encoding can write)."""
    return ascii(str(raw)[:20])


def text_of(value: Any) -> str | None:
    """A value as text, stripped, without NUL bytes; None for nothing, an object or a list.
    (Decoded JSON holds only dicts and lists: checking those concrete types, not the
    Mapping ABC, matters in a 1,000-status delivery.)"""
    if value is None or isinstance(value, dict | list):
        return None
    text = (value if type(value) is str else str(value)).strip()
    if "\x00" in text:
        text = text.replace("\x00", "").strip()
    return text or None


def exact_text(value: Any) -> str | None:
    """The value if it is a string (for comparing with a set of known words: an unhashable
    value must not raise), else None."""
    return value if type(value) is str else None

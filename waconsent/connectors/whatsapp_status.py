"""Statuses of the business's own messages: the plain ones (sent, delivered, read) are
read no further than their ids, the others (a failure, a free entry point window, a
reply's callback data) become events."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from waconsent.connectors.whatsapp_items import (
    EARLIEST,
    LONGEST_WINDOW,
    Change,
    Skip,
    exact_text,
    text_of,
    time_of,
    unix,
)
from waconsent.domain import Event, EventKind, PlainStatus, Signal

STOP_MARKETING_ERROR = 131050
FREE_ENTRY_POINT_ORIGINS = frozenset({"referral_conversion"})
FREE_ENTRY_POINT_PRICING = frozenset({"free_entry_point"})


PLAIN_STATES = frozenset({"sent", "delivered", "read"})


def plain(item: Any, change: Change) -> PlainStatus | None:
    """A status of the business's own message that carries nothing the rules can use:
    read no further (a campaign brings three per recipient). None for anything else (an
    error, a free entry point window, a reply's callback data, a group, a malformed
    item), which the full parse takes. Never raises, whatever the item holds."""
    if (
        type(item) is not dict
        or exact_text(item.get("status")) not in PLAIN_STATES
        or type(item.get("id")) is not str
        or "errors" in item
        or "biz_opaque_callback_data" in item
        or item.get("recipient_type") == "group"
    ):
        return None
    conversation, pricing = item.get("conversation"), item.get("pricing")
    origin = pricing_type = category = None
    if conversation is not None:
        origin_obj = conversation.get("origin") if type(conversation) is dict else None
        if type(origin_obj) is not dict:
            return None
        origin = exact_text(origin_obj.get("type"))
    if pricing is not None:
        if type(pricing) is not dict:
            return None
        pricing_type, category = (
            exact_text(pricing.get("type")),
            exact_text(pricing.get("category")),
        )
    if _is_free_entry_point(origin, pricing_type, category):
        return None
    return PlainStatus(item["id"], *change.ids_of(item, "recipient_id", "recipient_user_id"))


def status(item: Mapping[str, Any], change: Change) -> Event:
    message_id = text_of(item.get("id"))
    status = text_of(item.get("status"))
    if message_id is None or status is None:
        raise Skip("status without id or status")
    if item.get("recipient_type") == "group":
        wa_id = text_of(item.get("recipient_participant_id"))
        user_id = text_of(item.get("recipient_participant_user_id"))
    else:
        wa_id, user_id = change.ids_of(item, "recipient_id", "recipient_user_id")
    occurred_at = time_of(item, change)
    errors = item.get("errors")
    codes = (
        tuple(
            int(error["code"])
            for error in errors
            if isinstance(error, dict) and str(error.get("code", "")).lstrip("-").isdigit()
        )
        if errors
        else ()
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
        window_expires_at=free_entry_expiry(item, occurred_at),
        detail=f"status:{status}:{STOP_MARKETING_ERROR}" if signal is Signal.OPT_OUT else None,
        callback_data=text_of(item.get("biz_opaque_callback_data")),  # a reply's, issue 14
    )


def _is_free_entry_point(
    origin: str | None, pricing_type: str | None, pricing_category: str | None
) -> bool:
    """Whether a status shows a free entry point window. Meta has named it in the
    conversation's origin, in the pricing type, and (with the origin's word) in the pricing
    category; any one is enough. `plain` and the full parse ask the same question, so a
    new word for the window is added here once."""
    return (
        origin in FREE_ENTRY_POINT_ORIGINS
        or pricing_type in FREE_ENTRY_POINT_PRICING
        or pricing_category in FREE_ENTRY_POINT_ORIGINS
    )


def free_entry_expiry(item: Mapping[str, Any], occurred_at: datetime) -> datetime | None:
    """The expiry of a free entry point window, when the status shows one and names a
    plausible end (not before 2009, at most `LONGEST_WINDOW` after the status)."""
    conversation = item.get("conversation")
    pricing = item.get("pricing")
    origin = None
    expiry = None
    if isinstance(conversation, dict):
        origin_obj = conversation.get("origin")
        origin = text_of(origin_obj.get("type")) if isinstance(origin_obj, dict) else None
        expiry = conversation.get("expiration_timestamp")
    pricing_type = text_of(pricing.get("type")) if isinstance(pricing, dict) else None
    pricing_category = text_of(pricing.get("category")) if isinstance(pricing, dict) else None
    if not _is_free_entry_point(origin, pricing_type, pricing_category) or expiry is None:
        return None
    try:
        moment = unix(expiry)
    except (TypeError, ValueError, OverflowError, OSError):
        return None
    return moment if EARLIEST <= moment <= occurred_at + LONGEST_WINDOW else None

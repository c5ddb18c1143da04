"""Builders for the project's own webhook payloads, shaped as Meta documents them."""

from __future__ import annotations

from datetime import datetime
from itertools import count
from typing import Any

METADATA = {"display_phone_number": "4930123456", "phone_number_id": "100200300"}
_ids = count(1)


def unix(moment: datetime) -> str:
    return str(int(moment.timestamp()))


def new_id() -> str:
    return f"wamid.TEST{next(_ids):06d}"


def message(
    wa_id: str,
    at: datetime,
    body: str | None = "hello",
    *,
    type_: str = "text",
    message_id: str | None = None,
    user_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "from": wa_id,
        "id": message_id or new_id(),
        "timestamp": unix(at),
        "type": type_,
    }
    if type_ == "text":
        item["text"] = {"body": body}
    if user_id:
        item["from_user_id"] = user_id
    item.update(extra)
    contact: dict[str, Any] = {"profile": {"name": "Test"}, "wa_id": wa_id}
    if user_id:
        contact["user_id"] = user_id
    return {
        "field": "messages",
        "value": {
            "messaging_product": "whatsapp",
            "metadata": METADATA,
            "contacts": [contact],
            "messages": [item],
        },
    }


def button(wa_id: str, at: datetime, payload: str, text: str | None = None) -> dict[str, Any]:
    return message(
        wa_id, at, None, type_="button", button={"payload": payload, "text": text or payload}
    )


def status(
    wa_id: str,
    at: datetime,
    state: str = "sent",
    *,
    codes: tuple[int, ...] = (),
    message_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": message_id or new_id(),
        "status": state,
        "timestamp": unix(at),
        "recipient_id": wa_id,
    }
    if codes:
        item["errors"] = [
            {"code": c, "title": "error", "message": "error", "error_data": {"details": "error"}}
            for c in codes
        ]
    item.update(extra)
    return {
        "field": "messages",
        "value": {"messaging_product": "whatsapp", "metadata": METADATA, "statuses": [item]},
    }


def preference(wa_id: str, at: datetime, value: str) -> dict[str, Any]:
    return {
        "field": "user_preferences",
        "value": {
            "messaging_product": "whatsapp",
            "metadata": METADATA,
            "contacts": [{"wa_id": wa_id}],
            "user_preferences": [
                {
                    "wa_id": wa_id,
                    "detail": f"User requested to {value} marketing",
                    "category": "marketing_messages",
                    "value": value,
                    "timestamp": int(at.timestamp()),
                }
            ],
        },
    }


def system(sender: str | None, at: datetime, **system_fields: Any) -> dict[str, Any]:
    """A `system` message as Meta documents it: no contacts array; `from` may be absent."""
    item: dict[str, Any] = {
        "id": new_id(),
        "timestamp": unix(at),
        "type": "system",
        "system": {"body": "User A changed", **system_fields},
    }
    if sender is not None:
        item["from"] = sender
    return {
        "field": "messages",
        "value": {"messaging_product": "whatsapp", "metadata": METADATA, "messages": [item]},
    }


def user_id_update(
    wa_id: str | None, at: datetime, previous: str | None, current: str
) -> dict[str, Any]:
    """The `user_id_update` field as Meta documented it from May to August 2026."""
    item: dict[str, Any] = {
        "detail": "User id for User A has been updated.",
        "user_id": {"previous": previous, "current": current},
        "timestamp": unix(at),
    }
    contact: dict[str, Any] = {"profile": {"name": "User A"}}
    if wa_id is not None:
        item["wa_id"] = contact["wa_id"] = wa_id
    return {
        "field": "user_id_update",
        "value": {
            "messaging_product": "whatsapp",
            "metadata": METADATA,
            "contacts": [contact],
            "user_id_update": [item],
        },
    }


def user_preference(user_id: str, at: datetime, value: str) -> dict[str, Any]:
    """A `user_preferences` item that names the user only by business-scoped user id."""
    return {
        "field": "user_preferences",
        "value": {
            "messaging_product": "whatsapp",
            "metadata": METADATA,
            "contacts": [{"user_id": user_id, "profile": {"name": "User A"}}],
            "user_preferences": [
                {
                    "user_id": user_id,
                    "category": "marketing_messages",
                    "detail": f"User requested to {value} marketing",
                    "value": value,
                    "timestamp": int(at.timestamp()),
                }
            ],
        },
    }


def payload(*changes: dict[str, Any], entries: int = 1) -> dict[str, Any]:
    """Spread the changes over `entries` entries, as Meta may batch them."""
    buckets: list[list[dict[str, Any]]] = [[] for _ in range(entries)]
    for index, change in enumerate(changes):
        buckets[index % entries].append(change)
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": f"WABA{i}", "changes": bucket} for i, bucket in enumerate(buckets)],
    }

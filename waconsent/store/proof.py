"""What `waconsent proof` shows: every event and confirmed write held for a number, and
(issue 14) each confirmation reply under the message it answered."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from waconsent.domain import jsonable
from waconsent.phones import mask
from waconsent.store import events as event_store
from waconsent.store import evidence as evidence_store
from waconsent.store import identity, phone_index
from waconsent.store import optin as optin_store
from waconsent.store import replies as reply_store


def person_keys(connection: Connection, keys: list[str]) -> list[str]:
    """Every key that names the person behind `keys`: the user ids their numbers were seen
    with, the user ids the CRM holds for the records carrying them, and every id those
    were announced to have changed to or from."""
    holders = sorted(phone_index.records_with_keys(connection, keys))
    held_ids = phone_index.user_id_keys_of(connection, holders)
    return sorted(identity.expand(connection, {*keys, *held_ids}))


def evidence_for(connection: Connection, keys: list[str]) -> list[dict[str, Any]]:
    """WhatsApp events of the person behind the keys (under any linked key, so the STOP
    that revoked a record is there whichever identifier it came with), and the confirmed
    CRM writes of the records carrying any of those keys."""
    entries: list[tuple[datetime, int, dict[str, Any]]] = []
    keys = person_keys(connection, keys)
    rows = event_store.for_proof(connection, keys)
    for row in rows:
        detail = row.keyword or row.detail or row.status or row.message_type or ""
        if row.new_user_id or row.new_wa_id:
            detail = f"{detail} -> {row.new_user_id or mask(row.new_wa_id)}"
        if row.error_codes:
            detail = f"{detail} (error {row.error_codes})"
        entries.append(
            (
                row.occurred_at,
                0,
                {
                    "at": jsonable(row.occurred_at),
                    "what": f"whatsapp {row.kind}: {row.signal}",
                    "detail": detail,
                    "id": row.message_id or row.key,
                    "source": row.source,
                },
            )
        )
    record_ids = sorted(phone_index.records_with_keys(connection, keys))
    for row in evidence_store.for_keys(connection, keys, record_ids):
        if row.kind == optin_store.EVIDENCE_KIND:  # issue 15: the request beside its message
            entries.append(_optin_entry(json.loads(row.body)))
            continue
        if row.kind != "write":
            continue  # consent events are listed above, from the events table
        body = json.loads(row.body)
        changes = ", ".join(f"{c['field']}={c['new']}" for c in body.get("changes", []))
        entries.append(
            (
                row.created_at,
                1,
                {
                    "at": jsonable(row.created_at),
                    "what": "CRM write confirmed",
                    "detail": changes,
                    "id": row.record_id,
                    "source": body.get("crm"),
                },
            )
        )
    entries.sort(key=lambda e: (e[0], e[1]))
    shown = [entry for _, _, entry in entries]
    # issue 14: each confirmation reply under the message it answered, with its statuses
    return reply_store.under_triggers(shown, reply_store.for_keys(connection, keys))


OPTIN_OUTCOMES = {
    "confirmed": "website opt-in request, confirmed by the message",
    "phone_mismatch": "website opt-in request, confirmed from a number other than the one "
    "typed in the form (the sender's own message stands)",
    "unknown": "website opt-in token unknown: a plain keyword opt-in (no IP)",
    "used": "website opt-in token already used: a plain keyword opt-in (no IP)",
    "expired": "website opt-in token expired: a plain keyword opt-in (no IP)",
}
_REQUEST_FIELDS = (
    "request_id",
    "requested_at",
    "expires_at",
    "client_ip",
    "user_agent",
    "page",
    "form_id",
    "business",
    "wording",
    "wording_sha256",
    "typed_phone_matches",
    "token_ref",
)


def _optin_entry(body: dict[str, Any]) -> tuple[datetime, int, dict[str, Any]]:
    """Issue 15: one outcome of a `<keyword> <token>` message, at the request's time (just
    before the message it joins), with what the form recorded."""
    outcome = str(body.get("outcome"))
    at = datetime.fromisoformat(
        str(body.get("requested_at") or body["occurred_at"]).replace("Z", "+00:00")
    )
    parts = [
        f"{name} {body[name]}"
        for name in ("client_ip", "page", "form_id", "user_agent")
        if body.get(name)
    ]
    if body.get("wording_sha256"):
        parts.append(f"wording sha256 {body['wording_sha256']}")
    return (
        at,
        0,
        {
            "at": jsonable(at),
            "what": OPTIN_OUTCOMES.get(outcome, outcome),
            "detail": ", ".join(parts) or f"token {body.get('token_ref')}",
            "id": body.get("message_id"),
            "source": "optin",
            "request": {name: body.get(name) for name in _REQUEST_FIELDS},
        },
    )

"""Website opt-in requests (issue 15): recorded by the form, confirmed by a chat message.

A request holds what the form knew (time, client IP, user agent, page, form id, the exact
wording shown and its SHA-256, the business) and the SHA-256 of its one-time token; the
token itself leaves only in the answer to the form. `confirm` runs inside the ingest's
transaction: an opt-in message carrying a token is joined to its request once, within the
TTL, and the event gains the form's IP and `form:<form id>:token:<hash prefix>`, which the
rules turn into `opt_in_ip` and `opt_in_source`. Every outcome (confirmed, confirmed from a
number other than the one typed, unknown, already used, expired) appends an evidence row of
kind "optin" that joins request and message, so `proof` shows it and the chain guards it.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Connection, delete, select, update

from waconsent.domain import Event, Signal
from waconsent.phones import wa_id_key
from waconsent.store import evidence as evidence_store
from waconsent.store.engine import among
from waconsent.store.tables import events, optin_requests

TOKEN_BYTES = 20  # 160 random bits, 32 base32 characters: letters and digits only
TOKEN_REF_LENGTH = 16  # hex characters of the token's hash that name it in opt_in_source
#: unconfirmed requests are kept this long after they expired (issue 15: data minimisation)
KEEP_UNCONFIRMED = timedelta(days=30)
Outcome = Literal["confirmed", "phone_mismatch", "unknown", "used", "expired"]
EVIDENCE_KIND = "optin"


def new_token() -> str:
    """A one-time token: 160 bits from `secrets`, lower-case base32 without padding."""
    return base64.b32encode(secrets.token_bytes(TOKEN_BYTES)).decode().rstrip("=").lower()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.strip().lower().encode()).hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class NewRequest:
    created_at: datetime
    expires_at: datetime
    client_ip: str | None
    user_agent: str | None
    page: str | None
    form_id: str
    wording: str
    business: str
    phone_key: str | None = None


def record(connection: Connection, request: NewRequest, token: str) -> int:
    """Store a request under the token's hash; returns its id."""
    values = dataclasses.asdict(request)
    values.update(token_hash=token_hash(token), wording_sha256=sha256_text(request.wording))
    result = connection.execute(
        optin_requests.insert().values(**values).returning(optin_requests.c.id)
    )
    return int(result.scalar_one())


def is_open(connection: Connection, token: str, now: datetime) -> bool:
    """Whether the token names a request not yet confirmed and not expired (for its QR)."""
    row = connection.execute(
        select(optin_requests.c.expires_at, optin_requests.c.confirmed_at).where(
            optin_requests.c.token_hash == token_hash(token)
        )
    ).first()
    return row is not None and row.confirmed_at is None and row.expires_at >= now


@dataclass(frozen=True, slots=True)
class Confirmation:
    """What became of one `<keyword> <token>` message (for the log and the evidence)."""

    outcome: Outcome
    event_key: str
    wa_id: str | None


def confirm(
    connection: Connection, batch: Sequence[Event], now: datetime
) -> tuple[list[Event], list[Confirmation]]:
    """Join each new opt-in message carrying a token to its request, in the caller's
    transaction; returns the batch (confirming events gain the form's IP and form) and the
    outcomes. A message already stored (a redelivery) is enriched again but decided once."""
    carrying = list(
        {e.key: e for e in batch if e.optin_token and e.signal is Signal.OPT_IN}.values()
    )
    if not carrying:
        return list(batch), []
    stored = set(
        connection.execute(
            select(events.c.key).where(among(connection, events.c.key, [e.key for e in carrying]))
        ).scalars()
    )
    digests = {e.key: token_hash(e.optin_token or "") for e in carrying}
    rows = {
        row.token_hash: dict(row._mapping)
        for row in connection.execute(
            select(optin_requests).where(
                among(connection, optin_requests.c.token_hash, sorted(set(digests.values())))
            )
        )
    }
    replaced: dict[str, Event] = {}
    outcomes: list[Confirmation] = []
    entries: list[evidence_store.EvidenceEntry] = []
    for event in sorted(carrying, key=lambda e: (e.occurred_at, e.key)):
        digest = digests[event.key]
        row = rows.get(digest)
        if event.key in stored:
            if row is not None and row["message_id"] == event.message_id:
                replaced[event.key] = _enriched(event, row)
            continue
        outcome = _decide(connection, event, row, now)
        if row is not None and outcome in ("confirmed", "phone_mismatch"):
            replaced[event.key] = _enriched(event, row)
            rows[digest] = {**row, "message_id": event.message_id}  # a twin in this batch
        outcomes.append(Confirmation(outcome, event.key, event.wa_id))
        entries.append(
            evidence_store.EvidenceEntry(
                kind=EVIDENCE_KIND,
                body=_evidence_body(event, row, outcome, digest),
                phone_key=wa_id_key(event.wa_id),
            )
        )
    evidence_store.append(connection, entries, now)
    return [replaced.get(e.key, e) for e in batch], outcomes


Row = dict[str, Any]


def _decide(connection: Connection, event: Event, row: Row | None, now: datetime) -> Outcome:
    if row is None:
        return "unknown"
    if row["confirmed_at"] is not None or row["message_id"] is not None:
        return "used"
    if event.occurred_at > row["expires_at"]:
        return "expired"
    claimed = connection.execute(
        update(optin_requests)
        .where(optin_requests.c.id == row["id"], optin_requests.c.confirmed_at.is_(None))
        .values(
            confirmed_at=event.occurred_at, message_id=event.message_id, confirmed_by=event.wa_id
        )
    )
    if claimed.rowcount != 1:  # another delivery took it first
        return "used"
    if row["phone_key"] is not None and row["phone_key"] != wa_id_key(event.wa_id):
        return "phone_mismatch"  # the sender's own explicit action stands; reported
    return "confirmed"


def _enriched(event: Event, row: Row) -> Event:
    return dataclasses.replace(
        event,
        opt_in_ip=row["client_ip"],
        opt_in_form=f"form:{row['form_id']}:token:{row['token_hash'][:TOKEN_REF_LENGTH]}",
    )


def _evidence_body(event: Event, row: Row | None, outcome: Outcome, digest: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "outcome": outcome,
        "event_key": event.key,
        "message_id": event.message_id,
        "occurred_at": event.occurred_at,
        "keyword": event.keyword,
        "token_ref": digest[:TOKEN_REF_LENGTH],
    }
    if row is not None:
        body.update(
            request_id=row["id"],
            requested_at=row["created_at"],
            expires_at=row["expires_at"],
            client_ip=row["client_ip"],
            user_agent=row["user_agent"],
            page=row["page"],
            form_id=row["form_id"],
            wording=row["wording"],
            wording_sha256=row["wording_sha256"],
            business=row["business"],
            typed_phone_matches=(
                None if row["phone_key"] is None else row["phone_key"] == wa_id_key(event.wa_id)
            ),
        )
    return body


def purge(connection: Connection, now: datetime) -> int:
    """Delete the requests never confirmed whose TTL ended more than 30 days ago."""
    result = connection.execute(
        delete(optin_requests).where(
            optin_requests.c.confirmed_at.is_(None),
            optin_requests.c.expires_at < now - KEEP_UNCONFIRMED,
        )
    )
    return int(result.rowcount or 0)

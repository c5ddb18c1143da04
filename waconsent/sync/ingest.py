"""Storing webhook payloads: the one path shared by the webhook receiver and `waconsent import`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine

from waconsent.config.schema import Settings
from waconsent.connectors.webhook_signature import decode_json
from waconsent.connectors.whatsapp import parse_payload
from waconsent.domain import Event, EventKind, SkippedItem
from waconsent.keywords import KeywordRules
from waconsent.replies.rules import PlannedReply, ReplyPolicy, is_reply_status, plan_reply
from waconsent.store import events as event_store
from waconsent.store import identity
from waconsent.store import optin as optin_store
from waconsent.store import replies as reply_store
from waconsent.store.engine import REFUSED_VALUE


def keyword_rules(settings: Settings) -> KeywordRules:
    whatsapp = settings.whatsapp
    return KeywordRules.build(
        whatsapp.opt_in_keywords,
        whatsapp.opt_out_keywords,
        whatsapp.stop_button_labels,
        whatsapp.opt_in_button_payloads,
    )


@dataclass(frozen=True, slots=True)
class IngestReport:
    stored: int
    duplicates: int
    skipped: tuple[SkippedItem, ...]
    events: tuple[Event, ...]  # the events now in the store (stored or already there)
    #: plain statuses of the business's own messages (not `Event.worth_a_row`): understood,
    #: answered 200, not stored; their number-and-user-id pair is kept as an identity link
    acknowledged: int = 0
    replies_queued: int = 0  # issue 14: confirmations queued for opt-ins / opt-outs typed
    replies_settled: int = 0  # issue 14: statuses of waconsent's own replies applied
    #: issue 15: what became of each `<keyword> <token>` website opt-in confirmation
    optin: tuple[optin_store.Confirmation, ...] = ()
    new_keys: frozenset[str] = frozenset()  # issue 17: the events' keys this delivery stored


def ingest_payload(
    engine: Engine,
    payload: Any,
    keywords: KeywordRules,
    source: str,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    replies: ReplyPolicy | None = None,
) -> IngestReport:
    """Parse one webhook body and commit its events (and their evidence) in one transaction.

    Issue 14, in the same transaction: the statuses of waconsent's own replies settle
    their reply first, whether or not `worth_a_row` keeps them; with a reply policy, each
    opt-in or opt-out typed in the chat queues its confirmation (`replies.rules`).

    The parser already skips what the store could not hold; should the store still refuse
    a value, the delivery is stored again in halves inside savepoints, down to the single
    item at fault, which is skipped with its location. Every other item is committed, so
    an answer of "received" never hides a lost STOP beside a bad item.
    """
    now = clock()
    parsed = parse_payload(payload, keywords, now)
    worth = [event.worth_a_row for event in parsed.events]
    located = [(parsed.location_of(i), event) for i, event in enumerate(parsed.events) if worth[i]]
    plain = [
        (f"status:{status.message_id}", status.wa_id, status.user_id) for status in parsed.plain
    ]
    plain += [
        (event.key, event.wa_id, event.match_user_id)
        for event, kept in zip(parsed.events, worth, strict=True)
        if not kept
    ]
    events = tuple(event for _, event in located)
    links = identity.pair_links(plain, now)
    own = _own_reply_statuses(parsed.events)  # issue 14
    if not events and not links and not own:  # plain statuses only: nothing to write
        return IngestReport(0, 0, parsed.skipped, (), len(plain))
    source = _storable_source(source)
    plans = _reply_plans(events, replies, now)  # issue 14
    try:
        with engine.begin() as connection:
            settled = reply_store.settle(connection, own, now)  # issue 14: first
            joined, confirmations = optin_store.confirm(connection, events, now)  # issue 15
            counts = event_store.ingest(connection, joined, source, now)
            identity.record_links(connection, links)
            queued = reply_store.enqueue(connection, plans, now)  # issue 14
    except REFUSED_VALUE:
        pass
    else:
        return IngestReport(
            counts.stored,
            counts.duplicates,
            parsed.skipped,
            tuple(joined),
            len(plain),
            queued,
            settled,
            optin=tuple(confirmations),
            new_keys=frozenset(counts.stored_keys),
        )
    with engine.begin() as connection:
        settled = reply_store.settle(connection, own, now)  # issue 14: first
        joined, confirmations = optin_store.confirm(connection, events, now)  # issue 15
        located = list(zip([location for location, _ in located], joined, strict=True))
        new_keys, duplicates, refused = _isolate(connection, located, source, now)
        identity.record_links(connection, links)
        refused_at = {location for location, _ in refused}
        kept = tuple(event for location, event in located if location not in refused_at)
        queued = reply_store.enqueue(connection, _reply_plans(kept, replies, now), now)
    skipped = parsed.skipped + tuple(
        SkippedItem(location, f"refused by the store ({type(exc).__name__})")
        for location, exc in refused
    )
    return IngestReport(
        len(new_keys),
        duplicates,
        skipped,
        kept,
        len(plain),
        queued,
        settled,
        optin=tuple(confirmations),
        new_keys=frozenset(new_keys),
    )


def _own_reply_statuses(events: Sequence[Event]) -> list[Event]:
    """Issue 14: the statuses that may belong to waconsent's own replies: those naming
    one in their callback data, and failures (Meta may omit the callback data there; they
    are matched by the reply's message id)."""
    return [
        event
        for event in events
        if is_reply_status(event) or (event.kind is EventKind.STATUS and event.status == "failed")
    ]


def _reply_plans(
    events: Sequence[Event], replies: ReplyPolicy | None, now: datetime
) -> list[PlannedReply]:
    """Issue 14: the confirmations the stored events ask for (none without a policy)."""
    if replies is None:
        return []
    return [plan for event in events if (plan := plan_reply(event, replies, now)) is not None]


def _isolate(
    connection: Connection, located: Sequence[tuple[str, Event]], source: str, now: datetime
) -> tuple[set[str], int, list[tuple[str, Exception]]]:
    """Store the events in savepoints, halving a part the store refuses until the refused
    items stand alone: (stored keys, duplicates, [(location, error)]). k bad items among n
    cost about k * log2(n) extra statements, not n."""
    try:
        with connection.begin_nested():
            counts = event_store.ingest(connection, [event for _, event in located], source, now)
    except REFUSED_VALUE as exc:
        if len(located) == 1:
            return set(), 0, [(located[0][0], exc)]
        middle = len(located) // 2
        first = _isolate(connection, located[:middle], source, now)
        second = _isolate(connection, located[middle:], source, now)
        return first[0] | second[0], first[1] + second[1], first[2] + second[2]
    return set(counts.stored_keys), counts.duplicates, []


def _storable_source(source: str) -> str:
    """The source label (`import:<file name>`) as text the store can hold: a file name
    with undecodable bytes arrives with lone surrogates, which would refuse every item."""
    return source.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "")


def not_json(exc: ValueError | RecursionError) -> str:
    """Why a document is not usable JSON, without quoting it."""
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON ({exc.msg} at column {exc.colno})"
    if isinstance(exc, RecursionError):
        return "not usable JSON (nested too deeply)"
    return f"not usable JSON ({type(exc).__name__})"


def archive_payloads(text: str, name: str) -> Iterator[tuple[str, Any, str | None]]:
    """(where, payload, None) per payload, or (where, None, reason) for a line that is no
    usable JSON; `where` is FILE:LINE for NDJSON, FILE or FILE[index] for a document.

    The whole text is tried first as one JSON document (an object or an array of
    objects); failing that, it is read as NDJSON, one payload a line. Lines end at "\n"
    only: JSON text may hold U+2028 or a form feed, which `str.splitlines` would split on.
    """
    if not text.strip():
        return
    try:
        document = decode_json(text)
    except (ValueError, RecursionError):
        pass
    else:
        if isinstance(document, list):
            yield from ((f"{name}[{index}]", item, None) for index, item in enumerate(document))
        else:
            yield name, document, None
        return
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            yield where, decode_json(line), None
        except (ValueError, RecursionError) as exc:
            yield where, None, not_json(exc)

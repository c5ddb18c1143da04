"""Storing webhook payloads: the one path shared by the webhook receiver and `waconsent import`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine

from waconsent.config.schema import Settings
from waconsent.connectors.whatsapp import KeywordRules, parse_payload
from waconsent.domain import Event, SkippedItem
from waconsent.store import events as event_store


def keyword_rules(settings: Settings) -> KeywordRules:
    whatsapp = settings.whatsapp
    return KeywordRules.build(whatsapp.opt_in_keywords, whatsapp.opt_out_keywords,
                              whatsapp.stop_button_labels, whatsapp.opt_in_button_payloads)


@dataclass(frozen=True, slots=True)
class IngestReport:
    stored: int
    duplicates: int
    skipped: tuple[SkippedItem, ...]
    events: tuple[Event, ...]


def ingest_payload(engine: Engine, payload: Any, keywords: KeywordRules, source: str,
                   clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> IngestReport:
    """Parse one webhook body and commit its events (and their evidence) in one transaction."""
    parsed = parse_payload(payload, keywords)
    if not parsed.events:
        return IngestReport(0, 0, parsed.skipped, ())
    with engine.begin() as connection:
        counts = event_store.ingest(connection, parsed.events, source, clock())
    return IngestReport(counts.stored, counts.duplicates, parsed.skipped, parsed.events)

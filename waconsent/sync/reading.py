"""Reading for a run: which records (by plan), in chunks, fetched ahead where it pays, and
what the ledger knows of each chunk (match keys, index rows, WhatsApp activity).

Memory never grows with the org: records stream from the connector in chunks of
`sync.read_chunk_size`, and at most two chunks wait in the read-ahead queue.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import islice
from typing import Any

from waconsent import logs
from waconsent.connectors.base import total_hint
from waconsent.domain import Activity, CrmRecord
from waconsent.errors import WaconsentError
from waconsent.store import activity as activity_store
from waconsent.store import events as event_store
from waconsent.store import identity, phone_index
from waconsent.store import runs as run_store
from waconsent.store import snapshot as snapshot_store
from waconsent.store.engine import reading
from waconsent.sync import matching
from waconsent.sync.plan import Mode, RunPlan, RunScope
from waconsent.sync.report import RunReport

log = logging.getLogger("waconsent.sync")

#: field -> (raw value, key) as the phone index remembers it for one record
KnownKeys = dict[str, tuple[str, str]]


@dataclass
class Targets:
    """A targeted run's records: those the phone index knows for its keys (and every key
    linked to them), plus those found by searching the CRM for keys no record carries yet.
    Sending is limited to these records."""

    record_ids: set[str] = field(default_factory=set)
    unindexed: list[str] = field(default_factory=list)


def targets_for(scope: RunScope, keys: Iterable[str]) -> Targets:
    with reading(scope.engine) as connection:
        wanted = identity.expand(connection, set(keys))
        by_key = phone_index.records_by_key(connection, scope.crm, wanted)
    return Targets(set().union(*by_key.values()), sorted(wanted - set(by_key)))


@dataclass(frozen=True, slots=True)
class ReadChoice:
    """How the records are read (the report's `read_plan`) and why."""

    plan: str  # "full" | "changed+ids" | "targeted"
    reason: str
    active_ids: frozenset[str] = frozenset()  # changed+ids: records with new activity


def choose_read(scope: RunScope, plan: RunPlan) -> ReadChoice:
    """Full and targeted runs read what their name says. An incremental run reads the
    records changed since the watermark plus, by id, those whose numbers had meaningful
    activity, unless reading those by id would cost more calls than reading everything."""
    if plan.mode is Mode.FULL:
        return ReadChoice("full", "a full run reads every record")
    if plan.mode is Mode.TARGETED:
        return ReadChoice("targeted", "the records of the revoked numbers only")
    marks = plan.marks
    lookback = timedelta(seconds=scope.settings.sync.lookback_seconds)
    with reading(scope.engine) as connection:
        since = marks.run_started - lookback if marks.run_started else None
        keys = set(
            event_store.keys_after(
                connection, marks.events, plan.event_upto, since, meaningful_only=True
            )
        )
        active = phone_index.record_ids_for_keys(
            connection, scope.crm, identity.expand(connection, keys)
        )
        size = max(
            run_store.last_full_size(connection, scope.crm),
            phone_index.record_count(connection, scope.crm),
        )
    connector = scope.connector
    by_id, whole = _calls(len(active), connector.ids_per_read), _calls(size, connector.page_size)
    if active and by_id > whole:
        return ReadChoice(
            "full",
            f"{len(active)} records with new activity would cost {by_id} "
            f"reads by id; all ~{size} records cost {whole} pages",
        )
    return ReadChoice(
        "changed+ids",
        f"{len(active)} records with new activity cost {by_id} "
        f"reads by id (all ~{size} records would cost {whole} pages)",
        frozenset(active),
    )


def _calls(records: int, per_call: int) -> int:
    return -(-records // max(1, per_call))


def records_to_read(
    scope: RunScope, plan: RunPlan, targets: Targets | None, report: RunReport
) -> Iterator[CrmRecord]:
    choice = choose_read(scope, plan)
    report.read_plan, report.read_plan_reason = choice.plan, choice.reason
    if choice.plan == "full":
        records = scope.connector.read_all()
        return _telling_total(scope, records, 0, full=True) if scope.progress.active else records
    if choice.plan == "targeted":
        assert targets is not None
        return _targeted(scope, targets, report)
    records = _changed_and_active(scope, plan, choice.active_ids)
    return (
        _telling_total(scope, records, len(choice.active_ids), full=False)
        if scope.progress.active
        else records
    )


def _telling_total(
    scope: RunScope, records: Iterator[CrmRecord], extra: int, *, full: bool
) -> Iterator[CrmRecord]:
    """Issue 17: tells the progress bar the run's total once the CRM's first page is in:
    the CRM's own count (plus `extra`, the records with activity read by id, an upper
    bound), else for a full read the ledger's last full size as an estimate."""
    told = False
    for record in records:
        if not told:
            told = True
            _tell_total(scope, extra, full)
        yield record
    if not told:
        _tell_total(scope, extra, full)


def _tell_total(scope: RunScope, extra: int, full: bool) -> None:
    hint = total_hint(scope.connector)
    if hint is not None:
        scope.progress.total(hint + extra)
        return
    if full:
        with reading(scope.engine) as connection:
            size = run_store.last_full_size(connection, scope.crm)
        if size:
            scope.progress.total(size, estimated=True)
            return
    scope.progress.total(None)


def _changed_and_active(
    scope: RunScope, plan: RunPlan, active_ids: frozenset[str]
) -> Iterator[CrmRecord]:
    """Records changed since the watermark (with the lookback), then the records whose
    numbers had new meaningful WhatsApp activity, found through the ledger's own phone
    index (never by searching the CRM's unnormalized phone fields)."""
    marks = plan.marks
    assert marks.records is not None
    lookback = timedelta(seconds=scope.settings.sync.lookback_seconds)
    changed_ids: set[str] = set()
    for record in scope.connector.read_changed_since(
        marks.records - lookback, marks.connector_state
    ):
        changed_ids.add(record.record_id)
        yield record
    missing = sorted(active_ids - changed_ids)
    if missing:
        yield from scope.connector.read_by_ids(missing)


def _targeted(scope: RunScope, targets: Targets, report: RunReport) -> Iterator[CrmRecord]:
    if targets.record_ids:
        yield from scope.connector.read_by_ids(sorted(targets.record_ids))
    if targets.unindexed:
        yield from _found_by_search(scope, targets, report)


def _found_by_search(scope: RunScope, targets: Targets, report: RunReport) -> Iterator[CrmRecord]:
    """Records created since the last sync that carry a revoked number: the CRM is searched
    by the number's digits (one call per batch of numbers) and every candidate confirmed by
    its parsed number, so a near miss is never revoked. A failed search (a throttled
    leading-wildcard query, say) leaves those records to the next scheduled run; the
    indexed records are still written."""
    wanted = set(targets.unindexed)
    try:
        candidates = list(scope.connector.find_by_keys(targets.unindexed))
    except WaconsentError as exc:
        report.search_error = str(exc)
        logs.event(
            log,
            "sync.search_failed",
            logging.WARNING,
            error=str(exc),
            numbers=len(targets.unindexed),
        )
        return
    for record in candidates:
        if record.record_id in targets.record_ids:
            continue
        if not record_keys(record, scope.region, None).key_set & wanted:
            continue
        targets.record_ids.add(record.record_id)
        report.found_by_search += 1
        yield record


def chunks(records: Iterable[CrmRecord], size: int) -> Iterator[list[CrmRecord]]:
    iterator = iter(records)
    while chunk := list(islice(iterator, size)):
        yield chunk


_DONE = object()


def _offer(handoff: queue.Queue[Any], stop: threading.Event, item: Any) -> bool:
    """Hand `item` over unless the consumer stopped; False if it did."""
    while not stop.is_set():
        try:
            handoff.put(item, timeout=0.2)
        except queue.Full:
            continue
        else:
            return True
    return False


def read_ahead(chunks: Iterator[list[CrmRecord]], depth: int = 2) -> Iterator[list[CrmRecord]]:
    """Fetch the next chunks in a thread while this one is decided (connectors whose reads
    wait on the network; see `CrmConnector.read_ahead`).

    At most `depth` chunks wait, so memory stays bounded; a reader error is raised here,
    in the run's thread.
    """
    handoff: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: Any) -> bool:
        return _offer(handoff, stop, item)

    def produce() -> None:
        try:
            for chunk in chunks:
                if not offer(chunk):
                    return
            offer(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            offer(exc)

    reader = threading.Thread(target=logs.in_context(produce), name="crm-reader", daemon=True)
    reader.start()
    try:
        while (item := handoff.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        reader.join(timeout=30)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A chunk of records with what the ledger knows of them: their match keys (parsed
    now, or remembered by the phone index), the index rows, and each record's activity.
    Gathered by reads alone, so the chunk's writes happen in one short transaction."""

    keyed: list[tuple[CrmRecord, matching.RecordKeys]]
    known: dict[str, KnownKeys]
    activity: dict[str, Activity]  # by record id; records without events are left out
    #: issue 16: the digest of what the consent snapshot holds for these records (a run
    #: writes changes only)
    held: dict[str, str | None] = field(default_factory=dict)


def prepare(scope: RunScope, chunk: Sequence[CrmRecord]) -> Prepared:
    """Everything a chunk needs read from the ledger (only reads)."""
    fresh = list({r.record_id: r for r in chunk}.values())
    with reading(scope.engine) as connection:
        known = phone_index.known_keys(connection, scope.crm, [r.record_id for r in fresh])
        keyed = [
            (record, record_keys(record, scope.region, known.get(record.record_id)))
            for record in fresh
        ]
        activity = activity_store.activity_of(
            connection, {record.record_id: keys.key_set for record, keys in keyed}
        )
        held = snapshot_store.held_digests(connection, scope.crm, [r.record_id for r in fresh])
    return Prepared(keyed, known, activity, held)


def record_keys(
    record: CrmRecord, default_region: str, known: KnownKeys | None
) -> matching.RecordKeys:
    user_id = record.get("whatsapp_user_id")
    return matching.record_keys(
        record.record_id,
        record.phones,
        user_id if isinstance(user_id, str) else None,
        default_region,
        known,
    )

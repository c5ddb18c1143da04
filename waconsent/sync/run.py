"""One reconciliation run: read, match, decide, outbox, write back, report.

The order is what makes a revocation impossible to lose:

1. take the per-CRM lock (one run at a time across every node sharing the store);
2. send what earlier runs left in the outbox, revocations first;
3. read records (all of them, or those changed since the watermark plus those whose
   numbers had new WhatsApp activity), chunk by chunk, never the whole org at once;
4. decide each record with the pure rules and commit the decisions to the outbox;
5. send the outbox, revocations first; each confirmed write leaves the outbox in the
   same transaction that appends its evidence;
6. only then move the watermarks, in the same transaction as the run record.

A run killed anywhere leaves every decided write either confirmed or queued.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any

from sqlalchemy import Engine

from waconsent.config import LoadedConfig
from waconsent.connectors import CrmConnector, open_crm
from waconsent.connectors.base import BulkWriter, CursorConnector
from waconsent.domain import (
    NO_ACTIVITY,
    PROOF_MISSING,
    Activity,
    CrmRecord,
    Decision,
    DecisionKind,
    Signal,
    WriteRequest,
    WriteResult,
    jsonable,
    to_second,
)
from waconsent.errors import describe
from waconsent.phones import mask, user_id_key
from waconsent.store import events as event_store
from waconsent.store import evidence as evidence_store
from waconsent.store import outbox as outbox_store
from waconsent.store import phone_index
from waconsent.store import runs as run_store
from waconsent.store.engine import open_engine, reading
from waconsent.sync import matching, rules

log = logging.getLogger("waconsent.sync")
LIST_LIMIT = 200  # names listed in a report; the counts are always complete

Clock = Callable[[], datetime]
DecisionSink = Callable[[CrmRecord, Decision], None]


@dataclass
class RunReport:
    """What a run did; `as_dict` is the JSON report of `sync --report`."""

    run_id: int | None = None
    mode: str = "incremental"
    dry_run: bool = False
    status: str = "running"
    records_read: int = 0
    events_considered: int = 0
    revocations: int = 0
    opt_ins: int = 0
    sessions_updated: int = 0
    sessions_open: int = 0
    proof_missing: int = 0
    proof_cleared: int = 0
    conflicts: list[dict[str, str]] = field(default_factory=list)
    unmatched_numbers: int = 0
    unmatched: list[str] = field(default_factory=list)
    writes_queued: int = 0
    writes_sent: int = 0
    writes_failed: int = 0
    writes_superseded: int = 0
    write_errors: list[dict[str, str]] = field(default_factory=list)
    #: records the rules could not decide (their data breaks date arithmetic); the run goes on
    records_failed: int = 0
    record_errors: list[dict[str, str]] = field(default_factory=list)
    superseded: list[str] = field(default_factory=list)
    phone_problems: list[dict[str, str]] = field(default_factory=list)
    number_changes: list[dict[str, str]] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    opted_in: list[str] = field(default_factory=list)
    missing_proof: list[str] = field(default_factory=list)
    open_sessions: list[str] = field(default_factory=list)
    api_calls: int = 0
    api_usage: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {name: jsonable(value) for name, value in self.__dict__.items()}

    def note(self, bucket: list[Any], item: Any) -> None:
        if len(bucket) < LIST_LIMIT:
            bucket.append(item)


@dataclass
class _Context:
    config: LoadedConfig
    engine: Engine
    connector: CrmConnector
    clock: Clock
    report: RunReport
    crm: str
    holder: str
    run_id: int
    dry_run: bool
    on_decision: DecisionSink | None
    mapped: frozenset[str]
    seen_keys: set[str] = field(default_factory=set)  # dry runs only (they write no index)
    #: outbox rows whose send failed in this run: they stay queued for the next run, and
    #: only they are remembered (a sent row leaves the outbox), so memory follows failures
    failed: set[int] = field(default_factory=set)
    decided: set[str] = field(default_factory=set)  # targeted runs: the records they read
    newest_modified: datetime | None = None


def run_once(config: LoadedConfig, *, full: bool = False, dry_run: bool = False,
             connector: CrmConnector | None = None, engine: Engine | None = None,
             clock: Clock | None = None, on_decision: DecisionSink | None = None,
             only_keys: Collection[str] | None = None) -> RunReport:
    """The one entry point of the CLI, the scheduler and the webhook's targeted write-back.

    `only_keys` makes a *targeted* run: only the records the phone index knows for those
    match keys are read, decided and written; watermarks do not move, so the next
    scheduled run still sees everything it would have seen.
    """
    clock = clock or (lambda: datetime.now(UTC))
    settings = config.settings
    own_engine = engine is None
    engine = engine or open_engine(settings.store.url)
    own_connector = connector is None
    try:
        connector = connector or open_crm(config, engine)
        with _long_lived_objects_frozen():
            return _run(config, engine, connector, clock, full, dry_run, on_decision, only_keys)
    finally:
        if own_connector and connector is not None:
            connector.close()
        if own_engine:
            engine.dispose()


_FROZEN = threading.Lock()
_runs_frozen = 0  # runs in progress in this process (`serve` may run two at once)


@contextmanager
def _long_lived_objects_frozen() -> Iterator[None]:
    """Keep the cyclic garbage collector off what existed before the run.

    A full run allocates millions of short-lived objects; each of the collector's full
    passes also walked the ~80,000 that imports, config and connection pools left behind,
    and without the freeze a steady-state full sync took a fifth longer. The freeze is
    process-wide, so the first run in progress freezes and the last one to end unfreezes;
    frozen objects are skipped, not leaked, and return to the collector then.
    """
    global _runs_frozen
    with _FROZEN:
        if _runs_frozen == 0:
            gc.freeze()
        _runs_frozen += 1
    try:
        yield
    finally:
        with _FROZEN:
            _runs_frozen -= 1
            if _runs_frozen == 0:
                gc.unfreeze()


def _run(config: LoadedConfig, engine: Engine, connector: CrmConnector, clock: Clock,
         full: bool, dry_run: bool, on_decision: DecisionSink | None,
         only_keys: Collection[str] | None) -> RunReport:
    settings = config.settings
    crm = settings.crm_name
    with reading(engine) as connection:
        marks = run_store.last_watermarks(connection, crm)
        event_upto = event_store.newest_id(connection)
        connection.rollback()
    targeted = only_keys is not None
    full = not targeted and (full or marks.records is None)
    mode = "targeted" if targeted else "full" if full else "incremental"
    report = RunReport(mode=mode, dry_run=dry_run)
    connector.preflight()
    if isinstance(connector, CursorConnector) and not targeted:
        connector.cursor_state = marks.connector_state
    holder = run_store.node_identity()
    if not dry_run:
        run_store.acquire_lock(engine, crm, holder, clock())
    context = _Context(config, engine, connector, clock, report, crm, holder, 0, dry_run,
                       on_decision, frozenset(settings.mapped_fields()))
    try:
        if not dry_run:
            context.run_id = report.run_id = run_store.start_run(
                engine, crm, report.mode, holder, clock())
            # what earlier runs left, revocations first (a targeted run: its records only)
            _send_outbox(context, leftovers=True, record_ids=_targeted_ids(context, only_keys))
        if dry_run and targeted:
            _targeted_ids(context, only_keys)
        records = (_records_for_keys(context) if only_keys is not None
                   else _records_to_read(context, full, marks, event_upto))
        chunks = _chunks(records, settings.sync.read_chunk_size)
        for chunk in _read_ahead(chunks) if connector.read_ahead else chunks:
            _process_chunk(context, _prepare(context, chunk))
        if not targeted:
            _note_unmatched(context, 0 if full else marks.events, event_upto)
            _note_number_changes(context, 0 if full else marks.events, event_upto)
        if not dry_run:
            _send_outbox(context, record_ids=context.decided if targeted else None)
            _record_usage(context)
            _finish(context, full, None if targeted else marks, event_upto)
        report.status = "dry-run" if dry_run else report.status
    except Exception as exc:  # any failure: the run record says so, the outbox keeps its rows
        report.status, report.error = "failed", describe(exc)
        if not dry_run:
            _finish_failed(context, exc)
        raise
    finally:
        _record_usage(context)
        if not dry_run:
            run_store.release_lock(engine, crm, holder)
    log.info("sync run %s finished: crm=%s mode=%s status=%s records_read=%d revocations=%d "
             "opt_ins=%d writes_sent=%d writes_failed=%d api_calls=%d", report.run_id, crm,
             report.mode, report.status, report.records_read, report.revocations,
             report.opt_ins, report.writes_sent, report.writes_failed, report.api_calls)
    return report


def _record_usage(context: _Context) -> None:
    usage = dict(context.connector.usage())
    context.report.api_calls = int(usage.pop("api_calls", 0) or 0)
    context.report.api_usage = usage


def _targeted_ids(context: _Context, keys: Collection[str] | None) -> set[str] | None:
    if keys is None:
        return None
    with reading(context.engine) as connection:
        context.decided = phone_index.record_ids_for_keys(connection, context.crm, keys)
        connection.rollback()
    return context.decided


def _records_for_keys(context: _Context) -> Iterator[CrmRecord]:
    if context.decided:
        yield from context.connector.read_by_ids(sorted(context.decided))


def _records_to_read(context: _Context, full: bool, marks: run_store.Watermarks,
                     event_upto: int) -> Iterator[CrmRecord]:
    """Full: everything. Incremental: changed since the watermark, then records with activity."""
    if full:
        yield from context.connector.read_all()
        return
    assert marks.records is not None
    lookback = timedelta(seconds=context.config.settings.sync.lookback_seconds)
    changed_ids: set[str] = set()
    for record in context.connector.read_changed_since(marks.records - lookback):
        changed_ids.add(record.record_id)
        yield record
    with reading(context.engine) as connection:
        since = marks.run_started - lookback if marks.run_started else None
        keys = set(event_store.keys_after(connection, marks.events, event_upto, since))
        wanted = phone_index.record_ids_for_keys(connection, context.crm, keys)
        connection.rollback()
    missing = sorted(wanted - changed_ids)
    if missing:
        yield from context.connector.read_by_ids(missing)


def _chunks(records: Iterable[CrmRecord], size: int) -> Iterator[list[CrmRecord]]:
    iterator = iter(records)
    while chunk := list(islice(iterator, size)):
        yield chunk


_DONE = object()


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A chunk of records with what the ledger knows of them: their match keys (parsed
    now, or remembered by the phone index), the index rows, and each record's activity.
    Gathered by reads alone, so the chunk's writes happen in one short transaction."""

    keyed: list[tuple[CrmRecord, matching.RecordKeys]]
    known: dict[str, dict[str, tuple[str, str]]]
    activity: dict[str, Activity]  # by record id; records without events are left out


def _prepare(context: _Context, chunk: list[CrmRecord]) -> _Prepared:
    """Everything a chunk needs read from the ledger (only reads; the writes follow in
    `_process_chunk`)."""
    region = context.config.settings.mapping.default_region
    fresh = list({r.record_id: r for r in chunk}.values())
    with reading(context.engine) as connection:
        known = phone_index.known_keys(connection, context.crm, [r.record_id for r in fresh])
        keyed = [(record, _keys(record, region, known.get(record.record_id)))
                 for record in fresh]
        activity = event_store.activity_of(
            connection, {record.record_id: keys.key_set for record, keys in keyed})
        connection.rollback()
    return _Prepared(keyed, known, activity)


def _read_ahead(chunks: Iterator[list[CrmRecord]], depth: int = 2
                ) -> Iterator[list[CrmRecord]]:
    """Fetch the next chunks in a thread while this one is decided (connectors whose reads
    wait on the network; see `CrmConnector.read_ahead`).

    At most `depth` chunks wait, so memory stays bounded; a reader error is raised here,
    in the run's thread.
    """
    handoff: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: Any) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for chunk in chunks:
                if not offer(chunk):
                    return
            offer(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            offer(exc)

    reader = threading.Thread(target=produce, name="crm-reader", daemon=True)
    reader.start()
    try:
        while (item := handoff.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        reader.join(timeout=30)


def _process_chunk(context: _Context, chunk: _Prepared) -> None:
    report = context.report
    now = context.clock()
    keyed, known = chunk.keyed, chunk.known
    decisions: list[Decision] = []
    for record, keys in keyed:
        report.records_read += 1
        if record.modified_at is not None and (context.newest_modified is None
                                               or record.modified_at > context.newest_modified):
            context.newest_modified = record.modified_at
        for problem in keys.problems:
            report.note(report.phone_problems, {"record_id": problem.record_id,
                                                "field": problem.field,
                                                "value": problem.masked_value,
                                                "reason": problem.reason})
        if context.dry_run:
            context.seen_keys.update(keys.key_set)
        activity = chunk.activity.get(record.record_id, NO_ACTIVITY)
        report.events_considered += activity.event_count
        try:
            decision = rules.decide(record, activity, context.mapped, now)
        except (ArithmeticError, ValueError) as exc:
            # e.g. an event dated in the year 9999, stored before the parser refused such
            # times: `+ 24 h` overflows. One record's data must not stop every revocation.
            report.records_failed += 1
            report.note(report.record_errors, {"record_id": record.record_id,
                                               "error": type(exc).__name__})
            continue
        _count(report, record, decision)
        if context.on_decision is not None:
            context.on_decision(record, decision)
        decisions.append(decision)
    if context.dry_run:
        return
    changed = [(record, keys) for record, keys in keyed
               if _index_rows(record, keys) != _known_rows(known.get(record.record_id, {}))]
    unchanged = sorted({record.record_id for record, _ in keyed}
                       - {record.record_id for record, _ in changed})
    with context.engine.begin() as connection:
        phone_index.replace(
            connection, context.crm, [r.record_id for r, _ in changed],
            [(r.record_id, f, k, _raw(r, f)) for r, keys in changed for f, k in keys.keys],
            context.run_id)
        phone_index.mark_seen(connection, context.crm, unchanged, context.run_id)
        report.writes_queued += outbox_store.enqueue(connection, context.crm, decisions,
                                                     context.run_id, now)
    run_store.refresh_lock(context.engine, context.crm, context.holder, context.clock())


def _keys(record: CrmRecord, default_region: str,
          known: dict[str, tuple[str, str]] | None) -> matching.RecordKeys:
    user_id = record.get("whatsapp_user_id")
    return matching.record_keys(record.record_id, record.phones,
                                user_id if isinstance(user_id, str) else None, default_region,
                                known)


def _index_rows(record: CrmRecord, keys: matching.RecordKeys) -> set[tuple[str, str, str]]:
    return {(field, key, (_raw(record, field) or "")[:200]) for field, key in keys.keys}


def _known_rows(known: dict[str, tuple[str, str]]) -> set[tuple[str, str, str]]:
    return {(field, key, raw) for field, (raw, key) in known.items()}


def _raw(record: CrmRecord, field_name: str) -> str | None:
    if field_name == "whatsapp_user_id":
        value = record.get("whatsapp_user_id")
        return value if isinstance(value, str) else None
    return record.phones.get(field_name)


def _count(report: RunReport, record: CrmRecord, decision: Decision) -> None:
    if decision.changes:
        kind = decision.kind
        if kind is DecisionKind.REVOCATION:
            report.revocations += 1
            report.note(report.revoked, _label(record))
        elif kind is DecisionKind.OPT_IN:
            report.opt_ins += 1
            report.note(report.opted_in, _label(record))
        if decision.changed("last_inbound") or decision.changed("session_expires"):
            report.sessions_updated += 1
    if decision.session_open:
        report.sessions_open += 1
        report.note(report.open_sessions, _label(record))
    if decision.proof_missing:
        report.proof_missing += 1
        report.note(report.missing_proof, _label(record))
    elif record.get(PROOF_MISSING) is True:
        report.proof_cleared += 1
    for conflict in decision.conflicts:
        report.note(report.conflicts, {"record": _label(record), "conflict": conflict})


def _label(record: CrmRecord) -> str:
    return f"{record.record_id} ({record.name})" if record.name else record.record_id


def _note_unmatched(context: _Context, after_id: int, upto_id: int) -> None:
    if context.dry_run:
        with reading(context.engine) as connection:
            keys = set(event_store.keys_after(connection, after_id, upto_id))
            connection.rollback()
        indexed_or_seen = context.seen_keys
        unmatched = sorted(k for k in keys if k not in indexed_or_seen)
    else:
        with reading(context.engine) as connection:
            unmatched = phone_index.unmatched_keys(connection, context.crm, after_id, upto_id)
            connection.rollback()
    context.report.unmatched_numbers = len(unmatched)
    for key in unmatched[:LIST_LIMIT]:
        context.report.unmatched.append(key if key.startswith("uid:") else mask(key))


def _note_number_changes(context: _Context, after_id: int, upto_id: int) -> None:
    """SPEC 5.9: a user_changed_number is reported for the admin; it moves no consent."""
    with reading(context.engine) as connection:
        for event in event_store.in_range(connection, after_id, upto_id,
                                          Signal.NUMBER_CHANGED):
            context.report.note(context.report.number_changes, {
                "from": mask(event.wa_id or ""), "to": mask(event.new_wa_id or ""),
                "at": jsonable(event.occurred_at),
                "user_id": user_id_key(event.user_id) or ""})
        connection.rollback()


BULK_CHUNK = 100_000  # outbox rows handed to one bulk call; memory stays bounded


def _send_outbox(context: _Context, *, leftovers: bool = False,
                 record_ids: Collection[str] | None = None) -> None:
    """Send queued writes in (priority, age) order; big backlogs go the connector's bulk way.

    `leftovers`: rows earlier runs left behind are checked against the CRM first. A row
    whose fields still hold the values it was decided on is sent; one the CRM already
    holds is confirmed without sending (a run killed between the CRM's answer and the
    commit); one someone changed since is dropped, never sent over the newer values, and
    this run decides the record afresh. `record_ids` limits a targeted run to its records.
    """
    connector = context.connector
    size = max(1, connector.write_batch_size)
    send = connector.apply
    if isinstance(connector, BulkWriter) and record_ids is None:
        with reading(context.engine) as connection:
            backlog = outbox_store.count_sendable(connection, context.crm)
            connection.rollback()
        if backlog >= connector.bulk_write_threshold:
            size, send = max(size, min(backlog, BULK_CHUNK)), connector.apply_bulk
    only = sorted(record_ids) if record_ids is not None else None
    cursor = (0, 0)  # (priority, id) of the last row read, so the pass moves on
    while True:
        with reading(context.engine) as connection:
            page = outbox_store.sendable(
                connection, context.crm, after_id=cursor[1], priority=cursor[0], limit=size,
                record_ids=only)
            connection.rollback()
        if not page:
            return
        cursor = (page[-1].priority, page[-1].outbox_id)
        # rows that already failed in this run wait for the next; a page of only those
        # must not end the pass, or the writes behind them would wait too
        batch = [q for q in page if q.outbox_id not in context.failed]
        to_send = _check_leftovers(context, batch) if leftovers and batch else batch
        if to_send:
            results = send([WriteRequest(q.record_id, q.values()) for q in to_send])
            _settle(context, _pair(to_send, results))
        run_store.refresh_lock(context.engine, context.crm, context.holder, context.clock())


def _check_leftovers(context: _Context, batch: Sequence[outbox_store.QueuedWrite]
                     ) -> list[outbox_store.QueuedWrite]:
    current = {r.record_id: r.fields
               for r in context.connector.read_by_ids([q.record_id for q in batch])}
    to_send: list[outbox_store.QueuedWrite] = []
    applied: list[outbox_store.QueuedWrite] = []
    superseded: list[outbox_store.QueuedWrite] = []
    for queued in batch:
        fields = current.get(queued.record_id)
        state = "pending" if fields is None else queued.state_of(fields)  # gone: the CRM says
        {"pending": to_send, "applied": applied, "superseded": superseded}[state].append(queued)
    if applied:
        _settle(context, [(q, WriteResult(q.record_id, True)) for q in applied])
    if superseded:
        context.report.writes_superseded += len(superseded)
        for queued in superseded:
            context.report.note(context.report.superseded, queued.record_id)
        with context.engine.begin() as connection:
            outbox_store.drop(connection, [q.outbox_id for q in superseded])
    return to_send


def _pair(batch: Sequence[outbox_store.QueuedWrite], results: Sequence[WriteResult]
          ) -> list[tuple[outbox_store.QueuedWrite, WriteResult]]:
    """Results come one per request in order; a short or mismatched answer is a failure."""
    pairs = []
    for index, queued in enumerate(batch):
        result = results[index] if index < len(results) else None
        if result is None or result.record_id != queued.record_id:
            result = WriteResult(queued.record_id, False, "the CRM returned no result for "
                                 "this record", "NO_RESULT")
        pairs.append((queued, result))
    return pairs


def _settle(context: _Context,
            outcomes: Sequence[tuple[outbox_store.QueuedWrite, WriteResult]]) -> None:
    report = context.report
    entries = []
    for queued, result in outcomes:
        if result.ok:
            report.writes_sent += 1
            entries.append(evidence_store.EvidenceEntry(
                kind="write", record_id=queued.record_id,
                body={"crm": context.crm, "record_id": queued.record_id,
                      "run_id": context.run_id, "changes": list(queued.changes)}))
        else:
            report.writes_failed += 1
            context.failed.add(queued.outbox_id)
            report.note(report.write_errors, {"record_id": queued.record_id,
                                              "code": result.code, "error": result.error})
    with context.engine.begin() as connection:
        outbox_store.settle(connection, outcomes)
        evidence_store.append(connection, entries, context.clock())


def _finish(context: _Context, full: bool, marks: run_store.Watermarks | None,
            event_upto: int) -> None:
    """Close the run record; `marks` None (a targeted run) leaves the watermarks where they are."""
    report = context.report
    report.status = "partial" if report.writes_failed or report.records_failed else "ok"
    counts = {k: v for k, v in report.as_dict().items() if isinstance(v, int)}
    new_marks = None
    if marks is not None:
        newest = context.newest_modified
        record_mark = max((m for m in (marks.records, newest) if m is not None), default=None)
        cursor = context.connector
        new_marks = run_store.Watermarks(
            record_mark or to_second(context.clock()), max(marks.events, event_upto),
            connector_state=cursor.cursor_state if isinstance(cursor, CursorConnector)
            else None)
    with context.engine.begin() as connection:
        if full:
            phone_index.drop_unseen(connection, context.crm, context.run_id)
        run_store.finish_run(connection, context.run_id, report.status, context.clock(), counts,
                             new_marks)


def _finish_failed(context: _Context, exc: Exception) -> None:
    if not context.run_id:
        return
    report = context.report
    counts = {k: v for k, v in report.as_dict().items() if isinstance(v, int)}
    with context.engine.begin() as connection:
        run_store.finish_run(connection, context.run_id, "failed", context.clock(), counts,
                             None, error=describe(exc))

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

A run killed anywhere leaves every decided write either confirmed or queued. The rooms:
`plan` (what to do), `reading` (which records, in chunks), `deciding` (rules, index,
outbox), `sending` (the outbox to the CRM), `report` (what happened); this module only
puts them in order.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from sqlalchemy import Engine

from waconsent import logs
from waconsent.config import LoadedConfig
from waconsent.connectors import CrmConnector, open_crm
from waconsent.domain import to_second
from waconsent.errors import describe
from waconsent.store import events as event_store
from waconsent.store import phone_index
from waconsent.store import runs as run_store
from waconsent.store import snapshot as snapshot_store
from waconsent.store.engine import open_engine, reading
from waconsent.sync import reading as read
from waconsent.sync.deciding import ChunkDecider, DecisionSink
from waconsent.sync.plan import Clock, Mode, RunPlan, RunScope
from waconsent.sync.progress import SILENT, Progress
from waconsent.sync.report import RunReport, note_identity_changes, note_unmatched
from waconsent.sync.sending import OutboxSender

__all__ = ["DecisionSink", "RunReport", "run_once"]

log = logging.getLogger("waconsent.sync")


def run_once(
    config: LoadedConfig,
    *,
    full: bool = False,
    dry_run: bool = False,
    connector: CrmConnector | None = None,
    engine: Engine | None = None,
    clock: Clock | None = None,
    on_decision: DecisionSink | None = None,
    only_keys: Collection[str] | None = None,
    progress: Progress | None = None,
) -> RunReport:
    """The one entry point of the CLI, the scheduler and the webhook's targeted write-back.

    `only_keys` makes a *targeted* run: only the records behind those match keys are read,
    decided and written; watermarks do not move, so the next scheduled run still sees
    everything it would have seen. `progress` is told how far the run has got (issue 17:
    the CLI's progress bar; silent by default).
    """
    clock = clock or (lambda: datetime.now(UTC))
    own_engine = engine is None
    engine = engine or open_engine(config.settings.store.url)
    own_connector = connector is None
    try:
        connector = connector or open_crm(config, engine)
        with reading(engine) as connection:
            marks = run_store.last_watermarks(connection, config.settings.crm_name)
            event_upto = event_store.newest_id(connection)
        plan = RunPlan.choose(marks, event_upto, full=full, dry_run=dry_run, only_keys=only_keys)
        with _long_lived_objects_frozen():
            return _run(config, engine, connector, clock, plan, on_decision, progress or SILENT)
    finally:
        if own_connector and connector is not None:
            connector.close()
        if own_engine:
            engine.dispose()


def _run(
    config: LoadedConfig,
    engine: Engine,
    connector: CrmConnector,
    clock: Clock,
    plan: RunPlan,
    on_decision: DecisionSink | None,
    progress: Progress,
) -> RunReport:
    settings = config.settings
    crm = settings.crm_name
    report = RunReport(mode=plan.mode.value, dry_run=plan.dry_run)
    connector.preflight()
    holder = run_store.node_identity()
    if plan.writes:
        run_store.acquire_lock(engine, crm, holder, clock())
    run_id = 0
    try:
        if plan.writes:
            run_id = report.run_id = run_store.start_run(
                engine, crm, plan.mode.value, holder, clock()
            )
        scope = RunScope(
            settings,
            engine,
            connector,
            clock,
            crm,
            holder,
            run_id,
            frozenset(settings.mapped_fields()),
            progress,
        )
        with logs.bound(run_id=run_id or None, crm=crm, mode=plan.mode.value):
            _steps(scope, plan, report, on_decision)
    except Exception as exc:  # any failure: the run record says so, the outbox keeps its rows
        report.status, report.error = "failed", describe(exc)
        if run_id:
            _finish_failed(engine, run_id, report, clock, exc)
        raise
    finally:
        _record_usage(connector, report)
        if plan.writes:
            run_store.release_lock(engine, crm, holder)
    logs.event(
        log,
        "sync.finished",
        run_id=report.run_id,
        crm=crm,
        mode=report.mode,
        status=report.status,
        read_plan=report.read_plan,
        records_read=report.records_read,
        revocations=report.revocations,
        opt_ins=report.opt_ins,
        writes_sent=report.writes_sent,
        writes_failed=report.writes_failed,
        api_calls=report.api_calls,
    )
    return report


def _steps(
    scope: RunScope, plan: RunPlan, report: RunReport, on_decision: DecisionSink | None
) -> None:
    """Leftovers, read and decide, reports, send, finish: in this order."""
    targets = read.targets_for(scope, plan.keys) if plan.targeted else None
    only = targets.record_ids if targets is not None else None
    sender = OutboxSender(scope, report)
    if plan.writes:  # what earlier runs left, revocations first (targeted: its records only)
        sender.send(leftovers=True, record_ids=set(only) if only is not None else None)
    decider = ChunkDecider(scope, plan, report, on_decision)
    chunks = read.chunks(
        read.records_to_read(scope, plan, targets, report), scope.settings.sync.read_chunk_size
    )
    for chunk in read.read_ahead(chunks) if scope.connector.read_ahead else chunks:
        decider.decide(read.prepare(scope, chunk))
    if not plan.targeted:
        seen = None if plan.writes else decider.seen_keys
        note_unmatched(report, scope.engine, scope.crm, plan.events_after, plan.event_upto, seen)
        note_identity_changes(report, scope.engine, plan.events_after, plan.event_upto)
    if not plan.writes:
        report.status = "dry-run"
        return
    sender.send(record_ids=only)
    _record_usage(scope.connector, report)
    _finish(scope, plan, report, decider)


def _record_usage(connector: CrmConnector, report: RunReport) -> None:
    usage = dict(connector.usage())
    report.api_calls = int(usage.pop("api_calls", 0) or 0)
    report.api_usage = usage


def _finish(scope: RunScope, plan: RunPlan, report: RunReport, decider: ChunkDecider) -> None:
    """Close the run record; only a full or incremental run moves the watermarks (in the
    same transaction), and only a full read may drop index rows it did not see."""
    report.status = "partial" if report.writes_failed or report.records_failed else "ok"
    new_marks = None
    if plan.moves_watermarks:
        marks = plan.marks
        newest = decider.newest_modified
        record_mark = max((m for m in (marks.records, newest) if m is not None), default=None)
        new_marks = run_store.Watermarks(
            record_mark or to_second(scope.clock()),
            max(marks.events, plan.event_upto),
            connector_state=scope.connector.next_cursor(),
        )
    with scope.engine.begin() as connection:
        if plan.mode is Mode.FULL:
            phone_index.drop_unseen(connection, scope.crm, scope.run_id)
            snapshot_store.drop_unseen(connection, scope.crm)  # issue 16
        run_store.finish_run(
            connection, scope.run_id, report.status, scope.clock(), report.counts(), new_marks
        )


def _finish_failed(
    engine: Engine, run_id: int, report: RunReport, clock: Clock, exc: Exception
) -> None:
    with engine.begin() as connection:
        run_store.finish_run(
            connection, run_id, "failed", clock(), report.counts(), None, error=describe(exc)
        )


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
    global _runs_frozen  # noqa: PLW0603 - gc.freeze is process-wide, so is its count
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

"""Sending the outbox: queued writes in (priority, age) order, revocations first; each
confirmed write leaves the outbox in the same transaction that appends its evidence."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from waconsent.domain import WriteRequest, WriteResult
from waconsent.store import evidence as evidence_store
from waconsent.store import outbox as outbox_store
from waconsent.store.engine import reading
from waconsent.sync.plan import RunScope
from waconsent.sync.report import RunReport

QueuedWrite = outbox_store.QueuedWrite


class OutboxSender:
    """Sends for one run. Remembers only the rows that failed in this run (they wait for the
    next run; a sent row leaves the outbox), so memory follows failures, not volume."""

    def __init__(self, scope: RunScope, report: RunReport) -> None:
        self._scope = scope
        self._report = report
        self._failed: set[int] = set()

    def send(self, *, leftovers: bool = False, record_ids: Collection[str] | None = None) -> None:
        """One pass over the outbox; `record_ids` limits a targeted run to its records.

        `leftovers`: rows earlier runs left behind are checked against the CRM first. A row
        whose fields still hold the values it was decided on is sent; one the CRM already
        holds is confirmed without sending (a run killed between the CRM's answer and the
        commit); one someone changed since is dropped, never sent over the newer values, and
        this run decides the record afresh.
        """
        scope = self._scope
        only = sorted(record_ids) if record_ids is not None else None
        with reading(scope.engine) as connection:
            backlog = outbox_store.count_sendable(connection, scope.crm, record_ids=only)
        scope.progress.sending(backlog)
        size = max(1, scope.connector.batch_size(backlog))
        cursor = (0, 0)  # (priority, id) of the last row read, so the pass moves on
        while True:
            with reading(scope.engine) as connection:
                page = outbox_store.sendable(
                    connection,
                    scope.crm,
                    after_id=cursor[1],
                    priority=cursor[0],
                    limit=size,
                    record_ids=only,
                )
            if not page:
                return
            cursor = (page[-1].priority, page[-1].outbox_id)
            # rows that already failed in this run wait for the next; a page of only those
            # must not end the pass, or the writes behind them would wait too
            batch = [q for q in page if q.outbox_id not in self._failed]
            to_send = self._check_leftovers(batch) if leftovers and batch else batch
            if to_send:
                results = scope.connector.write(
                    [WriteRequest(q.record_id, q.values()) for q in to_send]
                )
                self._settle(_pair(to_send, results))
            scope.keep_lock()

    def _check_leftovers(self, batch: Sequence[QueuedWrite]) -> list[QueuedWrite]:
        current = {
            r.record_id: r.fields
            for r in self._scope.connector.read_by_ids([q.record_id for q in batch])
        }
        states: dict[str, list[QueuedWrite]] = {"pending": [], "applied": [], "superseded": []}
        for queued in batch:
            fields = current.get(queued.record_id)
            # a record that is gone is still "pending": the CRM's answer to the write says so
            states["pending" if fields is None else queued.state_of(fields)].append(queued)
        if states["applied"]:
            self._settle([(q, WriteResult(q.record_id, True)) for q in states["applied"]])
        superseded = states["superseded"]
        if superseded:
            self._report.writes_superseded += len(superseded)
            for queued in superseded:
                self._report.note(self._report.superseded, queued.record_id)
            with self._scope.engine.begin() as connection:
                outbox_store.drop(connection, [q.outbox_id for q in superseded])
        return states["pending"]

    def _settle(self, outcomes: Sequence[tuple[QueuedWrite, WriteResult]]) -> None:
        scope, report = self._scope, self._report
        entries = []
        scope.progress.sent(
            sum(1 for _, r in outcomes if r.ok), sum(1 for _, r in outcomes if not r.ok)
        )
        for queued, result in outcomes:
            if result.ok:
                report.writes_sent += 1
                entries.append(
                    evidence_store.EvidenceEntry(
                        kind="write",
                        record_id=queued.record_id,
                        body={
                            "crm": scope.crm,
                            "record_id": queued.record_id,
                            "run_id": scope.run_id,
                            "changes": list(queued.changes),
                        },
                    )
                )
            else:
                self._failed.add(queued.outbox_id)
                report.note_write_error(queued.record_id, result.code, result.error)
        with scope.engine.begin() as connection:
            outbox_store.settle(connection, outcomes)
            evidence_store.append(connection, entries, scope.clock())


def _pair(
    batch: Sequence[QueuedWrite], results: Sequence[WriteResult]
) -> list[tuple[QueuedWrite, WriteResult]]:
    """Results come one per request in order; a short or mismatched answer is a failure."""
    pairs = []
    for index, queued in enumerate(batch):
        result = results[index] if index < len(results) else None
        if result is None or result.record_id != queued.record_id:
            result = WriteResult(
                queued.record_id, False, "the CRM returned no result for this record", "NO_RESULT"
            )
        pairs.append((queued, result))
    return pairs

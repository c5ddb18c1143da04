"""Deciding a chunk: the pure rules for every record, then one short transaction that
updates the phone index and queues the decisions in the outbox (nothing is sent here)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from waconsent.domain import NO_ACTIVITY, Activity, CrmRecord, Decision
from waconsent.phones import user_id_key
from waconsent.store import outbox as outbox_store
from waconsent.store import phone_index
from waconsent.store import snapshot as snapshot_store
from waconsent.sync import audience, matching, rules
from waconsent.sync.plan import RunPlan, RunScope
from waconsent.sync.reading import KnownKeys, Prepared
from waconsent.sync.report import RunReport

DecisionSink = Callable[[CrmRecord, Decision], None]


class ChunkDecider:
    """Decides chunk after chunk; remembers what the run's end needs (the newest record
    modification for the watermark, and in a dry run the keys it saw)."""

    def __init__(
        self,
        scope: RunScope,
        plan: RunPlan,
        report: RunReport,
        on_decision: DecisionSink | None = None,
    ) -> None:
        self._scope = scope
        self._plan = plan
        self._report = report
        self._on_decision = on_decision
        self.newest_modified: datetime | None = None
        #: a dry run writes no index, so it remembers the keys of what it read
        self.seen_keys: set[str] = set()
        #: the chunk's snapshot rows that differ from what is held (issue 16)
        self._snapshot: list[snapshot_store.SnapshotRow] = []

    def decide(self, chunk: Prepared) -> None:
        now = self._scope.clock()
        self._snapshot = []
        decided = (self._decide_one(record, keys, chunk, now) for record, keys in chunk.keyed)
        decisions = [decision for decision in decided if decision is not None]
        if self._plan.writes:
            self._queue(chunk, decisions, now, self._snapshot)
            self._scope.keep_lock()
        self._scope.progress.decided(len(chunk.keyed))

    def _decide_one(
        self, record: CrmRecord, keys: matching.RecordKeys, chunk: Prepared, now: datetime
    ) -> Decision | None:
        modified = record.modified_at
        if modified is not None and (
            self.newest_modified is None or modified > self.newest_modified
        ):
            self.newest_modified = modified
        if not self._plan.writes:
            self.seen_keys.update(keys.key_set)
        activity = chunk.activity.get(record.record_id, NO_ACTIVITY)
        self._report.tally_read(keys)
        self._report.events_considered += activity.event_count
        try:
            decision = rules.decide(record, activity, self._scope.mapped, now)
        except (ArithmeticError, ValueError) as exc:
            # e.g. an event dated in the year 9999, stored before the parser refused such
            # times: `+ 24 h` overflows. One record's data must not stop every revocation.
            self._report.tally_undecided(record, exc)
            return None
        self._report.tally(record, decision)
        if self._plan.writes:
            row = _snapshot_row(record, keys, decision, activity, now)
            if _snapshot_changed(row, chunk.held):
                self._snapshot.append(row)
        if self._on_decision is not None:
            self._on_decision(record, decision)
        return decision

    def _queue(
        self,
        chunk: Prepared,
        decisions: list[Decision],
        now: datetime,
        snapshot: list[snapshot_store.SnapshotRow],
    ) -> None:
        """Index rows of records whose numbers changed are replaced, the others only marked
        seen; decisions go to the outbox; the consent snapshot of records whose keys or
        consent changed is replaced (issue 16). One transaction."""
        scope = self._scope
        changed = [
            (record, keys)
            for record, keys in chunk.keyed
            if _index_rows(record, keys) != _known_rows(chunk.known.get(record.record_id, {}))
        ]
        changed_ids = {record.record_id for record, _ in changed}
        unchanged = sorted({record.record_id for record, _ in chunk.keyed} - changed_ids)
        with scope.engine.begin() as connection:
            phone_index.replace(
                connection,
                scope.crm,
                [r.record_id for r, _ in changed],
                [(r.record_id, f, k, _raw(r, f)) for r, keys in changed for f, k in keys.keys],
                scope.run_id,
            )
            phone_index.mark_seen(connection, scope.crm, unchanged, scope.run_id)
            self._report.writes_queued += outbox_store.enqueue(
                connection, scope.crm, decisions, scope.run_id, now
            )
            snapshot_store.replace(
                connection, scope.crm, [row.record_id for row in snapshot], snapshot, scope.run_id
            )


def _snapshot_row(
    record: CrmRecord,
    keys: matching.RecordKeys,
    decision: Decision,
    activity: Activity,
    now: datetime,
) -> snapshot_store.SnapshotRow:
    """The record as this run leaves it, found by its keys and by the user id its numbers
    last wrote with (a later STOP that carries only that id still reaches it)."""
    held = audience.held_after(record, decision, activity)
    seen = user_id_key(activity.newest_user_id[1]) if activity.newest_user_id else None
    return snapshot_store.SnapshotRow(
        record.record_id,
        keys.key_set | {seen} if seen else keys.key_set,
        held.opt_in,
        held.opt_in_date,
        held.opt_out_date,
        held.proof_complete,
        held.session_expires,
        now,
    )


def _snapshot_changed(row: snapshot_store.SnapshotRow, held: dict[str, str | None]) -> bool:
    if row.record_id not in held:
        return bool(row.keys)  # a record without a number or user id cannot be looked up
    return snapshot_store.digest_of(row) != held[row.record_id]


def _index_rows(record: CrmRecord, keys: matching.RecordKeys) -> set[tuple[str, str, str]]:
    return {(field, key, (_raw(record, field) or "")[:200]) for field, key in keys.keys}


def _known_rows(known: KnownKeys) -> set[tuple[str, str, str]]:
    return {(field, key, raw) for field, (raw, key) in known.items()}


def _raw(record: CrmRecord, field_name: str) -> str | None:
    if field_name == "whatsapp_user_id":
        value = record.get("whatsapp_user_id")
        return value if isinstance(value, str) else None
    return record.phones.get(field_name)

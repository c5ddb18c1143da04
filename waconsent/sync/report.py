"""What a run did: the report of `sync --report`, and the tallies that fill it.

Counts are always complete; lists of names stop at LIST_LIMIT, so a million-record run's
report stays small. Phone numbers appear masked, user ids as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from waconsent.domain import PROOF_MISSING, CrmRecord, Decision, DecisionKind, Signal, jsonable
from waconsent.phones import USER_ID_PREFIX, mask, user_id_key
from waconsent.store import events as event_store
from waconsent.store import identity, phone_index
from waconsent.store.engine import reading
from waconsent.sync.matching import RecordKeys

LIST_LIMIT = 200  # names listed in a report; the counts are always complete


@dataclass
class RunReport:
    """What a run did; `as_dict` is the JSON report of `sync --report`."""

    run_id: int | None = None
    mode: str = "incremental"
    dry_run: bool = False
    status: str = "running"
    read_plan: str = ""  # "full", "changed+ids" or "targeted"
    read_plan_reason: str = ""
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
    user_id_changes: list[dict[str, str]] = field(default_factory=list)
    #: a targeted run: records found by searching the CRM for numbers no sync had indexed
    found_by_search: int = 0
    search_error: str | None = None
    revoked: list[str] = field(default_factory=list)
    opted_in: list[str] = field(default_factory=list)
    missing_proof: list[str] = field(default_factory=list)
    open_sessions: list[str] = field(default_factory=list)
    api_calls: int = 0
    api_usage: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {name: jsonable(value) for name, value in self.__dict__.items()}

    def counts(self) -> dict[str, Any]:
        """What the run record keeps (`waconsent runs`, `waconsent report html`): every count,
        and the two lists a data-protection officer reads afterwards, the conflicts and the
        unmatched numbers (masked), each at most LIST_LIMIT long, so the JSON stays small."""
        kept: dict[str, Any] = {k: v for k, v in self.as_dict().items() if isinstance(v, int)}
        kept["conflicts"] = [dict(conflict) for conflict in self.conflicts]
        kept["unmatched"] = list(self.unmatched)
        return kept

    def note(self, bucket: list[Any], item: Any) -> None:
        if len(bucket) < LIST_LIMIT:
            bucket.append(item)

    def tally_read(self, keys: RecordKeys) -> None:
        """Count one record read, decided or not, with its unparseable phone values."""
        self.records_read += 1
        for problem in keys.problems:
            self.note(
                self.phone_problems,
                {
                    "record_id": problem.record_id,
                    "field": problem.field,
                    "value": problem.masked_value,
                    "reason": problem.reason,
                },
            )

    def tally_undecided(self, record: CrmRecord, error: Exception) -> None:
        """A record the rules could not decide: named with the error's type only (its
        message may quote the data)."""
        self.records_failed += 1
        self.note(
            self.record_errors, {"record_id": record.record_id, "error": type(error).__name__}
        )

    def tally(self, record: CrmRecord, decision: Decision) -> None:
        """Count one decided record into the report."""
        if decision.changes:
            kind = decision.kind
            if kind is DecisionKind.REVOCATION:
                self.revocations += 1
                self.note(self.revoked, label(record))
            elif kind is DecisionKind.OPT_IN:
                self.opt_ins += 1
                self.note(self.opted_in, label(record))
            if decision.changed("last_inbound") or decision.changed("session_expires"):
                self.sessions_updated += 1
        if decision.session_open:
            self.sessions_open += 1
            self.note(self.open_sessions, label(record))
        if decision.proof_missing:
            self.proof_missing += 1
            self.note(self.missing_proof, label(record))
        elif record.get(PROOF_MISSING) is True:
            self.proof_cleared += 1
        for conflict in decision.conflicts:
            self.note(self.conflicts, {"record": label(record), "conflict": conflict})

    def note_write_error(self, record_id: str, code: str, error: str) -> None:
        self.writes_failed += 1
        self.note(self.write_errors, {"record_id": record_id, "code": code, "error": error})


def label(record: CrmRecord) -> str:
    return f"{record.record_id} ({record.name})" if record.name else record.record_id


def note_unmatched(
    report: RunReport,
    engine: Engine,
    crm: str,
    after_id: int,
    upto_id: int,
    seen_keys: set[str] | None = None,
) -> None:
    """Keys with activity that reach no record, directly or through a linked key.

    `seen_keys` (a dry run, which writes no index) are the keys of the records it read.
    """
    with reading(engine) as connection:
        if seen_keys is not None:
            keys = set(event_store.keys_after(connection, after_id, upto_id))
            candidates = sorted(k for k in keys if k not in seen_keys)
        else:
            candidates = phone_index.unmatched_keys(connection, crm, after_id, upto_id)
        people = identity.connect(connection, candidates)
        indexed = (
            set(seen_keys)
            if seen_keys is not None
            else set(phone_index.records_by_key(connection, crm, people.expand(candidates)))
        )
    unmatched = [key for key in candidates if not people.expand([key]) & indexed]
    report.unmatched_numbers = len(unmatched)
    for key in unmatched[:LIST_LIMIT]:
        report.unmatched.append(key if key.startswith(USER_ID_PREFIX) else mask(key))


def note_identity_changes(report: RunReport, engine: Engine, after_id: int, upto_id: int) -> None:
    """SPEC 5.9: number changes and user-id changes are reported for the admin; a number
    change moves no consent, a user-id change links the old and new ids."""
    with reading(engine) as connection:
        for event in event_store.in_range(connection, after_id, upto_id, Signal.NUMBER_CHANGED):
            report.note(
                report.number_changes,
                {
                    "from": mask(event.wa_id or ""),
                    "to": mask(event.new_wa_id or ""),
                    "at": jsonable(event.occurred_at),
                    "user_id": user_id_key(event.user_id) or "",
                },
            )
        for event in event_store.in_range(connection, after_id, upto_id, Signal.USER_ID_CHANGED):
            report.note(
                report.user_id_changes,
                {
                    "from": event.user_id or "",
                    "to": event.new_user_id or "",
                    "number": mask(event.wa_id) if event.wa_id else "",
                    "at": jsonable(event.occurred_at),
                },
            )

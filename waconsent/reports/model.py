"""The HTML report's data, and the trend arithmetic over the run history. Pure.

A run's `counts` is the JSON the run record keeps (`RunReport.counts()`): every integer count
of its report plus the bounded `conflicts` and `unmatched` lists. The trend is by UTC day,
because under `waconsent serve` a STOP starts a small targeted run within a second, so runs
come in all sizes and a per-run line would zigzag between a nightly full run and a one-record
write-back. Per day, revocations and opt-ins add up over every finished run (each change is
counted by the run that decided it); missing proof is a standing number, so it is the one of
the day's last full run (the only kind that reads every record) and carries forward to days
without one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

FINISHED = ("ok", "partial")  # a run that completed its write-back
#: the last run's numbers shown, in this order, with what each means to a reader
HEADLINE: tuple[tuple[str, str], ...] = (
    ("records_read", "records read"),
    ("revocations", "revoked (STOP and equivalents)"),
    ("opt_ins", "opted in on WhatsApp"),
    ("proof_missing", "opted in, proof missing"),
    ("proof_cleared", "proof completed since"),
    ("sessions_open", "open 24-hour sessions"),
    ("unmatched_numbers", "numbers with activity but no record"),
    ("writes_sent", "CRM writes confirmed"),
    ("writes_failed", "CRM writes failed (queued again)"),
)
SERIES: tuple[tuple[str, str], ...] = (
    ("revocations", "revocations"),
    ("opt_ins", "opt-ins"),
    ("proof_missing", "missing proof"),
)


@dataclass(frozen=True, slots=True)
class Run:
    """One run record as the report reads it."""

    id: int
    started_at: datetime
    mode: str  # full, incremental, targeted
    status: str  # ok, partial, failed
    counts: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None

    def count(self, key: str) -> int:
        value = self.counts.get(key, 0)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    def listed(self, key: str) -> list[Any] | None:
        """A list kept with the run, or None for a run recorded before lists were kept."""
        value = self.counts.get(key)
        return list(value) if isinstance(value, list) else None


@dataclass(frozen=True, slots=True)
class Flagged:
    """An opted-in record whose proof is incomplete, and what it lacks."""

    record_id: str
    name: str | None
    opt_in_date: str | None
    opt_in_source: str | None
    missing: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Day:
    """One point of the trend: a UTC day with at least one finished run."""

    day: date
    runs: int
    revocations: int
    opt_ins: int
    proof_missing: int | None  # None before the first full run


@dataclass(frozen=True)
class ReportData:
    """Everything the page shows."""

    generated_at: datetime
    crm: str
    runs: Sequence[Run]  # oldest first, the window of `days`
    flagged: Sequence[Flagged]
    flagged_total: int  # the flagged list may be cut; this number never is
    days: int = 30

    @property
    def last(self) -> Run | None:
        """The newest finished full or incremental run: the org-wide numbers. A targeted
        run is a few records' early write-back, its numbers are not the org's."""
        return next(
            (r for r in reversed(self.runs) if r.status in FINISHED and r.mode != "targeted"), None
        )

    @property
    def failed_since(self) -> Run | None:
        """The newest run, when it failed after the last good one: the reader must know."""
        newest = self.runs[-1] if self.runs else None
        return newest if newest is not None and newest.status == "failed" else None


def trend(runs: Iterable[Run]) -> list[Day]:
    """Per UTC day with a finished run, oldest first (see the module docstring)."""
    days: dict[date, list[Run]] = {}
    for run in runs:
        if run.status in FINISHED:
            days.setdefault(run.started_at.date(), []).append(run)
    points, standing = [], None
    for day in sorted(days):
        finished = days[day]
        fulls = [r for r in finished if r.mode == "full"]
        if fulls:
            standing = fulls[-1].count("proof_missing")
        points.append(
            Day(
                day,
                len(finished),
                sum(r.count("revocations") for r in finished),
                sum(r.count("opt_ins") for r in finished),
                standing,
            )
        )
    return points

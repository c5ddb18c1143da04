"""What a run will do (`RunPlan`) and what it does it with (`RunScope`), decided once.

The plan replaces mode flags scattered through the run: every room asks the plan
(`plan.writes`, `plan.targeted`, `plan.moves_watermarks`) instead of testing
`dry_run` or `only_keys` itself.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine

from waconsent.config.schema import Settings
from waconsent.connectors import CrmConnector
from waconsent.store import runs as run_store
from waconsent.store.runs import Watermarks
from waconsent.sync.progress import SILENT, Progress

Clock = Callable[[], datetime]


class Mode(enum.StrEnum):
    FULL = "full"  # every record
    INCREMENTAL = "incremental"  # records changed since the watermark, plus those with activity
    TARGETED = "targeted"  # the records behind a few match keys (a webhook's revocation)


@dataclass(frozen=True, slots=True)
class RunPlan:
    mode: Mode
    dry_run: bool
    marks: Watermarks  # of the last finished run (where an incremental read starts)
    event_upto: int  # the newest event id when the run began: the range it considers
    keys: frozenset[str] = frozenset()  # a targeted run's match keys

    @classmethod
    def choose(
        cls,
        marks: Watermarks,
        event_upto: int,
        *,
        full: bool,
        dry_run: bool,
        only_keys: Collection[str] | None,
    ) -> RunPlan:
        """Targeted when keys are given; full when asked or when no run finished before."""
        if only_keys is not None:
            mode = Mode.TARGETED
        elif full or marks.records is None:
            mode = Mode.FULL
        else:
            mode = Mode.INCREMENTAL
        return cls(mode, dry_run, marks, event_upto, frozenset(only_keys or ()))

    @property
    def writes(self) -> bool:
        """Whether anything is written anywhere (the CRM, the outbox, the index, runs)."""
        return not self.dry_run

    @property
    def targeted(self) -> bool:
        return self.mode is Mode.TARGETED

    @property
    def moves_watermarks(self) -> bool:
        """A targeted run moves none, so the next scheduled run still sees everything."""
        return self.writes and not self.targeted

    @property
    def events_after(self) -> int:
        """The event id after which events count as new for this run's reports."""
        return 0 if self.mode is Mode.FULL else self.marks.events


@dataclass(frozen=True, slots=True)
class RunScope:
    """What one run works with; built once, read by every room of the run."""

    settings: Settings
    engine: Engine
    connector: CrmConnector
    clock: Clock
    crm: str
    holder: str  # this run's identity in the run lock
    run_id: int  # 0 for a dry run, which records no run
    mapped: frozenset[str]
    progress: Progress = SILENT  # issue 17: told how far the run has got

    @property
    def region(self) -> str:
        return self.settings.mapping.default_region

    def keep_lock(self) -> None:
        """Renew the lease between steps; raises RunLockHeld if another node took it over."""
        if self.run_id:
            run_store.refresh_lock(self.engine, self.crm, self.holder, self.clock())

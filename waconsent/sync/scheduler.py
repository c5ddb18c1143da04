"""When runs happen: APScheduler wiring for the scheduled runs, and the revocation dispatcher.

The scheduled jobs and the dispatcher only call the run functions they are given;
none holds logic of its own. The store's run lock keeps one run per CRM at a time,
so a job that finds the lock held simply skips (scheduled) or retries (revocation).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from waconsent import logs
from waconsent.config.schema import ScheduleConfig
from waconsent.domain import Event, Signal
from waconsent.errors import RunLockHeld, describe
from waconsent.sync.matching import event_keys

log = logging.getLogger("waconsent.scheduler")


NIGHTLY_RETRY = timedelta(minutes=5)
NIGHTLY_RETRIES = 24  # two hours of an incremental run in the way, then tomorrow


def _guarded(
    name: str, job: Callable[[], Any], on_lock_held: Callable[[], None] | None = None
) -> Callable[[], None]:
    def run() -> None:
        try:
            job()
        except RunLockHeld as exc:
            logs.event(log, "scheduler.lock_held", job=name, holder=exc.holder)
            if on_lock_held is not None:
                on_lock_held()
        except Exception as exc:  # noqa: BLE001 - the outbox keeps what was decided; the next run resumes
            logs.event(log, "scheduler.job_failed", logging.ERROR, job=name, error=describe(exc))

    return run


def build_scheduler(
    schedule: ScheduleConfig,
    full_run: Callable[[], Any],
    incremental_run: Callable[[], Any],
    hourly: Callable[[], Any] | None = None,
) -> BackgroundScheduler:
    """Nightly full run on the cron expression, incremental every N minutes, never overlapping.

    A nightly run that finds an incremental run holding the lock is tried again every five
    minutes (for two hours), instead of being lost for the day.
    """
    scheduler = BackgroundScheduler(timezone=schedule.timezone)
    common: dict[str, Any] = {"max_instances": 1, "coalesce": True, "misfire_grace_time": 3600}
    retries = [0]

    def retry_nightly() -> None:
        if retries[0] < NIGHTLY_RETRIES:
            retries[0] += 1
            scheduler.add_job(
                nightly,
                DateTrigger(datetime.now(UTC) + NIGHTLY_RETRY),
                id="nightly-full-retry",
                replace_existing=True,
            )

    def full_then_reset() -> None:
        full_run()
        retries[0] = 0

    nightly = _guarded("nightly full sync", full_then_reset, retry_nightly)
    scheduler.add_job(
        nightly,
        CronTrigger.from_crontab(schedule.nightly, timezone=schedule.timezone),
        id="nightly-full",
        **common,
    )
    scheduler.add_job(
        _guarded("incremental sync", incremental_run),
        IntervalTrigger(minutes=schedule.incremental_minutes, timezone=schedule.timezone),
        id="incremental",
        **common,
    )
    if hourly is not None:  # issue 15: the purge of unconfirmed website opt-in requests
        scheduler.add_job(
            _guarded("hourly upkeep", hourly), IntervalTrigger(hours=1), id="hourly", **common
        )
    return scheduler


def revocation_keys(events: Collection[Event]) -> set[str]:
    """The match keys of the opt-outs among freshly stored events."""
    return {key for event in events if event.signal is Signal.OPT_OUT for key in event_keys(event)}


class RevocationDispatcher:
    """Starts a targeted write-back within seconds of a revocation arriving by webhook.

    Keys are gathered for `debounce` seconds so a burst of STOPs becomes one run. When
    another run holds the lock, the keys are tried again every `retry_after` seconds, up
    to `attempts` times; past that the next scheduled run handles them (the events are
    stored, so nothing is lost either way).
    """

    def __init__(
        self,
        run: Callable[[set[str]], Any],
        *,
        debounce: float = 0.5,
        max_wait: float = 2.0,
        retry_after: float = 5.0,
        attempts: int = 60,
    ) -> None:
        self._run = run
        self._debounce = debounce
        self._max_wait = max_wait
        self._retry_after = retry_after
        self._attempts = attempts
        self._queue: queue.Queue[set[str] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="revocations", daemon=True)

    def submit_events(self, events: Collection[Event]) -> None:
        keys = revocation_keys(events)
        if keys:
            self._queue.put(keys)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _drain(self, first: set[str]) -> tuple[set[str], bool]:
        """Gather keys until `debounce` passes quietly, but never longer than `max_wait`:
        a steady trickle of STOPs must not postpone the write-back indefinitely."""
        keys, deadline = set(first), time.monotonic() + self._max_wait
        while (left := deadline - time.monotonic()) > 0:
            try:
                more = self._queue.get(timeout=min(self._debounce, left))
            except queue.Empty:
                break
            if more is None:
                return keys, True
            keys |= more
        return keys, False

    def _work(self) -> None:
        pending: set[str] = set()
        failures = 0
        while True:
            try:
                item = self._queue.get(timeout=self._retry_after if pending else None)
            except queue.Empty:
                item = set()
            if item is None:
                return
            keys, stopping = self._drain(item | pending)
            pending = set()
            try:
                self._run(keys)
                failures = 0
            except Exception as exc:  # noqa: BLE001 - the worker must outlive any failure of one run
                failures += 1
                if failures < self._attempts:
                    pending = keys
                    level = logging.INFO if isinstance(exc, RunLockHeld) else logging.ERROR
                    logs.event(
                        log,
                        "revocations.deferred",
                        level,
                        error=describe(exc),
                        retry_in_seconds=self._retry_after,
                    )
                else:
                    # the events are stored: the next scheduled run sends the revocation
                    logs.event(log, "revocations.gave_up", logging.WARNING, tries=failures)
                    failures = 0
            if stopping:
                return

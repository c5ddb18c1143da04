"""The progress bar of `waconsent sync` (issue 17), on standard error, only on a terminal.

Two lines: records read and decided (with the total and an ETA where the CRM tells the
total, or `~` where it is the ledger's estimate from the last full run), and writes sent
(each pass over the outbox sets how many are waiting). On a pipe, in a cron job or under
systemd, where the logs are JSON lines, nothing is drawn: `bar_for` gives None and the run
stays silent. The bar is transient: the summary table replaces it when the run ends.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from waconsent import logs


class _Rate(ProgressColumn):
    """Items a second, over rich's recent window; blank until there are two samples."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f}/s" if speed else "", style="progress.data.speed")


class SyncBar:
    """A `waconsent.sync.progress.Progress` drawn with rich."""

    active = True

    def __init__(self, console: Console, *, writes: bool = True) -> None:
        self._bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _Rate(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self._lock = threading.Lock()  # `total` may come from the read-ahead thread
        self._records: TaskID = self._bar.add_task("records read and decided", total=None)
        # a dry run sends nothing: no line for it
        self._writes: TaskID = self._bar.add_task("writes sent", total=None, visible=writes)
        self._sent = 0
        self._failed = 0

    def total(self, records: int | None, *, estimated: bool = False) -> None:
        with self._lock:
            description = (
                "records read and decided (~ last full run)"
                if estimated
                else "records read and decided"
            )
            self._bar.update(self._records, total=records, description=description)

    def decided(self, records: int) -> None:
        with self._lock:
            self._bar.advance(self._records, records)
            task = self._bar.tasks[self._records]
            if task.total is not None and task.completed > task.total:
                # an estimate, or records with activity that were also among the changed
                self._bar.update(self._records, total=task.completed)

    def sending(self, backlog: int) -> None:
        with self._lock:
            self._bar.update(self._writes, total=self._sent + self._failed + backlog)

    def sent(self, ok: int, failed: int) -> None:
        with self._lock:
            self._sent += ok
            self._failed += failed
            description = (
                f"writes sent ({self._failed} failed, queued)" if self._failed else "writes sent"
            )
            self._bar.update(self._writes, advance=ok + failed, description=description)

    def start(self) -> None:
        self._bar.start()

    def stop(self) -> None:
        with self._lock:
            task = self._bar.tasks[self._records]
            self._bar.update(self._records, total=task.completed)  # the read is complete
        self._bar.stop()


def wanted(console: Console) -> bool:
    """A bar only where a person watches: standard error is a terminal and the logs are
    not JSON lines (they are exactly when it is not, unless a test fixed the format)."""
    return console.is_terminal and not logs.writes_json()


@contextmanager
def bar_for(console: Console, *, writes: bool = True) -> Iterator[SyncBar | None]:
    """The bar, drawn for the block's duration, or None where none is wanted."""
    if not wanted(console):
        yield None
        return
    bar = SyncBar(console, writes=writes)
    bar.start()
    try:
        yield bar
    finally:
        bar.stop()

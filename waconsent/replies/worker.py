"""The reply sender of `waconsent serve`: a thread that runs passes over the queue.

It drains the queue at start, then runs a pass as soon as the receiver queues a reply
(`wake`), and every `poll` seconds besides: for rows queued by other receivers sharing
the store, and for rows whose retry time has come. A rejected token stops it for good
(until a restart with a new token); `health` tells `/healthz`. Modelled on the
revocation dispatcher (`sync.scheduler.RevocationDispatcher`): the worker outlives any
failure of one pass.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from waconsent import logs
from waconsent.connectors.whatsapp_send import CREDENTIALS_FIX
from waconsent.errors import describe
from waconsent.replies.sending import PassSummary

log = logging.getLogger("waconsent.replies")


class ReplyWorker:
    def __init__(
        self, run_pass: Callable[[], PassSummary], *, poll: float = 2.0, after_failure: float = 5.0
    ) -> None:
        self._run_pass = run_pass
        self._poll = poll
        self._after_failure = after_failure
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._stopped_because: str | None = None
        self._thread = threading.Thread(target=self._work, name="replies", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """A reply was queued: send it now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def health(self) -> dict[str, Any]:
        """The replies' part of `/healthz`."""
        if self._stopped_because is not None:
            return {"replies": "stopped", "reason": self._stopped_because, "fix": CREDENTIALS_FIX}
        return {"replies": "sending" if self.alive else "not running"}

    def _work(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            wait = self._poll
            try:
                summary = self._run_pass()
            except Exception as exc:  # noqa: BLE001 - the store busy or gone: try again shortly
                logs.event(log, "replies.pass_failed", logging.ERROR, error=describe(exc))
                wait = self._after_failure
            else:
                if summary.stopped is not None:
                    self._stopped_because = summary.stopped
                    return  # logged with its fix by the pass; nothing can be sent now
                if summary.more:
                    continue
            self._wake.wait(wait)

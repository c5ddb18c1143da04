"""How much the receiver's HTTP server holds, and for how long (deadlines, the connection
cap), and conditions logged once per interval instead of once per connection."""

from __future__ import annotations

import logging
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from waconsent import logs

logger = logging.getLogger("waconsent.web")

# File descriptors kept for everything but client connections: the store's pooled
# connections (SQLite holds three files each), the CRM's HTTP sessions, logs, the listener.
RESERVED_DESCRIPTORS = 128
MOST_CONNECTIONS = 2048


def _spare_descriptors() -> int | None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft - RESERVED_DESCRIPTORS


def connection_cap() -> int:
    """How many client connections to hold at once: three quarters of the descriptors left
    after `RESERVED_DESCRIPTORS`, at most `MOST_CONNECTIONS`, at least 16."""
    spare = _spare_descriptors()
    return MOST_CONNECTIONS if spare is None else max(16, min(MOST_CONNECTIONS, spare * 3 // 4))


def accept_backlog() -> int:
    """The listen backlog, which is also how many connections asyncio accepts in one go
    before the connections closed to make room release their descriptors: the last
    quarter of the spare descriptors, so that held plus just-accepted stay below the limit."""
    spare = _spare_descriptors()
    return MOST_CONNECTIONS if spare is None else max(16, min(MOST_CONNECTIONS, spare // 4))


@dataclass(frozen=True)
class ServerLimits:
    """Deadlines and the connection cap of the receiver's HTTP server.

    Meta sends a delivery's head and body at once over a fast link; a peer that takes
    longer than these deadlines is stalled or hostile, and each second it is waited for
    holds a file descriptor.
    """

    head_timeout: float = 10.0  # connect (or a keep-alive request's first byte) to a full head
    body_timeout: float = 30.0  # a full head to the last body byte
    keep_alive: int = 30  # idle between requests on one connection (Meta reuses them)
    max_connections: int = field(default_factory=connection_cap)
    backlog: int = field(default_factory=accept_backlog)
    log_interval: float = 60.0  # a stall or exhaustion condition is logged once per this


class Throttled:
    """A condition logged at most once per interval, with how often it happened since the
    last line: a flood of stalled connections must not become a flood of log lines."""

    def __init__(
        self, event: str, interval: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.event = event
        self.interval = interval
        self.clock = clock
        self.count = 0
        self.last: float | None = None
        self.lock = threading.Lock()

    def note(self, **fields: Any) -> None:
        with self.lock:
            self.count += 1
            now = self.clock()
            if self.last is not None and now - self.last < self.interval:
                return
            count, self.count, self.last = self.count, 0, now
        logs.event(
            logger, self.event, logging.WARNING, count=count, per_seconds=self.interval, **fields
        )

"""Prometheus metrics of `waconsent webhook` and `waconsent serve`, scraped at `GET /metrics`.

Each app holds its own `CollectorRegistry` (never the process-wide default), so two apps in
one process, and the tests, count apart. Counters are this process's since it started;
what the store knows (the outbox, the last finished runs) is read at scrape time, so every
node sharing the store reports the same values for it, including runs started by
`waconsent sync` from cron.

    waconsent_webhook_deliveries_total{outcome}     POSTs to the webhook path, by outcome
    waconsent_webhook_store_seconds                 parsing and committing one delivery
    waconsent_webhook_items_total{kind}             items newly stored, by kind (statuses
                                                    not worth a row count as plain_status)
    waconsent_consent_signals_total{signal}         newly stored opt_in, opt_out, resume, ...
    waconsent_sync_runs_total{mode,outcome}         runs started by `serve` (ok, partial,
                                                    failed, lock_held)
    waconsent_sync_run_duration_seconds{mode}       their duration
    waconsent_replies_total{outcome}                confirmation replies sent, failed, deferred
    waconsent_outbox_rows{crm,state}                queued writes: pending / permanent
    waconsent_outbox_oldest_age_seconds{crm}        age of the oldest pending write (0: none)
    waconsent_sync_last_success_timestamp_seconds{crm,mode}
                                                    when the newest ok/partial run finished
    waconsent_store_up                              1 when the scrape could read the store
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Counter_
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from waconsent import logs
from waconsent.domain import EventKind, Signal
from waconsent.errors import RunLockHeld
from waconsent.store import monitoring
from waconsent.store.engine import reading

if TYPE_CHECKING:
    from waconsent.replies.sending import PassSummary
    from waconsent.sync.ingest import IngestReport
    from waconsent.sync.report import RunReport

log = logging.getLogger("waconsent.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: every outcome a POST to the webhook path can have, so each series exists from the start
DELIVERY_OUTCOMES = (
    "stored",  # 200, at least one item new to the store
    "duplicate",  # 200, every storable item was already stored (a redelivery)
    "acknowledged",  # 200, nothing worth a row (plain statuses, unknown fields)
    "refused_unsigned",  # 401
    "refused_signature",  # 403
    "too_large",  # 413
    "bad_json",  # 400, signed but not JSON
    "bad_request",  # 400, a malformed Content-Length or a client that went away
    "too_slow",  # 408
    "failed",  # 503, the store unavailable: Meta delivers it again
    "error",  # 500, a bug
)
PLAIN_STATUS = "plain_status"
ITEM_KINDS = (*(kind.value for kind in EventKind), PLAIN_STATUS)
SIGNALS = tuple(signal.value for signal in Signal if signal is not Signal.NONE)
RUN_MODES = ("full", "incremental", "targeted")
REPLY_OUTCOMES = ("sent", "failed", "deferred")
#: a targeted write-back takes about a second, a full run of a large org an hour or more
RUN_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
STORE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    """The metrics of one app; its hooks are cheap and never raise into the caller's path."""

    def __init__(
        self,
        engine: Engine | None = None,
        crm: str | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self._deliveries = Counter(
            "waconsent_webhook_deliveries",
            "Deliveries to the webhook path, by outcome",
            ["outcome"],
            registry=registry,
        )
        self._store_seconds = Histogram(
            "waconsent_webhook_store_seconds",
            "Seconds to parse and commit one signed delivery",
            buckets=STORE_BUCKETS,
            registry=registry,
        )
        self._items = Counter(
            "waconsent_webhook_items",
            "Webhook items newly stored, by kind",
            ["kind"],
            registry=registry,
        )
        self._signals = Counter(
            "waconsent_consent_signals",
            "Consent signals newly stored, by signal",
            ["signal"],
            registry=registry,
        )
        self._runs = Counter(
            "waconsent_sync_runs",
            "Sync runs started by this process",
            ["mode", "outcome"],
            registry=registry,
        )
        self._run_seconds = Histogram(
            "waconsent_sync_run_duration_seconds",
            "Duration of the sync runs of this process",
            ["mode"],
            buckets=RUN_BUCKETS,
            registry=registry,
        )
        self._replies = Counter(
            "waconsent_replies", "Confirmation replies, by outcome", ["outcome"], registry=registry
        )
        for outcome in DELIVERY_OUTCOMES:
            self._deliveries.labels(outcome)
        for kind in ITEM_KINDS:
            self._items.labels(kind)
        for signal in SIGNALS:
            self._signals.labels(signal)
        for mode in RUN_MODES:
            self._run_seconds.labels(mode)
        for outcome in REPLY_OUTCOMES:
            self._replies.labels(outcome)
        if engine is not None:
            registry.register(StoreCollector(engine, crm, clock))

    # ---- hooks ----------------------------------------------------------------------------

    def delivery(self, outcome: str) -> None:
        """A POST that ended before anything was stored (see `DELIVERY_OUTCOMES`)."""
        self._deliveries.labels(outcome).inc()

    def delivered(self, report: IngestReport, seconds: float) -> None:
        """A committed delivery: its outcome, and what it stored that was new."""
        new = report.new_keys
        outcome = (
            "stored" if report.stored else "duplicate" if report.duplicates else "acknowledged"
        )
        self._deliveries.labels(outcome).inc()
        self._store_seconds.observe(seconds)
        if new:  # a batch of 1,000 items: one increment per label, not per item
            fresh = [event for event in report.events if event.key in new]
            for kind, count in Counter_(event.kind.value for event in fresh).items():
                self._items.labels(kind).inc(count)
            for signal, count in Counter_(
                event.signal.value for event in fresh if event.signal is not Signal.NONE
            ).items():
                self._signals.labels(signal).inc(count)
        if report.acknowledged:
            self._items.labels(PLAIN_STATUS).inc(report.acknowledged)

    def timed_run(self, mode: str, run: Callable[[], RunReport]) -> RunReport:
        """Run one sync and count it: by the mode it ran in and its status; a run that
        raised counts as `failed` (or `lock_held`: another node was running) and re-raises."""
        started = time.perf_counter()
        try:
            report = run()
        except RunLockHeld:
            self._run("lock_held", mode, started)
            raise
        except Exception:
            self._run("failed", mode, started)
            raise
        self._run(report.status, report.mode or mode, started)
        return report

    def _run(self, outcome: str, mode: str, started: float) -> None:
        self._runs.labels(mode, outcome).inc()
        self._run_seconds.labels(mode).observe(time.perf_counter() - started)

    def replies(self, summary: PassSummary) -> PassSummary:
        """Count what one pass of the reply sender did; returns the summary unchanged."""
        for outcome in REPLY_OUTCOMES:
            count = getattr(summary, outcome)
            if count:
                self._replies.labels(outcome).inc(count)
        return summary

    def exposition(self) -> bytes:
        """The text format; reads the store (call it off the event loop)."""
        return generate_latest(self.registry)


class StoreCollector(Collector):
    """The gauges read from the store at scrape time. A store that cannot be read gives
    `waconsent_store_up 0` and no other store gauge, never a failed scrape."""

    def __init__(self, engine: Engine, crm: str | None, clock: Callable[[], datetime]) -> None:
        self._engine = engine
        self._crm = crm  # the configured CRM: its outbox series exist even when empty
        self._clock = clock

    def describe(self) -> Iterable[Metric]:
        return []  # values come from the store: nothing to read at registration

    def collect(self) -> Iterator[Metric]:
        try:
            with reading(self._engine) as connection:
                states = monitoring.outbox_state(connection)
                successes = monitoring.last_successes(connection)
        except SQLAlchemyError as exc:
            logs.event(log, "metrics.store_unreadable", logging.WARNING, error=type(exc).__name__)
            yield _gauge("waconsent_store_up", "1 when the scrape could read the store", 0)
            return
        yield _gauge("waconsent_store_up", "1 when the scrape could read the store", 1)
        now = self._clock()
        by_crm = {state.crm: state for state in states}
        if self._crm is not None and self._crm not in by_crm:
            by_crm[self._crm] = monitoring.OutboxState(self._crm, 0, 0, None)
        rows = GaugeMetricFamily(
            "waconsent_outbox_rows", "Writes queued in the outbox", labels=["crm", "state"]
        )
        age = GaugeMetricFamily(
            "waconsent_outbox_oldest_age_seconds",
            "Age of the oldest pending write in the outbox (0: none)",
            labels=["crm"],
        )
        for crm in sorted(by_crm):
            state = by_crm[crm]
            rows.add_metric([crm, "pending"], state.pending)
            rows.add_metric([crm, "permanent"], state.permanent)
            oldest = state.oldest_pending
            age.add_metric([crm], max(0.0, (now - oldest).total_seconds()) if oldest else 0.0)
        yield rows
        yield age
        last = GaugeMetricFamily(
            "waconsent_sync_last_success_timestamp_seconds",
            "When the newest ok or partial run of this mode finished (Unix time)",
            labels=["crm", "mode"],
        )
        for (crm, mode), finished in sorted(successes.items()):
            last.add_metric([crm, mode], finished.timestamp())
        yield last


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)

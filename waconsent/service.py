"""`waconsent serve`: the webhook receiver, the scheduler and the revocation dispatcher together.

Composition only: the receiver stores deliveries, the scheduler starts the nightly full
and the periodic incremental runs, and each stored revocation starts a targeted
write-back for the records of that number at once. With `[replies] enabled`, a reply
worker sends the confirmations of START and STOP the receiver queues (issue 14). The runs
and the replies are counted into the metrics `/metrics` shows (issue 17).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from sqlalchemy import Engine

from waconsent import logs, server, web
from waconsent.config import LoadedConfig
from waconsent.metrics import Metrics
from waconsent.replies.sending import send_due, sender_from_config
from waconsent.replies.worker import ReplyWorker
from waconsent.store import optin as optin_store
from waconsent.store.engine import open_engine
from waconsent.store.runs import node_identity
from waconsent.sync.ingest import IngestReport
from waconsent.sync.run import run_once
from waconsent.sync.scheduler import RevocationDispatcher, build_scheduler

log = logging.getLogger("waconsent.serve")


def purge_optin_requests(engine: Engine) -> int:
    """Issue 15: unconfirmed website opt-in requests go TTL + 30 days after they were made."""
    with engine.begin() as connection:
        deleted = optin_store.purge(connection, datetime.now(UTC))
    if deleted:
        logs.event(log, "serve.optin_purged", deleted=deleted)
    return deleted


def serve(config: LoadedConfig) -> None:
    web.webhook_secrets(config)  # refuse before starting anything
    # issue 14: without WHATSAPP_ACCESS_TOKEN, replies on is refused before anything starts
    sender = sender_from_config(config) if config.settings.replies.enabled else None
    logs.configure(logging.INFO)
    engine = open_engine(config.settings.store.url)
    metrics = Metrics(engine, config.settings.crm_name)  # issue 17
    worker = None
    if sender is not None:  # issue 14
        holder = node_identity()
        worker = ReplyWorker(
            lambda: metrics.replies(send_due(engine, sender, holder, lambda: datetime.now(UTC)))
        )
    dispatcher = RevocationDispatcher(
        lambda keys: metrics.timed_run(
            "targeted", lambda: run_once(config, engine=engine, only_keys=keys)
        )
    )
    scheduler = build_scheduler(
        config.settings.schedule,
        full_run=lambda: metrics.timed_run(
            "full", lambda: run_once(config, full=True, engine=engine)
        ),
        incremental_run=lambda: metrics.timed_run(
            "incremental", lambda: run_once(config, engine=engine)
        ),
        hourly=lambda: purge_optin_requests(engine),
    )  # issue 15

    def on_ingest(report: IngestReport) -> None:
        dispatcher.submit_events(report.events)
        if worker is not None and report.replies_queued:  # issue 14
            worker.wake()

    dispatcher.start()
    scheduler.start()
    if worker is not None:  # issue 14: drains what is queued, then waits for more
        worker.start()
    logs.event(
        log,
        "serve.scheduler_started",
        nightly=config.settings.schedule.nightly,
        timezone=config.settings.schedule.timezone,
        incremental_minutes=config.settings.schedule.incremental_minutes,
    )
    try:
        server.serve(
            config,
            engine=engine,
            on_ingest=on_ingest,
            health=worker.health if worker is not None else None,
            metrics=metrics,
        )
    finally:
        scheduler.shutdown(wait=True)
        dispatcher.stop()
        if worker is not None:  # issue 14
            worker.stop()
        if sender is not None:
            sender.close()
        engine.dispose()

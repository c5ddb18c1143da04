"""`waconsent serve`: the webhook receiver, the scheduler and the revocation dispatcher together.

Composition only: the receiver stores deliveries, the scheduler starts the nightly full
and the periodic incremental runs, and each stored revocation starts a targeted
write-back for the records of that number at once.
"""

from __future__ import annotations

import logging

from waconsent import logs, server, web
from waconsent.config import LoadedConfig
from waconsent.store.engine import open_engine
from waconsent.sync.ingest import IngestReport
from waconsent.sync.run import run_once
from waconsent.sync.scheduler import RevocationDispatcher, build_scheduler

log = logging.getLogger("waconsent.serve")


def serve(config: LoadedConfig) -> None:
    web.webhook_secrets(config)  # refuse before starting anything
    logs.configure(logging.INFO)
    engine = open_engine(config.settings.store.url)
    dispatcher = RevocationDispatcher(
        lambda keys: run_once(config, engine=engine, only_keys=keys))
    scheduler = build_scheduler(
        config.settings.schedule,
        full_run=lambda: run_once(config, full=True, engine=engine),
        incremental_run=lambda: run_once(config, engine=engine))

    def on_ingest(report: IngestReport) -> None:
        dispatcher.submit_events(report.events)

    dispatcher.start()
    scheduler.start()
    logs.event(log, "serve.scheduler_started", nightly=config.settings.schedule.nightly,
                  timezone=config.settings.schedule.timezone,
                  incremental_minutes=config.settings.schedule.incremental_minutes)
    try:
        server.serve(config, engine=engine, on_ingest=on_ingest)
    finally:
        scheduler.shutdown(wait=True)
        dispatcher.stop()
        engine.dispose()

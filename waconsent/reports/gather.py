"""Fill `ReportData` from the store (the run history) and the CRM (the flagged records), and
write the page. The I/O edge of `waconsent report html`.

The flagged records are read live, as `report missing-proof` reads them: every record once,
each opted-in one checked with the rules' own `proof_gaps`, so the page shows what the CRM
holds now, not what some run saw. On Salesforce and Dynamics that read costs what a full read
costs (one call per 2,000 or 5,000 records).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine

from waconsent.config import LoadedConfig
from waconsent.domain import CrmRecord, jsonable
from waconsent.errors import ConfigError
from waconsent.reports.model import Flagged, ReportData, Run
from waconsent.store import runs as run_store
from waconsent.store.engine import reading
from waconsent.sync.rules import proof_gaps

KEEP_FLAGGED = 5000  # rows kept for the page; the count is always complete


def flagged_records(
    records: Iterable[CrmRecord], keep: int = KEEP_FLAGGED
) -> tuple[list[Flagged], int]:
    """Opted-in records whose proof is incomplete (SPEC 5.7), the first `keep`, and how many."""
    found: list[Flagged] = []
    total = 0
    for record in records:
        if record.get("opt_in") is not True:
            continue
        gaps = proof_gaps(record.fields)
        if not gaps:
            continue
        total += 1
        if len(found) < keep:
            date = jsonable(record.get("opt_in_date"))
            source = record.get("opt_in_source")
            found.append(
                Flagged(
                    record.record_id,
                    record.name,
                    None if date is None else str(date),
                    source if isinstance(source, str) else None,
                    tuple(gaps),
                )
            )
    return found, total


def run_history(engine: Engine, crm: str, since: datetime) -> list[Run]:
    with reading(engine) as connection:
        rows = run_store.finished_since(connection, crm, since)
    return [
        Run(row.id, row.started_at, row.mode, row.status, row.counts or {}, row.error)
        for row in rows
    ]


def gather(config: LoadedConfig, engine: Engine, now: datetime, days: int = 30) -> ReportData:
    """The run history of the configured CRM over `days`, and its flagged records now."""
    from waconsent.connectors import open_crm

    settings = config.settings
    history = run_history(engine, settings.crm_name, now - timedelta(days=days))
    connector = open_crm(config, engine)
    try:
        flagged, total = flagged_records(connector.read_all())
    finally:
        connector.close()
    return ReportData(now, settings.crm_name, history, flagged, total, days)


def write_private(path: Path, text: str) -> None:
    """Write the page readable by its owner only (it names contacts), replacing any old one
    at once: a reader never sees half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise ConfigError([f"--out: cannot write {path}: {exc.strerror or exc}"]) from None

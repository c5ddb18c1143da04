"""Commands that run syncs and show them: `sync` and `runs`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from waconsent.cli.base import (
    EXIT_WRITES_FAILED,
    Failed,
    config_of,
    engine_of,
    err,
    guarded,
    main,
    out,
)
from waconsent.cli.progress import bar_for
from waconsent.domain import CrmRecord, Decision, jsonable
from waconsent.store import runs as run_store
from waconsent.store.engine import reading
from waconsent.sync.report import RunReport
from waconsent.sync.run import run_once


@main.command()
@click.option("--full", is_flag=True, help="Read every record, not only what changed.")
@click.option("--dry-run", is_flag=True, help="Print the field-level diff; write nothing.")
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the run report as JSON to this file.",
)
@click.pass_context
@guarded
def sync(ctx: click.Context, full: bool, dry_run: bool, report_path: str | None) -> None:
    """One reconciliation run: read, match, decide, write back, report.

    On a terminal a progress bar shows records read and decided, writes sent, the rate and,
    where the CRM tells the total, an ETA."""
    loaded = config_of(ctx)
    diff_rows: list[tuple[str, str, str, str, str]] = []

    def on_decision(record: CrmRecord, decision: Decision) -> None:
        for change in decision.changes:
            diff_rows.append(
                (
                    record.record_id,
                    change.field,
                    _show(change.old),
                    _show(change.new),
                    change.reason,
                )
            )

    with bar_for(err, writes=not dry_run) as bar:  # issue 17: on a terminal only
        report = run_once(
            loaded,
            full=full,
            dry_run=dry_run,
            on_decision=on_decision if dry_run else None,
            progress=bar,
        )
    if dry_run:
        _print_diff(diff_rows)
    _print_summary(report)
    if report_path:
        Path(report_path).write_text(
            json.dumps(report.as_dict(), indent=2, default=str), encoding="utf-8"
        )
    if report.writes_failed or report.records_failed:
        raise Failed(EXIT_WRITES_FAILED)


def _show(value: Any) -> str:
    return "∅" if value is None else str(jsonable(value))


def _print_diff(rows: list[tuple[str, str, str, str, str]]) -> None:
    """One plain line per field change, so the diff can be grepped and never wraps."""
    click.echo(f"dry run: {len(rows)} field changes would be written (nothing written)")
    for record_id, field_name, old, new, why in rows:
        click.echo(f"  {record_id}  {field_name}: {old} -> {new}  ({why})")


def _print_summary(report: RunReport) -> None:
    table = Table(
        title=f"sync run {report.run_id or '(dry run)'}: {report.mode}, {report.status}",
        show_header=False,
    )
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_column("who")
    rows = [
        ("records read", report.records_read, ""),
        ("events considered", report.events_considered, ""),
        ("revoked (STOP and equivalents)", report.revocations, ", ".join(report.revoked)),
        ("opted in on WhatsApp", report.opt_ins, ", ".join(report.opted_in)),
        ("open 24-hour sessions", report.sessions_open, ", ".join(report.open_sessions)),
        ("sessions updated", report.sessions_updated, ""),
        ("opted in but proof missing", report.proof_missing, ", ".join(report.missing_proof)),
        ("proof flags cleared", report.proof_cleared, ""),
        (
            "conflicts (the CRM stands)",
            len(report.conflicts),
            "; ".join(c["record"] for c in report.conflicts),
        ),
        (
            "numbers with activity but no record",
            report.unmatched_numbers,
            ", ".join(report.unmatched),
        ),
        (
            "unparseable phone values (skipped)",
            len(report.phone_problems),
            ", ".join(f"{p['record_id']}.{p['field']}={p['value']}" for p in report.phone_problems),
        ),
        ("number changes reported", len(report.number_changes), ""),
        (
            "writes sent / failed",
            f"{report.writes_sent} / {report.writes_failed}",
            "; ".join(f"{e['record_id']}: {e['code']}" for e in report.write_errors),
        ),
        (
            "queued writes dropped (record changed since)",
            report.writes_superseded,
            ", ".join(report.superseded),
        ),
        (
            "records not decided (their data is out of range)",
            report.records_failed,
            ", ".join(f"{e['record_id']}: {e['error']}" for e in report.record_errors),
        ),
        ("API calls", report.api_calls, ""),
    ]
    for what, count, who in rows:
        table.add_row(what, str(count), who)
    out.print(table)
    for conflict in report.conflicts:
        out.print(f"conflict: {conflict['record']}: {conflict['conflict']}")


# ---- runs, reports, proof, verify -----------------------------------------------------------


@main.command()
@click.option("--limit", default=20, show_default=True)
@click.pass_context
@guarded
def runs(ctx: click.Context, limit: int) -> None:
    """History of sync runs with their counts."""
    engine = engine_of(config_of(ctx))
    try:
        with reading(engine) as connection:
            history = run_store.history(connection, limit)
    finally:
        engine.dispose()
    table = Table(title="sync runs (newest first)")
    for column in (
        "id",
        "started",
        "mode",
        "status",
        "read",
        "revoked",
        "opt-ins",
        "sent",
        "failed",
        "api calls",
    ):
        table.add_column(column)
    for row in history:
        counts = row.counts or {}
        table.add_row(
            str(row.id),
            str(jsonable(row.started_at)),
            row.mode,
            row.status,
            *(
                str(counts.get(k, ""))
                for k in (
                    "records_read",
                    "revocations",
                    "opt_ins",
                    "writes_sent",
                    "writes_failed",
                    "api_calls",
                )
            ),
        )
    out.print(table)

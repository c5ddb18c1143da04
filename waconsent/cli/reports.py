"""Commands for the admin and the data-protection officer: reports, proof, the chain."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import click
from rich.table import Table

from waconsent.cli.base import (
    EXIT_USAGE,
    Failed,
    config_of,
    engine_of,
    err,
    guarded,
    main,
    now,
    out,
)
from waconsent.connectors import open_crm
from waconsent.csvfiles import LINE_END, csv_cell
from waconsent.errors import ConfigError
from waconsent.phones import lookup_keys, mask
from waconsent.reports.gather import flagged_records, gather, write_private
from waconsent.reports.page import render
from waconsent.store import evidence as evidence_store
from waconsent.store import proof as proof_store
from waconsent.store.engine import reading


@main.group()
def report() -> None:
    """Reports for the admin and the data-protection officer."""


@report.command(name="missing-proof")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
)
@click.pass_context
@guarded
def missing_proof(ctx: click.Context, fmt: str) -> None:
    """Opted-in contacts whose consent proof is incomplete (SPEC 5.7)."""
    loaded = config_of(ctx)
    engine = engine_of(loaded)
    try:
        connector = open_crm(loaded, engine)
        try:
            flagged, _ = flagged_records(connector.read_all(), keep=sys.maxsize)
        finally:
            connector.close()
    finally:
        engine.dispose()
    if fmt == "json":
        click.echo(
            json.dumps(
                [
                    {
                        "id": f.record_id,
                        "name": f.name,
                        "opt_in_date": f.opt_in_date,
                        "opt_in_source": f.opt_in_source,
                        "missing": list(f.missing),
                    }
                    for f in flagged
                ],
                indent=2,
                ensure_ascii=False,
            )
        )
        return
    rows = [
        (
            f.record_id,
            f.name or "",
            f.opt_in_date or "",
            f.opt_in_source or "",
            "; ".join(f.missing),
        )
        for f in flagged
    ]
    if fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator=LINE_END)
        writer.writerow(["id", "name", "opt_in_date", "opt_in_source", "missing"])
        for row in rows:  # CRM values: a would-be formula is written as text
            writer.writerow([csv_cell(value) for value in row])
        return
    table = Table(title=f"{len(rows)} opted-in contacts with incomplete proof")
    for column in ("id", "name", "opt-in date", "source", "missing"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    out.print(table)


@main.command()
@click.argument("phone")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
@click.pass_context
@guarded
def proof(ctx: click.Context, phone: str, fmt: str) -> None:
    """Every piece of evidence held for one number, oldest first."""
    loaded = config_of(ctx)
    try:
        keys = lookup_keys(phone, loaded.settings.mapping.default_region)
    except ValueError as exc:
        raise ConfigError([f"PHONE: {exc}"]) from None
    engine = engine_of(loaded)
    try:
        with reading(engine) as connection:
            rows = proof_store.evidence_for(connection, keys)
    finally:
        engine.dispose()
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False, default=str))
        return
    shown = keys[0] if keys[0].startswith("uid:") else mask(keys[0])
    table = Table(title=f"evidence for {shown} ({len(rows)} entries, oldest first)")
    for column in ("when", "what", "detail", "id"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["at"], row["what"], row["detail"], row["id"])
    out.print(table)


@main.command(name="verify-ledger")
@click.pass_context
@guarded
def verify_ledger(ctx: click.Context) -> None:
    """Check the evidence hash chain; exit 1 on any altered or missing row."""
    engine = engine_of(config_of(ctx))
    try:
        with reading(engine) as connection:
            problems = evidence_store.verify(connection)
            total = evidence_store.chain_length(connection)
    finally:
        engine.dispose()
    if problems:
        for problem in problems:
            where = f"row {problem.row_id}" if problem.row_id else "chain"
            err.print(f"{where}: {problem.problem}")
        raise Failed(EXIT_USAGE)
    out.print(f"evidence chain intact: {total} rows verified")


@report.command(name="html")
@click.option(
    "--out",
    "out_file",
    type=click.Path(dir_okay=False),
    required=True,
    help="The HTML file to write (replaced if it exists; readable by you only).",
)
@click.option(
    "--days",
    default=30,
    show_default=True,
    type=click.IntRange(1, 3660),
    help="How far back the trend chart reaches.",
)
@click.pass_context
@guarded
def report_html(ctx: click.Context, out_file: str, days: int) -> None:
    """One self-contained page for the data-protection officer: the last run's numbers, the
    trend, the records whose proof is missing, conflicts, unmatched numbers (masked)."""
    loaded = config_of(ctx)
    engine = engine_of(loaded)
    try:
        data = gather(loaded, engine, now(), days)
    finally:
        engine.dispose()
    write_private(Path(out_file), render(data))
    last = data.last
    out.print(
        f"wrote {out_file}: "
        + (
            f"last run #{last.id} ({last.mode}, {last.status}), "
            if last
            else "no finished run yet, "
        )
        + f"{len(data.runs)} runs in {days} days, {data.flagged_total} records with "
        "proof missing"
    )

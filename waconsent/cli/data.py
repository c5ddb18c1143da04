"""Commands that load and unload data: webhook archives and the ledger's own contacts."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import click

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
from waconsent.contacts_csv import read_contacts_csv
from waconsent.csvfiles import LINE_END, csv_cell, decode_csv, printable
from waconsent.domain import jsonable
from waconsent.errors import InputError
from waconsent.replies.policy import reply_policy
from waconsent.store.contacts import CSV_COLUMNS, export_rows, import_contacts
from waconsent.sync.ingest import archive_payloads, ingest_payload, keyword_rules


def _read(name: str) -> bytes:
    """The bytes of a file, or of standard input for '-'."""
    if name == "-":
        return sys.stdin.buffer.read()
    return Path(name).read_bytes()


@main.command(name="import")
@click.argument("files", nargs=-1, required=True, type=click.Path(allow_dash=True))
@click.pass_context
@guarded
def import_(ctx: click.Context, files: tuple[str, ...]) -> None:
    """Load archived webhook payloads (JSON, JSON array or NDJSON; - for stdin), deduplicated."""

    loaded = config_of(ctx)
    engine = engine_of(loaded)
    keywords = keyword_rules(loaded.settings)
    replies = reply_policy(loaded.settings)  # issue 14: only events younger than max_age
    anything_skipped = False
    try:
        for name in files:
            shown = printable(name)
            try:
                # a byte that is not UTF-8 becomes a lone surrogate: only an item that
                # would store it is skipped (by the parser), not the file
                text = _read(name).decode("utf-8", "surrogateescape").removeprefix("\ufeff")
            except OSError as exc:
                err.print(f"{shown}: cannot read: {exc.strerror or type(exc).__name__}")
                anything_skipped = True
                continue
            stored = duplicates = acknowledged = skipped = 0
            try:
                for where, payload, problem in archive_payloads(text, shown):
                    if problem:
                        err.print(f"{where}: {problem}")
                        skipped += 1
                        continue
                    result = ingest_payload(
                        engine, payload, keywords, f"import:{name}", now, replies=replies
                    )
                    stored += result.stored
                    duplicates += result.duplicates
                    acknowledged += result.acknowledged
                    for item in result.skipped:
                        err.print(f"{where}: skipped {item.location}: {item.reason}")
                    skipped += len(result.skipped)
            finally:  # also when the store fails midway: what was stored is stored
                anything_skipped |= skipped > 0
                out.print(
                    f"{shown}: {stored} stored, {duplicates} duplicates, "
                    f"{acknowledged} acknowledged, {skipped} skipped"
                )
    finally:
        engine.dispose()
    if anything_skipped:
        raise Failed(EXIT_USAGE)


# ---- contacts -------------------------------------------------------------------------------


@main.group()
def contacts() -> None:
    """The ledger's own contacts (for companies without a CRM)."""


@contacts.command(name="import")
@click.argument("file", type=click.Path(allow_dash=True))
@click.pass_context
@guarded
def contacts_import(ctx: click.Context, file: str) -> None:
    """Load contacts from a CSV (header: id, name, mobile_phone, phone, opt_in, ...)."""
    loaded = config_of(ctx)
    shown = printable(file)
    try:
        data = _read(file)
    except OSError as exc:
        raise InputError(f"{shown}: cannot read: {exc.strerror or type(exc).__name__}") from None
    rows, report = read_contacts_csv(
        decode_csv(data), loaded.settings.mapping.default_region, shown
    )
    engine = engine_of(loaded)
    try:
        import_contacts(engine, rows, report, now(), shown)
    finally:  # also when the store fails midway: the chunks before it are committed
        engine.dispose()
        for warning in report.warnings:
            err.print(f"warning: {warning}")
        for refused in report.refused:
            err.print(f"refused: {refused}")
        out.print(
            f"{shown}: {report.imported} contacts imported, {len(report.refused)} "
            f"refused, {len(report.warnings)} warnings"
        )
    if report.refused:
        raise Failed(EXIT_USAGE)


@contacts.command(name="export")
@click.option(
    "--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True
)
@click.pass_context
@guarded
def contacts_export(ctx: click.Context, fmt: str) -> None:
    """Write the ledger's contacts with every consent field to standard output (CSV cells
    that a spreadsheet would run as a formula start with an apostrophe)."""
    engine = engine_of(config_of(ctx))
    try:
        rows = ({k: jsonable(v) for k, v in row.items()} for row in export_rows(engine))
        if fmt == "json":
            click.echo(json.dumps(list(rows), indent=2, ensure_ascii=False))
        else:
            writer = csv.DictWriter(
                sys.stdout, fieldnames=list(CSV_COLUMNS), lineterminator=LINE_END
            )
            writer.writeheader()
            for row in rows:
                writer.writerow(
                    {
                        k: ""
                        if v is None
                        else str(v).lower()
                        if isinstance(v, bool)
                        else csv_cell(str(v))
                        for k, v in row.items()
                    }
                )
    finally:
        engine.dispose()

"""The `waconsent` command: thin shells over sync and store, mapping errors to exit codes.

Exit codes (SPEC section 3): 0 done; 1 usage or configuration error (also: an input
file had parts that were skipped; click's own usage errors, which it exits with 2, are
mapped here); 2 the run finished but some writes failed (they stay queued) or some
records could not be decided; 3 the run could not proceed (authentication, connection,
lock held, the store busy or read-only, an unexpected error). No error path prints an
exception's message unless it is one of ours: others are named by type and code.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import sys
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from waconsent import __version__, config, logs
from waconsent.config import LoadedConfig
from waconsent.domain import CrmRecord, Decision, jsonable
from waconsent.errors import ConfigError, FatalError, InputError, WaconsentError, describe
from waconsent.phones import UnparseablePhone, mask, phone_key, user_id_key
from waconsent.store.engine import open_engine, reading, store_failure

EXIT_OK, EXIT_USAGE, EXIT_WRITES_FAILED, EXIT_CANNOT_PROCEED = 0, 1, 2, 3
# markup off: what is printed quotes file names and CSV cells, whose "[" is no style
out = Console(highlight=False, soft_wrap=True, markup=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)
F = TypeVar("F", bound=Callable[..., Any])
# RFC 4180's line end. The csv module quotes a value only for the characters of its line
# end: with a bare "\n" a value holding a carriage return went out unquoted, and a
# spreadsheet broke the row there.
CSV_LINE_END = "\r\n"


class Failed(click.exceptions.Exit):
    """Leave with an exit code after the message was printed."""


_EXITING_1: dict[type[click.UsageError], type[click.UsageError]] = {}


def _usage_exit_1(exc: click.UsageError) -> click.UsageError:
    """The same usage error (its text, its way of showing itself), exiting 1."""
    kind = type(exc)
    if kind.exit_code != EXIT_USAGE:
        if kind not in _EXITING_1:
            _EXITING_1[kind] = type(kind.__name__, (kind,), {"exit_code": EXIT_USAGE})
        exc.__class__ = _EXITING_1[kind]
    return exc


class Group(click.Group):
    """click exits 2 on a usage error, which SPEC section 3 gives to "some writes failed";
    here a usage error exits 1, like any other error in how the command was called."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            raise _usage_exit_1(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # raised while parsing a subcommand's arguments
            raise _usage_exit_1(exc) from None


def _fail(message: str, code: int) -> Failed:
    err.print(Text.assemble(("error: ", "bold red"), message))
    return Failed(code)


def _internal(exc: BaseException) -> Failed:
    """An error outside the tree (a bug, or a store error that is not about the store's
    state): its type and where it happened, never its message, which may quote SQL
    parameters or payload values."""
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    where = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    return _fail(f"internal error: {describe(exc)} at {where} (its message is withheld: it "
                 "may hold personal data)", EXIT_CANNOT_PROCEED)


def guarded(fn: F) -> F:
    """Map the exception tree to exit codes, once, for every command."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            raise _fail(str(exc), EXIT_USAGE) from None
        except InputError as exc:
            raise _fail(str(exc), EXIT_USAGE) from None
        except FatalError as exc:
            raise _fail(f"{exc} (nothing queued was lost; run again when resolved)",
                        EXIT_CANNOT_PROCEED) from None
        except WaconsentError as exc:
            raise _fail(str(exc), EXIT_CANNOT_PROCEED) from None
        except DBAPIError as exc:  # the store busy, read-only, gone: a sentence, exit 3
            failure = store_failure(exc)
            if failure is None:
                raise _internal(exc) from None
            raise _fail(f"{failure} (nothing queued was lost; run again when resolved)",
                        EXIT_CANNOT_PROCEED) from None
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:
            raise _internal(exc) from None

    return wrapper  # type: ignore[return-value]


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Configuration file (else $WACONSENT_CONFIG, else ./waconsent.toml).")
@click.option("-v", "--verbose", is_flag=True, help="Log progress to standard error.")
@click.version_option(__version__, prog_name="waconsent")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, verbose: bool) -> None:
    """Keep WhatsApp consent in the CRM true and provable."""
    # the receiver and `serve` always log their events; other commands on -v
    service = ctx.invoked_subcommand in ("webhook", "serve")
    logs.configure(logging.INFO if verbose or service else logging.WARNING)
    ctx.obj = config_path


def _config(ctx: click.Context) -> LoadedConfig:
    root = ctx.find_root()
    return config.load(root.obj)


def _remember_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    """`--config` given after a command word: the same file as before it. Both, naming
    different files, is a usage error rather than a guess."""
    if value is None:
        return
    root = ctx.find_root()
    if root.obj is not None and root.obj != value:
        raise click.UsageError(f"--config given twice: {root.obj} and {value}; pass it once")
    root.obj = value


def _accept_config_everywhere(group: click.Group) -> None:
    """Every command and sub-command takes `--config PATH` after its own name too
    (`waconsent sync --config prod.toml`), as README promises; added here, once, so no
    command can forget it."""
    for command in group.commands.values():
        command.params.append(click.Option(
            ["--config", "config_after_command"], type=click.Path(dir_okay=False),
            expose_value=False, callback=_remember_config,
            help="Configuration file (else $WACONSENT_CONFIG, else ./waconsent.toml)."))
        if isinstance(command, click.Group):
            _accept_config_everywhere(command)


def _engine(loaded: LoadedConfig) -> Engine:
    try:
        return open_engine(loaded.settings.store.url)
    except ConfigError as exc:  # a store.url the ledger cannot use: name the file too
        raise ConfigError(exc.problems, source=exc.source or str(loaded.path or "")) from None


def _now() -> datetime:
    return datetime.now(UTC)


# ---- init -----------------------------------------------------------------------------------

@main.command()
@click.option("--preset", type=click.Choice(["ledger", "salesforce", "dynamics"]),
              default="ledger", show_default=True)
@click.option("--path", "target", type=click.Path(dir_okay=False), default=None,
              help="Where to write (default: the --config path or ./waconsent.toml).")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.pass_context
@guarded
def init(ctx: click.Context, preset: str, target: str | None, force: bool) -> None:
    """Write a commented starter configuration."""
    path = Path(target or config.loading.resolve_path(ctx.find_root().obj))
    if path.exists() and not force:
        raise ConfigError([f"{path} exists; pass --force to overwrite it or --path for "
                           "another file"])
    text = resources.files("waconsent.config").joinpath(f"presets/{preset}.toml").read_text(
        encoding="utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    out.print(f"wrote {path} (preset {preset}); edit it, then run `waconsent "
              f"--config {path} sync --dry-run`")


# ---- import ---------------------------------------------------------------------------------

def _not_json(exc: ValueError | RecursionError) -> str:
    """Why a document is not usable JSON, without quoting it."""
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON ({exc.msg} at column {exc.colno})"
    if isinstance(exc, RecursionError):
        return "not usable JSON (nested too deeply)"
    return f"not usable JSON ({type(exc).__name__})"


def _payloads(text: str, name: str) -> Iterator[tuple[str, Any, str | None]]:
    """(where, payload, None) per payload, or (where, None, reason) for a line that is no
    usable JSON; `where` is FILE:LINE for NDJSON, FILE or FILE[index] for a document.

    The whole text is tried first as one JSON document (an object or an array of
    objects); failing that, it is read as NDJSON, one payload a line. Lines end at "\n"
    only: JSON text may hold U+2028 or a form feed, which `str.splitlines` would split on.
    """
    from waconsent.connectors.webhook_signature import decode_json

    if not text.strip():
        return
    try:
        document = decode_json(text)
    except (ValueError, RecursionError):
        pass
    else:
        if isinstance(document, list):
            yield from ((f"{name}[{index}]", item, None) for index, item in enumerate(document))
        else:
            yield name, document, None
        return
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            yield where, decode_json(line), None
        except (ValueError, RecursionError) as exc:
            yield where, None, _not_json(exc)


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
    from waconsent.connectors.ledger import printable
    from waconsent.sync.ingest import ingest_payload, keyword_rules

    loaded = _config(ctx)
    engine = _engine(loaded)
    keywords = keyword_rules(loaded.settings)
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
            stored = duplicates = skipped = 0
            try:
                for where, payload, problem in _payloads(text, shown):
                    if problem:
                        err.print(f"{where}: {problem}")
                        skipped += 1
                        continue
                    result = ingest_payload(engine, payload, keywords, f"import:{name}", _now)
                    stored += result.stored
                    duplicates += result.duplicates
                    for item in result.skipped:
                        err.print(f"{where}: skipped {item.location}: {item.reason}")
                    skipped += len(result.skipped)
            finally:  # also when the store fails midway: what was stored is stored
                anything_skipped |= skipped > 0
                out.print(f"{shown}: {stored} stored, {duplicates} duplicates, {skipped} skipped")
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
    from waconsent.connectors.ledger import (
        decode_csv,
        import_contacts,
        printable,
        read_contacts_csv,
    )

    loaded = _config(ctx)
    shown = printable(file)
    try:
        data = _read(file)
    except OSError as exc:
        raise InputError(f"{shown}: cannot read: {exc.strerror or type(exc).__name__}") from None
    rows, report = read_contacts_csv(decode_csv(data), loaded.settings.mapping.default_region,
                                     shown)
    engine = _engine(loaded)
    try:
        import_contacts(engine, rows, report, _now(), shown)
    finally:  # also when the store fails midway: the chunks before it are committed
        engine.dispose()
        for warning in report.warnings:
            err.print(f"warning: {warning}")
        for refused in report.refused:
            err.print(f"refused: {refused}")
        out.print(f"{shown}: {report.imported} contacts imported, {len(report.refused)} "
                  f"refused, {len(report.warnings)} warnings")
    if report.refused:
        raise Failed(EXIT_USAGE)


@contacts.command(name="export")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv",
              show_default=True)
@click.pass_context
@guarded
def contacts_export(ctx: click.Context, fmt: str) -> None:
    """Write the ledger's contacts with every consent field to standard output (CSV cells
    that a spreadsheet would run as a formula start with an apostrophe)."""
    from waconsent.connectors.ledger import CSV_COLUMNS, csv_cell, export_rows

    engine = _engine(_config(ctx))
    try:
        rows = ({k: jsonable(v) for k, v in row.items()} for row in export_rows(engine))
        if fmt == "json":
            click.echo(json.dumps(list(rows), indent=2, ensure_ascii=False))
        else:
            writer = csv.DictWriter(sys.stdout, fieldnames=list(CSV_COLUMNS),
                                    lineterminator=CSV_LINE_END)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: "" if v is None else str(v).lower()
                                 if isinstance(v, bool) else csv_cell(str(v))
                                 for k, v in row.items()})
    finally:
        engine.dispose()


# ---- sync -----------------------------------------------------------------------------------

@main.command()
@click.option("--full", is_flag=True, help="Read every record, not only what changed.")
@click.option("--dry-run", is_flag=True, help="Print the field-level diff; write nothing.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Write the run report as JSON to this file.")
@click.pass_context
@guarded
def sync(ctx: click.Context, full: bool, dry_run: bool, report_path: str | None) -> None:
    """One reconciliation run: read, match, decide, write back, report."""
    from waconsent.sync.run import run_once

    loaded = _config(ctx)
    diff_rows: list[tuple[str, str, str, str, str]] = []

    def on_decision(record: CrmRecord, decision: Decision) -> None:
        for change in decision.changes:
            diff_rows.append((record.record_id, change.field, _show(change.old),
                              _show(change.new), change.reason))

    report = run_once(loaded, full=full, dry_run=dry_run,
                      on_decision=on_decision if dry_run else None)
    if dry_run:
        _print_diff(diff_rows)
    _print_summary(report)
    if report_path:
        Path(report_path).write_text(json.dumps(report.as_dict(), indent=2, default=str),
                                     encoding="utf-8")
    if report.writes_failed or report.records_failed:
        raise Failed(EXIT_WRITES_FAILED)


def _show(value: Any) -> str:
    return "∅" if value is None else str(jsonable(value))


def _print_diff(rows: list[tuple[str, str, str, str, str]]) -> None:
    """One plain line per field change, so the diff can be grepped and never wraps."""
    click.echo(f"dry run: {len(rows)} field changes would be written (nothing written)")
    for record_id, field_name, old, new, why in rows:
        click.echo(f"  {record_id}  {field_name}: {old} -> {new}  ({why})")


def _print_summary(report: Any) -> None:
    table = Table(title=f"sync run {report.run_id or '(dry run)'}: {report.mode}, "
                        f"{report.status}", show_header=False)
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
        ("conflicts (the CRM stands)", len(report.conflicts),
         "; ".join(c["record"] for c in report.conflicts)),
        ("numbers with activity but no record", report.unmatched_numbers,
         ", ".join(report.unmatched)),
        ("unparseable phone values (skipped)", len(report.phone_problems),
         ", ".join(f"{p['record_id']}.{p['field']}={p['value']}"
                   for p in report.phone_problems)),
        ("number changes reported", len(report.number_changes), ""),
        ("writes sent / failed", f"{report.writes_sent} / {report.writes_failed}",
         "; ".join(f"{e['record_id']}: {e['code']}" for e in report.write_errors)),
        ("queued writes dropped (record changed since)", report.writes_superseded,
         ", ".join(report.superseded)),
        ("records not decided (their data is out of range)", report.records_failed,
         ", ".join(f"{e['record_id']}: {e['error']}" for e in report.record_errors)),
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
    from waconsent.store import runs as run_store

    engine = _engine(_config(ctx))
    try:
        with reading(engine) as connection:
            history = run_store.history(connection, limit)
    finally:
        engine.dispose()
    table = Table(title="sync runs (newest first)")
    for column in ("id", "started", "mode", "status", "read", "revoked", "opt-ins",
                   "sent", "failed", "api calls"):
        table.add_column(column)
    for row in history:
        counts = row.counts or {}
        table.add_row(str(row.id), str(jsonable(row.started_at)), row.mode, row.status,
                      *(str(counts.get(k, "")) for k in ("records_read", "revocations",
                                                          "opt_ins", "writes_sent",
                                                          "writes_failed", "api_calls")))
    out.print(table)


@main.group()
def report() -> None:
    """Reports for the admin and the data-protection officer."""


@report.command(name="missing-proof")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True)
@click.pass_context
@guarded
def missing_proof(ctx: click.Context, fmt: str) -> None:
    """Opted-in contacts whose consent proof is incomplete (SPEC 5.7)."""
    from waconsent.connectors import open_crm
    from waconsent.sync.rules import proof_gaps

    loaded = _config(ctx)
    engine = _engine(loaded)
    found: list[dict[str, Any]] = []
    try:
        connector = open_crm(loaded, engine)
        try:
            for record in connector.read_all():
                if record.get("opt_in") is True and (gaps := proof_gaps(record.fields)):
                    found.append({"id": record.record_id, "name": record.name,
                                  "opt_in_date": jsonable(record.get("opt_in_date")),
                                  "opt_in_source": record.get("opt_in_source"),
                                  "missing": gaps})
        finally:
            connector.close()
    finally:
        engine.dispose()
    if fmt == "json":
        click.echo(json.dumps(found, indent=2, ensure_ascii=False))
    elif fmt == "csv":
        from waconsent.connectors.ledger import csv_cell

        writer = csv.writer(sys.stdout, lineterminator=CSV_LINE_END)
        writer.writerow(["id", "name", "opt_in_date", "opt_in_source", "missing"])
        for row in found:  # CRM values: a would-be formula is written as text
            writer.writerow([csv_cell(str(value)) for value in (
                row["id"], row["name"] or "", row["opt_in_date"] or "",
                row["opt_in_source"] or "", "; ".join(row["missing"]))])
    else:
        table = Table(title=f"{len(found)} opted-in contacts with incomplete proof")
        for column in ("id", "name", "opt-in date", "source", "missing"):
            table.add_column(column)
        for row in found:
            table.add_row(row["id"], row["name"] or "", str(row["opt_in_date"] or ""),
                          row["opt_in_source"] or "", "; ".join(row["missing"]))
        out.print(table)


def proof_keys(text: str, default_region: str) -> list[str]:
    """A number in any spelling, a wa_id (digits without '+'), or a business-scoped user id."""
    value = text.strip()
    candidate = "+" + value if value.isdigit() and not value.startswith("0") else value
    try:
        return [phone_key(candidate, default_region)]
    except UnparseablePhone:
        if "." in value and " " not in value:
            return [user_id_key(value) or value]
        raise ConfigError([f"PHONE: {mask(value)} is neither a phone number nor a WhatsApp "
                           "user id (such as US.1234...)"]) from None


@main.command()
@click.argument("phone")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
@click.pass_context
@guarded
def proof(ctx: click.Context, phone: str, fmt: str) -> None:
    """Every piece of evidence held for one number, oldest first."""
    from waconsent.store import proof as proof_store

    loaded = _config(ctx)
    keys = proof_keys(phone, loaded.settings.mapping.default_region)
    engine = _engine(loaded)
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
    from waconsent.store import evidence as evidence_store

    engine = _engine(_config(ctx))
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


@main.command()
@click.pass_context
@guarded
def check(ctx: click.Context) -> None:
    """Validate the config, connect, and check every mapped field against the CRM's metadata."""
    from waconsent.config.check import problem_lines
    from waconsent.connectors import open_crm

    loaded = _config(ctx)
    out.print(f"configuration {loaded.path}: valid")
    engine = _engine(loaded)
    try:
        out.print(f"store {engine.url.render_as_string(hide_password=True)}: reachable, migrated")
        connector = open_crm(loaded, engine)
        try:
            # the very verdicts preflight raises before every run: one checker, one answer
            verdicts = connector.mapping_verdicts()
        finally:
            connector.close()
    finally:
        engine.dispose()
    table = Table(title=f"{loaded.settings.crm.kind}: the mapping against the CRM's metadata")
    for column in ("key", "CRM field", "type", "verdict"):
        table.add_column(column)
    for verdict in verdicts:
        table.add_row(verdict.key, verdict.crm_field, verdict.crm_type or "",
                      "ok" if verdict.ok else Text("; ".join(verdict.problems), style="red"))
    out.print(table)
    for name in ("WHATSAPP_APP_SECRET", "WHATSAPP_VERIFY_TOKEN"):
        if loaded.secrets.get(name) is None:
            out.print(f"note: {name} is not set; `waconsent webhook` will refuse to start")
    problems = problem_lines(verdicts)
    if problems:
        raise ConfigError(problems, source=str(loaded.path))
    out.print("all mapped fields exist, fit their types and are updateable")


@main.command()
@click.pass_context
@guarded
def webhook(ctx: click.Context) -> None:
    """Serve the WhatsApp webhook alone (handshake + signed deliveries)."""
    from waconsent.server import serve

    serve(_config(ctx))


@main.command()
@click.pass_context
@guarded
def serve(ctx: click.Context) -> None:
    """Webhook receiver plus scheduler (nightly full, incremental every N minutes); a
    revocation arriving by webhook is written back to every record of its number at once."""
    from waconsent.service import serve as serve_all

    serve_all(_config(ctx))


# ---- the admin's kit: fields, report html ---------------------------------------------------

@main.command()
@click.option("--crm", "crm_kind", type=click.Choice(["salesforce", "dynamics"]), default=None,
              help="The CRM to generate for (default: crm.kind; must match it).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Directory to write the definitions into (created if missing).")
@click.option("--apply", "apply_", is_flag=True,
              help="Dynamics: create the missing columns now, with the configured credentials.")
@click.option("--solution", default=None, metavar="UNIQUE_NAME",
              help="Dynamics --apply: add the columns to this solution "
                   "(MSCRM.SolutionUniqueName); its publisher prefix must be the columns'.")
@click.pass_context
@guarded
def fields(ctx: click.Context, crm_kind: str | None, out_dir: str, apply_: bool,
           solution: str | None) -> None:
    """The CRM field definitions the mapping needs: an SFDX project, or Dataverse bodies."""
    from waconsent import admin_fields

    done = admin_fields.generate(_config(ctx), crm_kind, Path(out_dir), apply=apply_,
                                 solution=solution)
    for path in done.written:
        out.print(f"wrote {path}")
    for note in done.skipped:
        out.print(f"not generated: {note}")
    for name in done.existing:
        out.print(f"exists already, left as it is: {name}")
    for name in done.created:
        out.print(f"created: {name}")
    if done.next_steps:
        out.print("next: " + "; then ".join(f"`{step}`" for step in done.next_steps))


@report.command(name="html")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), required=True,
              help="The HTML file to write (replaced if it exists; readable by you only).")
@click.option("--days", default=30, show_default=True, type=click.IntRange(1, 3660),
              help="How far back the trend chart reaches.")
@click.pass_context
@guarded
def report_html(ctx: click.Context, out_file: str, days: int) -> None:
    """One self-contained page for the data-protection officer: the last run's numbers, the
    trend, the records whose proof is missing, conflicts, unmatched numbers (masked)."""
    from waconsent.reports.gather import gather, write_private
    from waconsent.reports.page import render

    loaded = _config(ctx)
    engine = _engine(loaded)
    try:
        data = gather(loaded, engine, _now(), days)
    finally:
        engine.dispose()
    write_private(Path(out_file), render(data))
    last = data.last
    out.print(f"wrote {out_file}: " + (f"last run #{last.id} ({last.mode}, {last.status}), "
                                       if last else "no finished run yet, ")
              + f"{len(data.runs)} runs in {days} days, {data.flagged_total} records with "
              "proof missing")


_accept_config_everywhere(main)

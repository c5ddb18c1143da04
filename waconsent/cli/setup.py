"""Commands that set waconsent up: `init`, `check`, `fields`."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

from waconsent import admin_fields, config
from waconsent.cli.base import config_of, engine_of, guarded, main, out
from waconsent.config.check import problem_lines
from waconsent.connectors import open_crm
from waconsent.errors import ConfigError


@main.command()
@click.option(
    "--preset",
    type=click.Choice(["ledger", "salesforce", "dynamics"]),
    default="ledger",
    show_default=True,
)
@click.option(
    "--path",
    "target",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to write (default: the --config path or ./waconsent.toml).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.pass_context
@guarded
def init(ctx: click.Context, preset: str, target: str | None, force: bool) -> None:
    """Write a commented starter configuration."""
    path = Path(target or config.loading.resolve_path(ctx.find_root().obj))
    if path.exists() and not force:
        raise ConfigError(
            [f"{path} exists; pass --force to overwrite it or --path for another file"]
        )
    text = (
        resources.files("waconsent.config")
        .joinpath(f"presets/{preset}.toml")
        .read_text(encoding="utf-8")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    out.print(
        f"wrote {path} (preset {preset}); edit it, then run `waconsent "
        f"--config {path} sync --dry-run`"
    )


@main.command()
@click.pass_context
@guarded
def check(ctx: click.Context) -> None:
    """Validate the config, connect, and check every mapped field against the CRM's metadata."""
    loaded = config_of(ctx)
    out.print(f"configuration {loaded.path}: valid")
    engine = engine_of(loaded)
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
        table.add_row(
            verdict.key,
            verdict.crm_field,
            verdict.crm_type or "",
            "ok" if verdict.ok else Text("; ".join(verdict.problems), style="red"),
        )
    out.print(table)
    for name in ("WHATSAPP_APP_SECRET", "WHATSAPP_VERIFY_TOKEN"):
        if loaded.secrets.get(name) is None:
            out.print(f"note: {name} is not set; `waconsent webhook` will refuse to start")
    problems = problem_lines(verdicts)
    if problems:
        raise ConfigError(problems, source=str(loaded.path))
    out.print("all mapped fields exist, fit their types and are updateable")


@main.command()
@click.option(
    "--crm",
    "crm_kind",
    type=click.Choice(["salesforce", "dynamics"]),
    default=None,
    help="The CRM to generate for (default: crm.kind; must match it).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    required=True,
    help="Directory to write the definitions into (created if missing).",
)
@click.option(
    "--apply",
    "apply_",
    is_flag=True,
    help="Dynamics: create the missing columns now, with the configured credentials.",
)
@click.option(
    "--solution",
    default=None,
    metavar="UNIQUE_NAME",
    help="Dynamics --apply: add the columns to this solution "
    "(MSCRM.SolutionUniqueName); its publisher prefix must be the columns'.",
)
@click.pass_context
@guarded
def fields(
    ctx: click.Context, crm_kind: str | None, out_dir: str, apply_: bool, solution: str | None
) -> None:
    """The CRM field definitions the mapping needs: an SFDX project, or Dataverse bodies."""
    done = admin_fields.generate(
        config_of(ctx), crm_kind, Path(out_dir), apply=apply_, solution=solution
    )
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

"""`waconsent fields`: the CRM field definitions the mapping needs, written for the admin, and
on Dataverse created on request.

The shell around three pure pieces: `connectors.field_plan` (what each mapped field should
be), `connectors.salesforce_fields` (an SFDX project) and `connectors.dynamics_fields` (Web
API bodies, and `apply`). This module checks that the command fits the configuration, writes
the files, and opens the Dynamics connector for `--apply`, whose credentials and retry policy
are the ones every sync uses.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from waconsent.config import LoadedConfig
from waconsent.connectors import dynamics_fields, salesforce_fields
from waconsent.connectors.field_plan import PlannedField, plan
from waconsent.errors import ConfigError

CrmChoice = Literal["salesforce", "dynamics"]


@dataclass
class Outcome:
    """What the command did, for the CLI to print."""

    written: list[Path] = field(default_factory=list)
    generated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)


def planned_fields(config: LoadedConfig, crm: str | None) -> tuple[CrmChoice, list[PlannedField]]:
    """The CRM to generate for (default: `crm.kind`) and the plan of its mapped fields.

    The names in [mapping.fields] are the configured CRM's, so generating for the other CRM
    would create fields nobody reads: refused, with how to get a config for it.
    """
    settings = config.settings
    kind = settings.crm.kind
    source = str(config.path or "")
    if kind == "ledger":
        raise ConfigError(
            [
                "crm.kind: the built-in ledger has every field already; `waconsent "
                "fields` is for crm.kind = 'salesforce' or 'dynamics'"
            ],
            source,
        )
    if crm is not None and crm != kind:
        raise ConfigError(
            [
                f"--crm {crm}: this configuration maps crm.kind = {kind!r}, whose "
                f"field names mean nothing in {crm}; write one for it with "
                f"`waconsent init --preset {crm} --path {crm}.toml` and pass "
                f"--config {crm}.toml"
            ],
            source,
        )
    if not settings.mapping.object:
        raise ConfigError(["mapping.object: required to know where the fields go"], source)
    mapping = settings.mapping
    fields = mapping.fields.mapped()
    if not fields:
        raise ConfigError(
            ["mapping.fields: nothing is mapped, so there is nothing to create"], source
        )
    return kind, plan(fields, mapping.values.opted_in, mapping.values.opted_out)


def generate(
    config: LoadedConfig,
    crm: str | None,
    out: Path,
    *,
    apply: bool = False,
    solution: str | None = None,
) -> Outcome:
    """Write the definitions for the configured CRM into `out`; on Dynamics with `apply`,
    create the missing columns too."""
    kind, planned = planned_fields(config, crm)
    if kind == "dynamics":
        return _dynamics(config, planned, out, apply, solution)
    if apply:
        raise ConfigError(
            [
                "--apply: Salesforce fields are deployed with the Salesforce CLI: "
                f"`cd {out} && sf project deploy start --source-dir force-app`"
            ]
        )
    return _salesforce(config, planned, out)


def _salesforce(config: LoadedConfig, planned: list[PlannedField], out: Path) -> Outcome:
    settings = config.settings
    built = salesforce_fields.project(
        str(settings.mapping.object), planned, settings.salesforce.api_version
    )
    outcome = Outcome(
        written=_write(out, built.files), generated=list(built.fields), skipped=list(built.skipped)
    )
    if built.fields:
        outcome.next_steps = [
            f"cd {out} && sf project deploy start --source-dir {salesforce_fields.SOURCE_DIR} "
            "--target-org <your org>",
            f"sf org assign permset --name {salesforce_fields.PERMISSION_SET} "
            "--on-behalf-of <the integration user>",
            "waconsent check",
        ]
    return outcome


def _dynamics(
    config: LoadedConfig, planned: list[PlannedField], out: Path, apply: bool, solution: str | None
) -> Outcome:
    columns = dynamics_fields.bodies(planned)
    table = _known_table(str(config.settings.mapping.object))
    outcome = Outcome(generated=list(columns.bodies), skipped=list(columns.skipped))
    files = {
        f"{name}.json": json.dumps(column, indent=2, ensure_ascii=False) + "\n"
        for name, column in columns.bodies.items()
    }
    files["requests.txt"] = _requests(config, table, columns.bodies, solution)
    outcome.written = _write(out, files)
    if apply and columns.bodies:
        from waconsent.connectors.dynamics import DynamicsConnector

        connector = DynamicsConnector.from_config(config)
        try:
            applied = dynamics_fields.apply(connector, columns.bodies, solution)
        finally:
            connector.close()
        outcome.created, outcome.existing = list(applied.created), list(applied.existing)
        outcome.next_steps = ["waconsent check"]
    elif columns.bodies:
        outcome.next_steps = [
            f"waconsent fields --crm dynamics --out {out} --apply"
            + (f" --solution {solution}" if solution else ""),
            "waconsent check",
        ]
    return outcome


def _known_table(entity_set: str) -> str:
    """The table's logical name for the common entity sets; `--apply` asks Dataverse."""
    from waconsent.connectors.dynamics_metadata import KNOWN_ENTITIES

    known = KNOWN_ENTITIES.get(entity_set)
    return known[0] if known else f"<logical name of the {entity_set} table>"


def _requests(
    config: LoadedConfig, table: str, columns: Mapping[str, object], solution: str | None
) -> str:
    """How to send the bodies by hand (Postman, curl, XrmToolBox), one request a column."""
    dyn = config.settings.dynamics
    root = f"{(dyn.url or '<org url>').rstrip('/')}/api/data/v{dyn.api_version}"
    lines = [
        "# One request per file; headers as shown (plus Authorization: Bearer <token>).",
        "# Dataverse answers 204 with OData-EntityId; an existing column answers",
        f"# {dynamics_fields.DUPLICATE_SCHEMA_NAME} (DuplicateAttributeSchemaName).",
        "# Headers: Content-Type: application/json; charset=utf-8, OData-Version: 4.0"
        + (f", MSCRM.SolutionUniqueName: {solution}" if solution else ""),
        "",
    ]
    lines += [
        f"POST {root}/{dynamics_fields.attributes_path(table)}  < {name}.json" for name in columns
    ]
    return "\n".join(lines) + "\n"


def _write(out: Path, files: Mapping[str, str]) -> list[Path]:
    """Write every file under `out` (creating folders); other files there are left alone."""
    written = []
    for relative, text in sorted(files.items()):
        path = out / relative
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"--out: cannot write {path}: {exc.strerror or exc}"]) from None
        written.append(path)
    return written

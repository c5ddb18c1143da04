"""The mapping's custom columns as Dataverse Web API bodies, and `--apply` that creates the
missing ones.

`waconsent fields --crm dynamics --out DIR` writes one JSON body per custom column (a name
with a publisher prefix such as `new_`), each what `POST [org]/api/data/v9.2/EntityDefinitions(
LogicalName='contact')/Attributes` takes, in the shapes of Microsoft's "Create and update
column definitions using the Web API": `BooleanAttributeMetadata` with its `OptionSet`
(TrueOption 1 / FalseOption 0), `PicklistAttributeMetadata` for a Choice opt-in,
`DateTimeAttributeMetadata` and `StringAttributeMetadata` with `MaxLength`; every body has
`SchemaName`, `DisplayName` and `Description` labels and `RequiredLevel` None.

Dates use `DateTimeBehavior` **UserLocal** with `Format` DateAndTime. That is the behaviour
that stores the instant in UTC: the Web API reads and writes it in UTC (waconsent sends
`...Z`), and the app shows it in each user's own time zone, so a consent time an admin types
by hand is converted to UTC too. `TimeZoneIndependent` would store the wall-clock digits as
given, no zone: a time typed in Berlin would read an hour off, and that behaviour can never
be changed back (UserLocal can still be changed later; the reverse is impossible).

`apply` creates, through the connector's authenticated path, only the columns the table does
not have; an existing column is reported and never touched.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from waconsent.connectors.dynamics_batch import dataverse_error
from waconsent.connectors.field_plan import Kind, PlannedField
from waconsent.connectors.http import Outcome, classify
from waconsent.errors import ConfigError, FatalError

LANGUAGE = 1033  # labels in English; Dataverse shows them where no translation exists
DUPLICATE_SCHEMA_NAME = "0x80047013"  # DuplicateAttributeSchemaName
# A custom column carries its publisher's prefix: 2 to 8 letters or digits, then `_`.
# Microsoft's own solutions (msdyn_, msdynmkt_, adx_, mspp_) and the address composites
# (address1_...) also have underscores; they are standard columns and never generated.
_CUSTOM = re.compile(r"(?P<prefix>[a-z][a-z0-9]{1,7})_[a-z0-9_]+")
_STANDARD_PREFIXES = re.compile(r"msdyn|msdynmkt|adx|mspp|address\d")


class MetadataClient(Protocol):
    """What `apply` needs of the Dynamics connector: its table and one authenticated POST."""

    def table_logical_name(self) -> str: ...

    def existing_columns(self) -> Sequence[str]: ...

    def post_metadata(
        self, path: str, body: Mapping[str, Any], headers: Mapping[str, str]
    ) -> Any: ...


@dataclass(frozen=True)
class ColumnBodies:
    """The bodies to POST, by logical name, and what was left out and why."""

    bodies: Mapping[str, dict[str, Any]]
    skipped: Sequence[str]


@dataclass(frozen=True)
class Applied:
    """What `--apply` did, column by column."""

    created: Sequence[str]
    existing: Sequence[str]


def attributes_path(table: str) -> str:
    """The Attributes collection of a table, relative to the Web API root."""
    return f"EntityDefinitions(LogicalName='{table.replace(chr(39), chr(39) * 2)}')/Attributes"


def bodies(planned: Sequence[PlannedField]) -> ColumnBodies:
    """A create body per custom column; ConfigError for a name Dataverse would refuse."""
    found: dict[str, dict[str, Any]] = {}
    skipped, problems = [], []
    for planned_field in planned:
        name = planned_field.name
        match = _CUSTOM.fullmatch(name)
        if match is None and name == name.lower() and "_" not in name:
            skipped.append(f"{name}: a standard column (no publisher prefix); it exists already")
            continue
        if match is None:
            problems.append(
                f"mapping.fields.{planned_field.logical}: {name!r} is not a Dataverse "
                "logical name of a custom column (lower case, a publisher prefix "
                "such as new_, then letters, digits and underscores)"
            )
            continue
        if _STANDARD_PREFIXES.fullmatch(match.group("prefix")):
            skipped.append(f"{name}: a column of a Microsoft solution; it exists already")
            continue
        found[name] = body(planned_field, match.group("prefix"))
    if problems:
        raise ConfigError(problems)
    return ColumnBodies(found, tuple(skipped))


def schema_name(planned: PlannedField, prefix: str) -> str:
    """`new_WhatsAppOptIn` for the preset's `new_whatsappoptin` (the SchemaName lowers to the
    logical name, so only the case may differ); otherwise the logical name itself."""
    pretty = f"{prefix}_{planned.pascal}"
    return pretty if planned.pascal and pretty.lower() == planned.name else planned.name


def body(planned: PlannedField, prefix: str) -> dict[str, Any]:
    """The create body of one column, as the Web API takes it."""
    common: dict[str, Any] = {
        "SchemaName": schema_name(planned, prefix),
        "DisplayName": label(planned.label),
        "Description": label(planned.description),
        "RequiredLevel": {
            "Value": "None",
            "CanBeChanged": True,
            "ManagedPropertyLogicalName": "canmodifyrequirementlevelsettings",
        },
    }
    if planned.kind is Kind.CHECKBOX:
        return {
            "@odata.type": "Microsoft.Dynamics.CRM.BooleanAttributeMetadata",
            "AttributeType": "Boolean",
            "AttributeTypeName": {"Value": "BooleanType"},
            **common,
            "DefaultValue": False,
            "OptionSet": {
                "@odata.type": "Microsoft.Dynamics.CRM.BooleanOptionSetMetadata",
                "TrueOption": {"Value": 1, "Label": label("Yes")},
                "FalseOption": {"Value": 0, "Label": label("No")},
                "OptionSetType": "Boolean",
            },
        }
    if planned.kind is Kind.CHOICE:
        return {
            "@odata.type": "Microsoft.Dynamics.CRM.PicklistAttributeMetadata",
            "AttributeType": "Picklist",
            "AttributeTypeName": {"Value": "PicklistType"},
            **common,
            "OptionSet": {
                "@odata.type": "Microsoft.Dynamics.CRM.OptionSetMetadata",
                "Options": [
                    {"Value": _option_value(planned, value), "Label": label(text)}
                    for value, text in planned.options
                ],
                "IsGlobal": False,
                "OptionSetType": "Picklist",
            },
        }
    if planned.kind is Kind.DATETIME:
        return {
            "@odata.type": "Microsoft.Dynamics.CRM.DateTimeAttributeMetadata",
            "AttributeType": "DateTime",
            "AttributeTypeName": {"Value": "DateTimeType"},
            **common,
            "Format": "DateAndTime",
            "DateTimeBehavior": {"Value": "UserLocal"},
        }
    return {
        "@odata.type": "Microsoft.Dynamics.CRM.StringAttributeMetadata",
        "AttributeType": "String",
        "AttributeTypeName": {"Value": "StringType"},
        **common,
        "FormatName": {"Value": "Text"},
        "MaxLength": planned.length,
    }


def _option_value(planned: PlannedField, value: str) -> int:
    text = value.strip()
    if not text.lstrip("-").isdigit():
        raise ConfigError(
            [
                f"mapping.values: a Dataverse Choice option value is an integer "
                f"(such as 100000000), got {value!r} for {planned.name!r}"
            ]
        )
    return int(text)


def label(text: str) -> dict[str, Any]:
    return {
        "@odata.type": "Microsoft.Dynamics.CRM.Label",
        "LocalizedLabels": [
            {
                "@odata.type": "Microsoft.Dynamics.CRM.LocalizedLabel",
                "Label": text,
                "LanguageCode": LANGUAGE,
            }
        ],
    }


def apply(
    client: MetadataClient, wanted: Mapping[str, dict[str, Any]], solution: str | None = None
) -> Applied:
    """Create each wanted column the table lacks, in order; an existing one (also one that
    appeared meanwhile: Dataverse answers DuplicateAttributeSchemaName) is left alone.

    Any other refusal stops at that column with the columns created so far named, so a
    second run after the fix creates only the rest.
    """
    table = client.table_logical_name()
    have = {name.lower() for name in client.existing_columns()}
    headers = {"MSCRM.SolutionUniqueName": solution} if solution else {}
    created: list[str] = []
    existing = [name for name in wanted if name.lower() in have]
    for name, column in wanted.items():
        if name.lower() in have:
            continue
        response = client.post_metadata(attributes_path(table), column, headers)
        if classify(response.status_code) is Outcome.OK:
            created.append(name)
            continue
        code, message = dataverse_error(response.text)
        if code.lower() == DUPLICATE_SCHEMA_NAME:
            existing.append(name)
            continue
        done = f"; created before it: {', '.join(created)}" if created else ""
        raise FatalError(
            f"Dataverse refused to create the column {name!r} on {table} "
            f"(HTTP {response.status_code} {code}: {message}){done}"
        )
    return Applied(tuple(created), tuple(existing))

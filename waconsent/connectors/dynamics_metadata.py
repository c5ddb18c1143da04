"""What Dataverse says about the mapped table: its entity definition and attributes, read
from EntityDefinitions, and the mapping checked against them (`waconsent check` and the
pre-run check use the same verdicts).

Cost: the entity definition (1 call, none for the common tables until a check asks), the
attributes (1), their string lengths (1, plus 1 when a Memo is mapped), a Choice opt-in's
options (1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from waconsent import domain
from waconsent.config.check import DATAVERSE, MappingUnderCheck, Verdict, check_mapping
from waconsent.connectors import dynamics_odata as odata
from waconsent.domain import FieldDescription
from waconsent.errors import ConfigError

# entity set -> (logical name, primary id, primary name) for the common tables, so
# reads need no metadata call; any other entity set is looked up in EntityDefinitions.
KNOWN_ENTITIES: Mapping[str, tuple[str, str, str]] = {
    "contacts": ("contact", "contactid", "fullname"),
    "leads": ("lead", "leadid", "fullname"),
    "accounts": ("account", "accountid", "name"),
}

GetJson = Callable[[str], dict[str, Any]]


@dataclass(frozen=True)
class Attribute:
    """One attribute as EntityDefinitions describes it."""

    name: str
    type: str  # AttributeType: String, Memo, Boolean, Picklist, DateTime, ...
    updatable: bool = True
    max_length: int | None = None
    options: tuple[int, ...] = ()


@dataclass(frozen=True)
class Entity:
    logical_name: str
    entity_set: str
    primary_id: str
    primary_name: str | None = None
    change_tracking: bool | None = None

    @property
    def where(self) -> str:
        """The table as messages name it."""
        return f"the {self.logical_name} entity (entity set {self.entity_set!r})"


@dataclass(frozen=True)
class MappedTable:
    """What of the configuration the metadata is read and checked for."""

    org: str
    base: str  # the Web API root, https://<org>/api/data/v9.2
    entity_set: str
    fields: Mapping[str, str]  # logical -> attribute
    phones: Sequence[str]
    opted_in: str | int | None
    opted_out: str | int | None
    change_tracking: bool


class DataverseMetadata:
    """The table's metadata, read lazily through the connector's call path and kept."""

    def __init__(self, table: MappedTable, get_json: GetJson) -> None:
        self._table = table
        self._get_json = get_json
        self._entity: Entity | None = None
        known = KNOWN_ENTITIES.get(table.entity_set)
        if known is not None:
            self._entity = Entity(known[0], table.entity_set, known[1], known[2])
        self._attributes: dict[str, Attribute] | None = None

    def entity(self, *, refresh: bool = False) -> Entity:
        if self._entity is not None and not refresh:
            return self._entity
        table = self._table
        url = f"{table.base}/EntityDefinitions?" + odata.query_string(
            {
                "$select": "LogicalName,EntitySetName,PrimaryIdAttribute,PrimaryNameAttribute,"
                "ChangeTrackingEnabled",
                "$filter": odata.eq("EntitySetName", table.entity_set),
            }
        )
        rows = self._get_json(url).get("value", [])
        if not rows:
            raise ConfigError(
                [
                    f"mapping.object: Dataverse has no entity set "
                    f"{table.entity_set!r} (use the entity set name, the plural "
                    "such as 'contacts')"
                ],
                source=f"Dataverse {table.org}",
            )
        row = rows[0]
        self._entity = Entity(
            row["LogicalName"],
            row["EntitySetName"],
            row["PrimaryIdAttribute"],
            row.get("PrimaryNameAttribute"),
            row.get("ChangeTrackingEnabled"),
        )
        return self._entity

    def attributes(self) -> dict[str, Attribute]:
        """Attribute metadata, loaded once (by the pre-run check, or by the first write)."""
        return self._attributes if self._attributes is not None else self.reload()

    def reload(self) -> dict[str, Attribute]:
        """Attribute metadata: 2 calls, plus 1 for a Choice opt-in (its option values)."""
        table = self._table
        path = (
            f"{table.base}/EntityDefinitions"
            f"{odata.key_segment('LogicalName', self.entity().logical_name)}/Attributes"
        )
        rows = self._get_json(
            path
            + "?"
            + odata.query_string({"$select": "LogicalName,AttributeType,IsValidForUpdate"})
        )
        found: dict[str, dict[str, Any]] = {
            row["LogicalName"]: {
                "name": row["LogicalName"],
                "type": row.get("AttributeType", ""),
                "updatable": bool(row.get("IsValidForUpdate", True)),
            }
            for row in rows.get("value", [])
        }
        self._add_lengths(path, found)
        self._add_choice_options(path, found)
        self._attributes = {name: Attribute(**values) for name, values in found.items()}
        return self._attributes

    def _add_lengths(self, path: str, found: dict[str, dict[str, Any]]) -> None:
        """MaxLength lives on the derived types; the base AttributeMetadata has no such
        property."""
        for derived in ("StringAttributeMetadata", "MemoAttributeMetadata"):
            wanted = [
                n
                for n in self._table.fields.values()
                if found.get(n, {}).get("type") == derived.removesuffix("AttributeMetadata")
            ]
            if derived == "MemoAttributeMetadata" and not wanted:
                continue
            lengths = self._get_json(
                f"{path}/Microsoft.Dynamics.CRM.{derived}?"
                + odata.query_string({"$select": "LogicalName,MaxLength"})
            )
            for row in lengths.get("value", []):
                if row["LogicalName"] in found:
                    found[row["LogicalName"]]["max_length"] = row.get("MaxLength")

    def _add_choice_options(self, path: str, found: dict[str, dict[str, Any]]) -> None:
        """Only a Choice opt-in is read and written (see FITTING_TYPES), so only its options
        are worth a call; State and Status are refused without one."""
        opt_in = self._table.fields.get(domain.OPT_IN)
        if not opt_in or found.get(opt_in, {}).get("type") != "Picklist":
            return
        choice = self._get_json(
            f"{path}{odata.key_segment('LogicalName', opt_in)}"
            "/Microsoft.Dynamics.CRM.PicklistAttributeMetadata?"
            + odata.query_string(
                {"$select": "LogicalName", "$expand": "OptionSet($select=Options)"}
            )
        )
        options = (choice.get("OptionSet") or {}).get("Options") or []
        found[opt_in]["options"] = tuple(int(o["Value"]) for o in options)

    def verdicts(self) -> list[Verdict]:
        """The shared checker over fresh metadata, then Dataverse's own check: change
        tracking must be on for the table when `dynamics.change_tracking` is set."""
        table = self._table
        entity = self.entity(refresh=True)
        mapping = MappingUnderCheck(
            DATAVERSE, entity.where, table.fields, table.phones, table.opted_in, table.opted_out
        )
        verdicts = check_mapping(mapping, described(self.reload()))
        if table.change_tracking:
            verdicts.append(_change_tracking_verdict(entity))
        return verdicts


def _change_tracking_verdict(entity: Entity) -> Verdict:
    """Delta links exist only for a table with 'Track changes' on; only a table whose
    metadata says it is off is refused (no answer is no refusal)."""
    problems = (
        ()
        if entity.change_tracking is not False
        else (
            f"change tracking is not enabled on {entity.where}; enable 'Track changes' on the "
            "table or set it to false",
        )
    )
    return Verdict("dynamics.change_tracking", entity.logical_name, None, problems)


def described(attributes: Mapping[str, Attribute]) -> dict[str, FieldDescription]:
    """Attributes as the mapping checker reads them: Dataverse's own type names, and a
    Choice's option values as the decimal strings [mapping.values] is compared with."""
    return {
        name: FieldDescription(
            name, a.type, a.updatable, a.max_length, tuple(str(o) for o in a.options)
        )
        for name, a in attributes.items()
    }

"""The mapping's custom fields as a Salesforce DX project in source format.

`waconsent fields --crm salesforce --out DIR` writes what this module returns: a
`sfdx-project.json`, one `force-app/main/default/objects/<Object>/fields/<Field>.field-meta.xml`
per mapped custom field (a name ending in `__c`), a permission set granting read and edit on
exactly those fields, and a `manifest/package.xml` naming the same components. An admin
deploys it with `sf project deploy start --source-dir DIR/force-app`. Standard fields
(MessagingEndUser's `MessagingConsentStatus`, the phone fields) and fields of a managed
package (`ns__Field__c`) already exist and are not generated.

Pure: names and settings in, file texts out. The XML is built with ElementTree, so every
label and description is escaped, in the Metadata API's namespace with its element names
(CustomField: fullName, defaultValue, description, externalId, inlineHelpText, label, length,
required, type, unique, valueSet; PermissionSet: description, fieldPermissions, label;
Package: types/members/name, version), children in the order `sf project retrieve` writes them.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from waconsent.connectors.field_plan import Kind, PlannedField
from waconsent.errors import ConfigError

METADATA_NS = "http://soap.sforce.com/2006/04/metadata"
PERMISSION_SET = "Waconsent_WhatsApp_Consent"
SOURCE_DIR = "force-app"
_DEFAULT = f"{SOURCE_DIR}/main/default"
# An API name: starts with a letter, letters, digits and single underscores, no trailing
# underscore; the part before `__c` is at most 40 characters.
_API_NAME = re.compile(r"[A-Za-z](?:[A-Za-z0-9]|_(?!_))*(?<!_)")
_TYPES = {
    Kind.CHECKBOX: "Checkbox",
    Kind.DATETIME: "DateTime",
    Kind.TEXT: "Text",
    Kind.CHOICE: "Picklist",
}


@dataclass(frozen=True)
class SfdxProject:
    """The files to write, relative to the output directory, and what was left out, why."""

    files: Mapping[str, str]
    fields: Sequence[str]  # Object.Field of every generated field
    skipped: Sequence[str] = field(default_factory=tuple)


def project(object_name: str, planned: Sequence[PlannedField], api_version: str) -> SfdxProject:
    """The SFDX project for `planned` fields on `object_name`; ConfigError for a bad name."""
    if not _API_NAME.fullmatch(object_name.removesuffix("__c")):
        raise ConfigError(
            [
                f"mapping.object: {object_name!r} is not a Salesforce object API "
                "name (such as Contact, Lead or MessagingEndUser)"
            ]
        )
    files: dict[str, str] = {}
    generated, skipped, problems = [], [], []
    for planned_field in planned:
        name = planned_field.name
        if not name.endswith("__c"):
            skipped.append(f"{object_name}.{name}: a standard field; it exists already")
            continue
        stem = name.removesuffix("__c")
        if "__" in stem:
            skipped.append(
                f"{object_name}.{name}: belongs to a managed package (namespace "
                f"{stem.split('__')[0]!r}); install the package instead"
            )
            continue
        if not _API_NAME.fullmatch(stem) or len(stem) > 40:
            problems.append(
                f"mapping.fields.{planned_field.logical}: {name!r} is not a valid "
                "custom field API name (a letter, then letters, digits and single "
                "underscores, at most 40 before __c)"
            )
            continue
        path = f"{_DEFAULT}/objects/{object_name}/fields/{name}.field-meta.xml"
        files[path] = _xml(custom_field(planned_field))
        generated.append(f"{object_name}.{name}")
    if problems:
        raise ConfigError(problems)
    if generated:
        files[f"{_DEFAULT}/permissionsets/{PERMISSION_SET}.permissionset-meta.xml"] = _xml(
            permission_set(object_name, generated)
        )
        files["manifest/package.xml"] = _xml(package(generated, api_version))
    files["sfdx-project.json"] = (
        json.dumps(
            {
                "packageDirectories": [{"path": SOURCE_DIR, "default": True}],
                "name": "waconsent-fields",
                "namespace": "",
                "sourceApiVersion": api_version,
            },
            indent=2,
        )
        + "\n"
    )
    return SfdxProject(files, tuple(generated), tuple(skipped))


def custom_field(planned: PlannedField) -> ET.Element:
    """One CustomField. Checkboxes default to false (Salesforce requires a default), text
    has its length; nothing is required or unique, so existing records stay valid."""
    root = _root("CustomField")
    _add(root, "fullName", planned.name)
    if planned.kind is Kind.CHECKBOX:
        _add(root, "defaultValue", "false")
    _add(root, "description", planned.description)
    _add(root, "externalId", "false")
    _add(root, "inlineHelpText", _help(planned))
    _add(root, "label", planned.label)
    if planned.kind is Kind.TEXT:
        _add(root, "length", str(planned.length))
    if planned.kind is not Kind.CHECKBOX:
        _add(root, "required", "false")
    _add(root, "type", _TYPES[planned.kind])
    if planned.kind is Kind.TEXT:
        _add(root, "unique", "false")
    if planned.kind is Kind.CHOICE:
        root.append(_value_set(planned.options))
    return root


def _value_set(options: Sequence[tuple[str, str]]) -> ET.Element:
    """A restricted picklist of exactly the [mapping.values], neither one the default: a new
    record has not consented, and a default "Opted Out" would read as a revocation."""
    value_set = ET.Element("valueSet")
    _add(value_set, "restricted", "true")
    definition = ET.SubElement(value_set, "valueSetDefinition")
    _add(definition, "sorted", "false")
    for value, _label in options:
        entry = ET.SubElement(definition, "value")
        _add(entry, "fullName", value)
        _add(entry, "default", "false")
        _add(entry, "label", value)
    return value_set


def _help(planned: PlannedField) -> str:
    if planned.kind is Kind.DATETIME:
        return "Shown in your time zone; waconsent reads and writes it in UTC to the second."
    return "Maintained by waconsent; change it only to record consent given outside WhatsApp."


def permission_set(object_name: str, fields: Sequence[str]) -> ET.Element:
    """Read and edit on exactly the generated fields, for the integration user (and anyone
    who records consent by hand). Object access stays with the user's profile."""
    root = _root("PermissionSet")
    _add(
        root,
        "description",
        f"Read and edit on the WhatsApp consent fields waconsent keeps on "
        f"{object_name}. Assign to the waconsent integration user.",
    )
    for name in sorted(fields):
        grant = ET.SubElement(root, "fieldPermissions")
        _add(grant, "editable", "true")
        _add(grant, "field", name)
        _add(grant, "readable", "true")
    _add(root, "hasActivationRequired", "false")
    _add(root, "label", "waconsent WhatsApp Consent")
    return root


def package(fields: Sequence[str], api_version: str) -> ET.Element:
    """The manifest of the same components, for `sf project deploy start --manifest`."""
    root = _root("Package")
    for type_name, members in (
        ("CustomField", sorted(fields)),
        ("PermissionSet", [PERMISSION_SET]),
    ):
        types = ET.SubElement(root, "types")
        for member in members:
            _add(types, "members", member)
        _add(types, "name", type_name)
    _add(root, "version", api_version)
    return root


def _root(tag: str) -> ET.Element:
    return ET.Element(tag, {"xmlns": METADATA_NS})


def _add(parent: ET.Element, tag: str, text: str) -> ET.Element:
    child = ET.SubElement(parent, tag)
    child.text = text
    return child


def _xml(root: ET.Element) -> str:
    ET.indent(root, space="    ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"

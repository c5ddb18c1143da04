"""`waconsent fields` for Salesforce: the SFDX project read back as the Metadata API defines
it (namespace, CustomField / PermissionSet / Package elements), "deployed" into the Salesforce
fake by reading each CustomField, after which `waconsent check` passes."""

from __future__ import annotations

import json
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.fakes.salesforce import (
    CONSENT_FIELDS,
    INSTANCE,
    FakeField,
    FakeSalesforce,
    default_schema,
)
from tests.fields_support import cli, preset, write_config
from waconsent.config.check import FITTING_TYPES
from waconsent.connectors.field_plan import Kind, plan
from waconsent.connectors.salesforce_fields import METADATA_NS, PERMISSION_SET

NS = {"md": METADATA_NS}
USER, PASSWORD, TOKEN = "integration@acme.example", "s3cret-Pa55", "TOKEN123456"
# what describe() calls each Metadata API field type (Salesforce's own mapping)
DESCRIBE_TYPES = {
    "Checkbox": "boolean",
    "DateTime": "datetime",
    "Text": "string",
    "Picklist": "picklist",
}


def _xml(path: Path) -> ET.Element:
    return ET.parse(path).getroot()


def _text(element: ET.Element, tag: str) -> str | None:
    found = element.find(f"md:{tag}", NS)
    return None if found is None else found.text


@pytest.fixture
def salesforce_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SALESFORCE_PASSWORD", PASSWORD)
    monkeypatch.setenv("SALESFORCE_SECURITY_TOKEN", TOKEN)
    return write_config(
        tmp_path,
        preset(
            "salesforce",
            salesforce={"auth": "password", "username": USER, "instance_url": INSTANCE},
        ),
    )


def test_salesforce_fields_are_custom_fields_in_the_metadata_namespace(
    salesforce_config: Path, tmp_path: Path
) -> None:
    """Every mapped __c field is one CustomField file with the Metadata API's elements."""
    out = tmp_path / "sfdx"
    assert cli(salesforce_config, "fields", "--crm", "salesforce", "--out", str(out)).exit_code == 0
    folder = out / "force-app/main/default/objects/Contact/fields"
    found = {
        path.name.removesuffix(".field-meta.xml"): _xml(path)
        for path in folder.glob("*.field-meta.xml")
    }
    assert set(found) == {f.name for f in CONSENT_FIELDS}
    for name, root in found.items():
        assert root.tag == f"{{{METADATA_NS}}}CustomField"
        assert _text(root, "fullName") == name
        assert _text(root, "label") and len(_text(root, "label") or "") <= 40
        assert _text(root, "description")
    expected = {
        "WhatsApp_Opt_In__c": ("Checkbox", None),
        "WhatsApp_Opt_In_Date__c": ("DateTime", None),
        "WhatsApp_Opt_In_IP__c": ("Text", "45"),
        "WhatsApp_Opt_In_Source__c": ("Text", "255"),
        "WhatsApp_User_Id__c": ("Text", "64"),
        "WhatsApp_Consent_Proof_Missing__c": ("Checkbox", None),
    }
    for name, (kind, length) in expected.items():
        assert (_text(found[name], "type"), _text(found[name], "length")) == (kind, length)
    assert _text(found["WhatsApp_Opt_In__c"], "defaultValue") == "false"
    assert _text(found["WhatsApp_Opt_In_IP__c"], "unique") == "false"
    assert _text(found["WhatsApp_Opt_In_IP__c"], "required") == "false"


def test_salesforce_permission_set_package_and_project_name_the_same_fields(
    salesforce_config: Path, tmp_path: Path
) -> None:
    """The permission set grants read+edit on each field; package.xml and the project agree."""
    out = tmp_path / "sfdx"
    cli(salesforce_config, "fields", "--out", str(out))
    fields = {f"Contact.{f.name}" for f in CONSENT_FIELDS}
    permset = _xml(
        out / f"force-app/main/default/permissionsets/{PERMISSION_SET}.permissionset-meta.xml"
    )
    assert permset.tag == f"{{{METADATA_NS}}}PermissionSet"
    assert _text(permset, "label")
    grants = {
        _text(g, "field"): (_text(g, "readable"), _text(g, "editable"))
        for g in permset.findall("md:fieldPermissions", NS)
    }
    assert grants == {name: ("true", "true") for name in fields}
    manifest = _xml(out / "manifest/package.xml")
    assert manifest.tag == f"{{{METADATA_NS}}}Package"
    types = {
        _text(t, "name"): {m.text for m in t.findall("md:members", NS)}
        for t in manifest.findall("md:types", NS)
    }
    assert types == {"CustomField": fields, "PermissionSet": {PERMISSION_SET}}
    assert _text(manifest, "version") == "62.0"
    project = json.loads((out / "sfdx-project.json").read_text())
    assert project["packageDirectories"] == [{"path": "force-app", "default": True}]
    assert project["sourceApiVersion"] == "62.0"


def _deploy(org: FakeSalesforce, obj: str, out: Path) -> None:
    """Deploy the generated fields into the fake org, reading each CustomField as the
    Metadata API defines its elements."""
    for path in (out / f"force-app/main/default/objects/{obj}/fields").glob("*.xml"):
        root = _xml(path)
        values = tuple(
            v.text or ""
            for v in root.iterfind("md:valueSet/md:valueSetDefinition/md:value/md:fullName", NS)
        )
        restricted = root.find("md:valueSet/md:restricted", NS)
        org.schema[obj][str(_text(root, "fullName"))] = FakeField(
            str(_text(root, "fullName")),
            DESCRIBE_TYPES[str(_text(root, "type"))],
            int(_text(root, "length") or 0),
            picklist=values,
            restricted=restricted is not None and restricted.text == "true",
        )


def test_salesforce_check_passes_once_the_generated_fields_are_deployed(
    salesforce_config: Path, tmp_path: Path
) -> None:
    """An org without the fields fails `check`; with the generated ones deployed it passes."""
    schema = default_schema()
    for field in CONSENT_FIELDS:
        del schema["Contact"][field.name]
    org = FakeSalesforce(schema=schema)
    org.users[USER] = PASSWORD + TOKEN
    out = tmp_path / "sfdx"
    cli(salesforce_config, "fields", "--out", str(out))
    with org.active():
        assert cli(salesforce_config, "check").exit_code == 1
        _deploy(org, "Contact", out)
        result = cli(salesforce_config, "check")
    assert result.exit_code == 0, result.output
    assert "all mapped fields exist, fit their types and are updateable" in result.output


def test_messaging_end_user_skips_its_standard_consent_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MessagingConsentStatus and the phone field are standard: only the proof fields appear."""
    path = write_config(tmp_path, preset("salesforce_messaging_end_user"))
    out = tmp_path / "meu"
    result = cli(path, "fields", "--out", str(out))
    assert result.exit_code == 0
    assert (
        "not generated: MessagingEndUser.MessagingConsentStatus: a standard field" in result.output
    )
    names = {
        p.name for p in (out / "force-app/main/default/objects/MessagingEndUser/fields").iterdir()
    }
    assert "MessagingConsentStatus.field-meta.xml" not in names
    assert len(names) == 8 and "MessagingPlatformKey.field-meta.xml" not in names


def test_a_picklist_opt_in_is_a_restricted_picklist_of_the_mapped_values(
    tmp_path: Path, salesforce_config: Path
) -> None:
    """With both [mapping.values] the opt-in is a restricted Picklist of them; check accepts it."""
    raw = tomllib.loads(salesforce_config.read_text())
    raw["mapping"]["values"] = {"opted_in": "Opted In", "opted_out": "Opted <Out> & gone"}
    path = write_config(tmp_path, raw)
    out = tmp_path / "pick"
    cli(path, "fields", "--out", str(out))
    root = _xml(
        out / "force-app/main/default/objects/Contact/fields/WhatsApp_Opt_In__c.field-meta.xml"
    )
    assert _text(root, "type") == "Picklist"
    assert _text(root, "defaultValue") is None
    values = root.findall("md:valueSet/md:valueSetDefinition/md:value", NS)
    assert [(_text(v, "fullName"), _text(v, "default")) for v in values] == [
        ("Opted In", "false"),
        ("Opted <Out> & gone", "false"),
    ]
    assert (
        b"Opted &lt;Out&gt; &amp; gone"
        in (
            out / "force-app/main/default/objects/Contact/fields/WhatsApp_Opt_In__c.field-meta.xml"
        ).read_bytes()
    )
    schema = default_schema()
    for field in CONSENT_FIELDS:
        del schema["Contact"][field.name]
    org = FakeSalesforce(schema=schema)
    org.users[USER] = PASSWORD + TOKEN
    with org.active():
        _deploy(org, "Contact", out)
        assert cli(path, "check").exit_code == 0


def test_a_bad_field_name_is_a_configuration_error_naming_the_key(
    tmp_path: Path, salesforce_config: Path
) -> None:
    """A name Salesforce would refuse is exit 1 with its key path, and nothing is written."""
    raw = tomllib.loads(salesforce_config.read_text())
    raw["mapping"]["fields"]["opt_in_ip"] = "Opt In IP__c"
    out = tmp_path / "bad"
    result = cli(write_config(tmp_path, raw), "fields", "--out", str(out))
    assert result.exit_code == 1
    assert (
        "mapping.fields.opt_in_ip: 'Opt In IP__c' is not a valid custom field API name"
        in result.output
    )
    assert not out.exists()


def test_the_generated_kinds_are_ones_the_mapping_checker_accepts() -> None:
    """The plan's kinds, in each CRM's type names, fit FITTING_TYPES for every logical field."""
    salesforce = {
        Kind.CHECKBOX: "boolean",
        Kind.DATETIME: "datetime",
        Kind.TEXT: "string",
        Kind.CHOICE: "picklist",
    }
    dataverse = {
        Kind.CHECKBOX: "Boolean",
        Kind.DATETIME: "DateTime",
        Kind.TEXT: "String",
        Kind.CHOICE: "Picklist",
    }
    every = {name: name for name in FITTING_TYPES if name != "phone"}
    for planned in plan(every) + plan({"opt_in": "x"}, "1", "2"):
        assert salesforce[planned.kind] in FITTING_TYPES[planned.logical]["salesforce"]
        assert dataverse[planned.kind] in FITTING_TYPES[planned.logical]["dynamics"]


def test_fields_refuses_a_ledger_a_crm_mismatch_and_apply_on_salesforce(
    salesforce_config: Path, tmp_path: Path
) -> None:
    """Exit 1 with the reason: a ledger, a --crm other than crm.kind, --apply on Salesforce."""
    (tmp_path / "ledger").mkdir()
    ledger = write_config(tmp_path / "ledger", {"crm": {"kind": "ledger"}})
    assert "the built-in ledger has every field" in cli(ledger, "fields", "--out", "x").output
    mismatch = cli(salesforce_config, "fields", "--crm", "dynamics", "--out", "x")
    assert mismatch.exit_code == 1 and "waconsent init --preset dynamics" in mismatch.output
    applied = cli(salesforce_config, "fields", "--out", str(tmp_path / "a"), "--apply")
    assert applied.exit_code == 1 and "sf project deploy start" in applied.output

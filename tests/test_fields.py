"""`waconsent fields`: the SFDX project and the Dataverse column bodies the mapping needs, read
back as the Metadata API and the Web API define them, and `--apply` against the Dataverse fake.

The Salesforce files are "deployed" into the Salesforce fake by reading each CustomField the
way the Metadata API defines its elements (type, length, valueSet), and the Dataverse columns
are created by POSTing to the fake; in both cases `waconsent check` must pass afterwards.
"""

from __future__ import annotations

import json
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import responses
from click.testing import CliRunner, Result

from tests.fakes.dynamics import (
    AUTHORITY_HOST,
    CLIENT_ID,
    CLIENT_SECRET,
    OPTED_IN,
    OPTED_OUT,
    ORG_URL,
    TENANT_ID,
    FakeDataverse,
)
from tests.fakes.salesforce import (
    CONSENT_FIELDS,
    INSTANCE,
    FakeField,
    FakeSalesforce,
    default_schema,
)
from waconsent.cli import main
from waconsent.config import LoadedConfig, Secrets, parse
from waconsent.config.check import FITTING_TYPES
from waconsent.connectors import dynamics_fields
from waconsent.connectors.dynamics import DynamicsConnector
from waconsent.connectors.field_plan import Kind, plan
from waconsent.connectors.http import RetryPolicy
from waconsent.connectors.salesforce_fields import METADATA_NS, PERMISSION_SET
from waconsent.errors import FatalError

NS = {"md": METADATA_NS}
USER, PASSWORD, TOKEN = "integration@acme.example", "s3cret-Pa55", "TOKEN123456"
PRESETS = resources.files("waconsent.config").joinpath("presets")
# what describe() calls each Metadata API field type (Salesforce's own mapping)
DESCRIBE_TYPES = {"Checkbox": "boolean", "DateTime": "datetime", "Text": "string",
                  "Picklist": "picklist"}
DATAVERSE_TYPES = {"Microsoft.Dynamics.CRM.BooleanAttributeMetadata": "Boolean",
                   "Microsoft.Dynamics.CRM.DateTimeAttributeMetadata": "DateTime",
                   "Microsoft.Dynamics.CRM.StringAttributeMetadata": "String",
                   "Microsoft.Dynamics.CRM.PicklistAttributeMetadata": "Picklist"}


def _preset(name: str, **overrides: Any) -> dict[str, Any]:
    raw = tomllib.loads(PRESETS.joinpath(f"{name}.toml").read_text("utf-8"))
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    return raw


def _toml(raw: Mapping[str, Any], prefix: str = "") -> str:
    """A small TOML writer for the nested dicts these tests build."""
    lines, tables = [], []
    for key, value in raw.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    text = "\n".join(lines) + "\n"
    for key, value in tables:
        name = f"{prefix}{key}"
        text += f"\n[{name}]\n" + _toml(value, f"{name}.")
    return text


def _write_config(tmp_path: Path, raw: dict[str, Any]) -> Path:
    raw["store"] = {"url": f"sqlite:///{tmp_path / 'w.db'}"}
    path = tmp_path / "waconsent.toml"
    path.write_text(_toml(raw), encoding="utf-8")
    return path


def _cli(path: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(path), *args], catch_exceptions=False)


def _xml(path: Path) -> ET.Element:
    return ET.parse(path).getroot()


def _text(element: ET.Element, tag: str) -> str | None:
    found = element.find(f"md:{tag}", NS)
    return None if found is None else found.text


# ---- Salesforce -------------------------------------------------------------------------------

@pytest.fixture
def salesforce_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SALESFORCE_PASSWORD", PASSWORD)
    monkeypatch.setenv("SALESFORCE_SECURITY_TOKEN", TOKEN)
    return _write_config(tmp_path, _preset("salesforce", salesforce={
        "auth": "password", "username": USER, "instance_url": INSTANCE}))


def test_salesforce_fields_are_custom_fields_in_the_metadata_namespace(
        salesforce_config: Path, tmp_path: Path) -> None:
    """Every mapped __c field is one CustomField file with the Metadata API's elements."""
    out = tmp_path / "sfdx"
    assert _cli(salesforce_config, "fields", "--crm", "salesforce", "--out", str(out)
                ).exit_code == 0
    folder = out / "force-app/main/default/objects/Contact/fields"
    found = {path.name.removesuffix(".field-meta.xml"): _xml(path)
             for path in folder.glob("*.field-meta.xml")}
    assert set(found) == {f.name for f in CONSENT_FIELDS}
    for name, root in found.items():
        assert root.tag == f"{{{METADATA_NS}}}CustomField"
        assert _text(root, "fullName") == name
        assert _text(root, "label") and len(_text(root, "label") or "") <= 40
        assert _text(root, "description")
    expected = {"WhatsApp_Opt_In__c": ("Checkbox", None), "WhatsApp_Opt_In_Date__c":
                ("DateTime", None), "WhatsApp_Opt_In_IP__c": ("Text", "45"),
                "WhatsApp_Opt_In_Source__c": ("Text", "255"),
                "WhatsApp_User_Id__c": ("Text", "64"),
                "WhatsApp_Consent_Proof_Missing__c": ("Checkbox", None)}
    for name, (kind, length) in expected.items():
        assert (_text(found[name], "type"), _text(found[name], "length")) == (kind, length)
    assert _text(found["WhatsApp_Opt_In__c"], "defaultValue") == "false"
    assert _text(found["WhatsApp_Opt_In_IP__c"], "unique") == "false"
    assert _text(found["WhatsApp_Opt_In_IP__c"], "required") == "false"


def test_salesforce_permission_set_package_and_project_name_the_same_fields(
        salesforce_config: Path, tmp_path: Path) -> None:
    """The permission set grants read+edit on each field; package.xml lists them; the project
    points at force-app with the configured API version."""
    out = tmp_path / "sfdx"
    _cli(salesforce_config, "fields", "--out", str(out))
    fields = {f"Contact.{f.name}" for f in CONSENT_FIELDS}
    permset = _xml(out / f"force-app/main/default/permissionsets/{PERMISSION_SET}"
                         ".permissionset-meta.xml")
    assert permset.tag == f"{{{METADATA_NS}}}PermissionSet"
    assert _text(permset, "label")
    grants = {_text(g, "field"): (_text(g, "readable"), _text(g, "editable"))
              for g in permset.findall("md:fieldPermissions", NS)}
    assert grants == {name: ("true", "true") for name in fields}
    manifest = _xml(out / "manifest/package.xml")
    assert manifest.tag == f"{{{METADATA_NS}}}Package"
    types = {_text(t, "name"): {m.text for m in t.findall("md:members", NS)}
             for t in manifest.findall("md:types", NS)}
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
        values = tuple(v.text or "" for v in root.iterfind(
            "md:valueSet/md:valueSetDefinition/md:value/md:fullName", NS))
        restricted = root.find("md:valueSet/md:restricted", NS)
        org.schema[obj][str(_text(root, "fullName"))] = FakeField(
            str(_text(root, "fullName")), DESCRIBE_TYPES[str(_text(root, "type"))],
            int(_text(root, "length") or 0), picklist=values,
            restricted=restricted is not None and restricted.text == "true")


def test_salesforce_check_passes_once_the_generated_fields_are_deployed(
        salesforce_config: Path, tmp_path: Path) -> None:
    """An org without the fields fails `check`; with the generated ones deployed it passes."""
    schema = default_schema()
    for field in CONSENT_FIELDS:
        del schema["Contact"][field.name]
    org = FakeSalesforce(schema=schema)
    org.users[USER] = PASSWORD + TOKEN
    out = tmp_path / "sfdx"
    _cli(salesforce_config, "fields", "--out", str(out))
    with org.active():
        assert _cli(salesforce_config, "check").exit_code == 1
        _deploy(org, "Contact", out)
        result = _cli(salesforce_config, "check")
    assert result.exit_code == 0, result.output
    assert "all mapped fields exist, fit their types and are updateable" in result.output


def test_messaging_end_user_skips_its_standard_consent_status(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """MessagingConsentStatus and the phone field are standard: only the proof fields appear."""
    path = _write_config(tmp_path, _preset("salesforce_messaging_end_user"))
    out = tmp_path / "meu"
    result = _cli(path, "fields", "--out", str(out))
    assert result.exit_code == 0
    assert "not generated: MessagingEndUser.MessagingConsentStatus: a standard field" in \
        result.output
    names = {p.name for p in (out / "force-app/main/default/objects/MessagingEndUser/fields"
                              ).iterdir()}
    assert "MessagingConsentStatus.field-meta.xml" not in names
    assert len(names) == 8 and "MessagingPlatformKey.field-meta.xml" not in names


def test_a_picklist_opt_in_is_a_restricted_picklist_of_the_mapped_values(
        tmp_path: Path, salesforce_config: Path) -> None:
    """With [mapping.values] the opt-in becomes a Picklist of exactly those two values,
    neither a default, and `check` accepts it once deployed."""
    raw = tomllib.loads(salesforce_config.read_text())
    raw["mapping"]["values"] = {"opted_in": "Opted In", "opted_out": "Opted <Out> & gone"}
    path = _write_config(tmp_path, raw)
    out = tmp_path / "pick"
    _cli(path, "fields", "--out", str(out))
    root = _xml(out / "force-app/main/default/objects/Contact/fields/WhatsApp_Opt_In__c"
                      ".field-meta.xml")
    assert _text(root, "type") == "Picklist"
    assert _text(root, "defaultValue") is None
    values = root.findall("md:valueSet/md:valueSetDefinition/md:value", NS)
    assert [(_text(v, "fullName"), _text(v, "default")) for v in values] == [
        ("Opted In", "false"), ("Opted <Out> & gone", "false")]
    assert b"Opted &lt;Out&gt; &amp; gone" in (
        out / "force-app/main/default/objects/Contact/fields/WhatsApp_Opt_In__c"
              ".field-meta.xml").read_bytes()
    schema = default_schema()
    for field in CONSENT_FIELDS:
        del schema["Contact"][field.name]
    org = FakeSalesforce(schema=schema)
    org.users[USER] = PASSWORD + TOKEN
    with org.active():
        _deploy(org, "Contact", out)
        assert _cli(path, "check").exit_code == 0


def test_a_bad_field_name_is_a_configuration_error_naming_the_key(
        tmp_path: Path, salesforce_config: Path) -> None:
    """A name Salesforce would refuse is exit 1 with its key path, and nothing is written."""
    raw = tomllib.loads(salesforce_config.read_text())
    raw["mapping"]["fields"]["opt_in_ip"] = "Opt In IP__c"
    out = tmp_path / "bad"
    result = _cli(_write_config(tmp_path, raw), "fields", "--out", str(out))
    assert result.exit_code == 1
    assert "mapping.fields.opt_in_ip: 'Opt In IP__c' is not a valid custom field API name" in \
        result.output
    assert not out.exists()


def test_the_generated_kinds_are_ones_the_mapping_checker_accepts() -> None:
    """The plan's kinds, in each CRM's type names, fit FITTING_TYPES for every logical field."""
    salesforce = {Kind.CHECKBOX: "boolean", Kind.DATETIME: "datetime", Kind.TEXT: "string",
                  Kind.CHOICE: "picklist"}
    dataverse = {Kind.CHECKBOX: "Boolean", Kind.DATETIME: "DateTime", Kind.TEXT: "String",
                 Kind.CHOICE: "Picklist"}
    every = {name: name for name in FITTING_TYPES if name != "phone"}
    for planned in plan(every) + plan({"opt_in": "x"}, "1", "2"):
        assert salesforce[planned.kind] in FITTING_TYPES[planned.logical]["salesforce"]
        assert dataverse[planned.kind] in FITTING_TYPES[planned.logical]["dynamics"]


def test_fields_refuses_a_ledger_a_crm_mismatch_and_apply_on_salesforce(
        salesforce_config: Path, tmp_path: Path) -> None:
    """Exit 1, saying why: the ledger needs no fields, names of one CRM mean nothing in the
    other, and Salesforce deploys with the sf CLI."""
    (tmp_path / "ledger").mkdir()
    ledger = _write_config(tmp_path / "ledger", {"crm": {"kind": "ledger"}})
    assert "the built-in ledger has every field" in _cli(ledger, "fields", "--out", "x").output
    mismatch = _cli(salesforce_config, "fields", "--crm", "dynamics", "--out", "x")
    assert mismatch.exit_code == 1 and "waconsent init --preset dynamics" in mismatch.output
    applied = _cli(salesforce_config, "fields", "--out", str(tmp_path / "a"), "--apply")
    assert applied.exit_code == 1 and "sf project deploy start" in applied.output


# ---- Dataverse --------------------------------------------------------------------------------

def _dynamics_raw(**mapping: Any) -> dict[str, Any]:
    return _preset("dynamics", dynamics={
        "url": ORG_URL, "tenant_id": TENANT_ID, "client_id": CLIENT_ID, "auth": "client_secret",
        "authority_host": AUTHORITY_HOST}, mapping=mapping)


@pytest.fixture
def dynamics_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DYNAMICS_CLIENT_SECRET", CLIENT_SECRET)
    return _write_config(tmp_path, _dynamics_raw())


@pytest.fixture
def fake() -> Iterator[FakeDataverse]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        fake = FakeDataverse().install(mock)
        # a table with none of the consent columns but the user id, made earlier by hand
        fake.attributes = {name: attribute for name, attribute in fake.attributes.items()
                           if not name.startswith("new_") or name == "new_whatsappuserid"}
        yield fake


def _bodies(out: Path) -> dict[str, dict[str, Any]]:
    return {path.stem: json.loads(path.read_text()) for path in out.glob("*.json")}


def _label(body: Mapping[str, Any], key: str) -> str:
    [label] = body[key]["LocalizedLabels"]
    assert label["@odata.type"] == "Microsoft.Dynamics.CRM.LocalizedLabel"
    assert label["LanguageCode"] == 1033
    return str(label["Label"])


def test_dataverse_bodies_have_the_web_api_shapes(dynamics_config: Path, tmp_path: Path
                                                  ) -> None:
    """One body per column: its @odata.type, SchemaName, labels, RequiredLevel, and per type
    the OptionSet, the UTC-storing date behaviour, or the MaxLength."""
    out = tmp_path / "dv"
    assert _cli(dynamics_config, "fields", "--crm", "dynamics", "--out", str(out)
                ).exit_code == 0
    bodies = _bodies(out)
    assert len(bodies) == 9
    for name, body in bodies.items():
        assert body["SchemaName"].lower() == name
        assert body["RequiredLevel"]["Value"] == "None"
        assert body["DisplayName"]["@odata.type"] == "Microsoft.Dynamics.CRM.Label"
        assert _label(body, "DisplayName") and _label(body, "Description")
        assert body["AttributeType"] == DATAVERSE_TYPES[body["@odata.type"]]
    opt_in = bodies["new_whatsappoptin"]
    assert opt_in["@odata.type"] == "Microsoft.Dynamics.CRM.BooleanAttributeMetadata"
    assert opt_in["SchemaName"] == "new_WhatsAppOptIn" and opt_in["DefaultValue"] is False
    assert opt_in["OptionSet"]["TrueOption"]["Value"] == 1
    assert opt_in["OptionSet"]["FalseOption"]["Value"] == 0
    assert _label(opt_in["OptionSet"]["TrueOption"], "Label") == "Yes"
    date = bodies["new_whatsappoptindate"]
    assert date["@odata.type"] == "Microsoft.Dynamics.CRM.DateTimeAttributeMetadata"
    assert (date["Format"], date["DateTimeBehavior"]) == ("DateAndTime", {"Value": "UserLocal"})
    lengths = {name: b.get("MaxLength") for name, b in bodies.items()
               if b["AttributeType"] == "String"}
    assert lengths == {"new_whatsappoptinip": 45, "new_whatsappoptinsource": 255,
                       "new_whatsappuserid": 64}
    requests_txt = (out / "requests.txt").read_text()
    assert (f"POST {ORG_URL}/api/data/v9.2/EntityDefinitions(LogicalName='contact')/Attributes"
            "  < new_whatsappoptin.json") in requests_txt


def test_a_choice_opt_in_is_a_picklist_column_with_the_mapped_option_values(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With integer [mapping.values] the opt-in is a local Choice of exactly those options."""
    raw = _dynamics_raw(values={"opted_in": OPTED_IN, "opted_out": OPTED_OUT})
    out = tmp_path / "dv"
    _cli(_write_config(tmp_path, raw), "fields", "--out", str(out))
    choice = _bodies(out)["new_whatsappoptin"]
    assert choice["@odata.type"] == "Microsoft.Dynamics.CRM.PicklistAttributeMetadata"
    assert choice["OptionSet"]["IsGlobal"] is False
    assert choice["OptionSet"]["OptionSetType"] == "Picklist"
    assert [o["Value"] for o in choice["OptionSet"]["Options"]] == [OPTED_IN, OPTED_OUT]


def test_apply_creates_the_missing_columns_and_then_check_passes(
        dynamics_config: Path, fake: FakeDataverse, tmp_path: Path) -> None:
    """`check` fails; `--apply --solution` POSTs the 8 missing columns into the solution,
    leaves the existing one untouched, and then `check` and the preflight pass."""
    assert _cli(dynamics_config, "check").exit_code == 1
    existing = fake.attributes["new_whatsappuserid"]
    result = _cli(dynamics_config, "fields", "--out", str(tmp_path / "dv"), "--apply",
                  "--solution", "WaconsentFields")
    assert result.exit_code == 0, result.output
    assert "exists already, left as it is: new_whatsappuserid" in result.output
    assert [schema for schema, _ in fake.created_columns] == [
        "new_WhatsAppOptIn", "new_WhatsAppOptInDate", "new_WhatsAppOptInIP",
        "new_WhatsAppOptInSource", "new_WhatsAppOptOutDate", "new_WhatsAppLastInbound",
        "new_WhatsAppSessionExpires", "new_WhatsAppProofMissing"]
    assert {solution for _, solution in fake.created_columns} == {"WaconsentFields"}
    assert fake.attributes["new_whatsappuserid"] is existing
    assert fake.attributes["new_whatsappoptinsource"].max_length == 255
    check = _cli(dynamics_config, "check")
    assert check.exit_code == 0, check.output
    loaded = LoadedConfig(parse(_dynamics_raw()), Secrets({
        "DYNAMICS_CLIENT_SECRET": CLIENT_SECRET}), None)
    connector = DynamicsConnector.from_config(loaded, policy=RetryPolicy(sleep=lambda _: None))
    try:
        connector.preflight()
    finally:
        connector.close()


def test_apply_twice_creates_nothing_the_second_time(dynamics_config: Path,
                                                     fake: FakeDataverse, tmp_path: Path) -> None:
    """A second --apply finds every column and POSTs nothing."""
    _cli(dynamics_config, "fields", "--out", str(tmp_path / "a"), "--apply")
    posts = len(fake.column_bodies)
    again = _cli(dynamics_config, "fields", "--out", str(tmp_path / "b"), "--apply")
    assert again.exit_code == 0 and "created:" not in again.output
    assert len(fake.column_bodies) == posts == 8


class _Client:
    """A MetadataClient whose table lists nothing but Dataverse answers as staged."""

    def __init__(self, *answers: tuple[int, str]) -> None:
        self.answers = list(answers)
        self.posted: list[tuple[str, Mapping[str, str]]] = []

    def table_logical_name(self) -> str:
        return "contact"

    def existing_columns(self) -> list[str]:
        return []

    def post_metadata(self, path: str, body: Mapping[str, Any],
                      headers: Mapping[str, str]) -> Any:
        self.posted.append((path, headers))
        status, code = self.answers.pop(0)
        return _Answer(status, json.dumps({"error": {"code": code, "message": "said"}}))


class _Answer:
    def __init__(self, status: int, text: str) -> None:
        self.status_code, self.text = status, text


def test_apply_takes_a_duplicate_answer_as_existing_and_stops_on_another_refusal() -> None:
    """A column created meanwhile (0x80047013) counts as existing; any other refusal stops
    with what was created before it."""
    wanted = {f"new_c{n}": {"SchemaName": f"new_c{n}"} for n in range(3)}
    client = _Client((204, ""), (400, "0x80047013"), (403, "0x80040220"))
    with pytest.raises(FatalError, match=r"'new_c2'.*0x80040220.*created before it: new_c0"):
        dynamics_fields.apply(client, wanted)
    client = _Client((204, ""), (400, "0x80047013"), (204, ""))
    applied = dynamics_fields.apply(client, wanted, "Sol")
    assert (applied.created, applied.existing) == (("new_c0", "new_c2"), ("new_c1",))
    assert client.posted[0] == ("EntityDefinitions(LogicalName='contact')/Attributes",
                                {"MSCRM.SolutionUniqueName": "Sol"})

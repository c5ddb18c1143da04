"""`waconsent fields` for Dynamics 365: the Dataverse Web API column bodies, and `--apply`
against the stateful Dataverse fake, after which `waconsent check` and the preflight pass."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import responses

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
from tests.fields_support import cli, preset, write_config
from waconsent.config import LoadedConfig, Secrets, parse
from waconsent.connectors import dynamics_fields
from waconsent.connectors.dynamics import DynamicsConnector
from waconsent.connectors.http import RetryPolicy
from waconsent.errors import FatalError

DATAVERSE_TYPES = {
    "Microsoft.Dynamics.CRM.BooleanAttributeMetadata": "Boolean",
    "Microsoft.Dynamics.CRM.DateTimeAttributeMetadata": "DateTime",
    "Microsoft.Dynamics.CRM.StringAttributeMetadata": "String",
    "Microsoft.Dynamics.CRM.PicklistAttributeMetadata": "Picklist",
}


def _dynamics_raw(**mapping: Any) -> dict[str, Any]:
    return preset(
        "dynamics",
        dynamics={
            "url": ORG_URL,
            "tenant_id": TENANT_ID,
            "client_id": CLIENT_ID,
            "auth": "client_secret",
            "authority_host": AUTHORITY_HOST,
        },
        mapping=mapping,
    )


@pytest.fixture
def dynamics_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DYNAMICS_CLIENT_SECRET", CLIENT_SECRET)
    return write_config(tmp_path, _dynamics_raw())


@pytest.fixture
def fake() -> Iterator[FakeDataverse]:
    # Not strict: the fake registers every route of the service and a test uses a few.
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        fake = FakeDataverse().install(mock)
        # a table with none of the consent columns but the user id, made earlier by hand
        fake.attributes = {
            name: attribute
            for name, attribute in fake.attributes.items()
            if not name.startswith("new_") or name == "new_whatsappuserid"
        }
        yield fake


def _bodies(out: Path) -> dict[str, dict[str, Any]]:
    return {path.stem: json.loads(path.read_text()) for path in out.glob("*.json")}


def _label(body: Mapping[str, Any], key: str) -> str:
    [label] = body[key]["LocalizedLabels"]
    assert label["@odata.type"] == "Microsoft.Dynamics.CRM.LocalizedLabel"
    assert label["LanguageCode"] == 1033
    return str(label["Label"])


def test_dataverse_bodies_have_the_web_api_shapes(dynamics_config: Path, tmp_path: Path) -> None:
    """Each column body has the Web API's @odata.type, SchemaName, labels and type settings."""
    out = tmp_path / "dv"
    assert cli(dynamics_config, "fields", "--crm", "dynamics", "--out", str(out)).exit_code == 0
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
    lengths = {
        name: b.get("MaxLength") for name, b in bodies.items() if b["AttributeType"] == "String"
    }
    assert lengths == {
        "new_whatsappoptinip": 45,
        "new_whatsappoptinsource": 255,
        "new_whatsappuserid": 64,
    }
    requests_txt = (out / "requests.txt").read_text()
    assert (
        f"POST {ORG_URL}/api/data/v9.2/EntityDefinitions(LogicalName='contact')/Attributes"
        "  < new_whatsappoptin.json"
    ) in requests_txt


def test_a_choice_opt_in_is_a_picklist_column_with_the_mapped_option_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With integer [mapping.values] the opt-in is a local Choice of exactly those options."""
    raw = _dynamics_raw(values={"opted_in": OPTED_IN, "opted_out": OPTED_OUT})
    out = tmp_path / "dv"
    cli(write_config(tmp_path, raw), "fields", "--out", str(out))
    choice = _bodies(out)["new_whatsappoptin"]
    assert choice["@odata.type"] == "Microsoft.Dynamics.CRM.PicklistAttributeMetadata"
    assert choice["OptionSet"]["IsGlobal"] is False
    assert choice["OptionSet"]["OptionSetType"] == "Picklist"
    assert [o["Value"] for o in choice["OptionSet"]["Options"]] == [OPTED_IN, OPTED_OUT]


def test_apply_creates_the_missing_columns_and_then_check_passes(
    dynamics_config: Path, fake: FakeDataverse, tmp_path: Path
) -> None:
    """--apply creates only the missing columns, in the solution; then check and preflight pass."""
    assert cli(dynamics_config, "check").exit_code == 1
    existing = fake.attributes["new_whatsappuserid"]
    result = cli(
        dynamics_config,
        "fields",
        "--out",
        str(tmp_path / "dv"),
        "--apply",
        "--solution",
        "WaconsentFields",
    )
    assert result.exit_code == 0, result.output
    assert "exists already, left as it is: new_whatsappuserid" in result.output
    assert [schema for schema, _ in fake.created_columns] == [
        "new_WhatsAppOptIn",
        "new_WhatsAppOptInDate",
        "new_WhatsAppOptInIP",
        "new_WhatsAppOptInSource",
        "new_WhatsAppOptOutDate",
        "new_WhatsAppLastInbound",
        "new_WhatsAppSessionExpires",
        "new_WhatsAppProofMissing",
    ]
    assert {solution for _, solution in fake.created_columns} == {"WaconsentFields"}
    assert fake.attributes["new_whatsappuserid"] is existing
    assert fake.attributes["new_whatsappoptinsource"].max_length == 255
    check = cli(dynamics_config, "check")
    assert check.exit_code == 0, check.output
    loaded = LoadedConfig(
        parse(_dynamics_raw()), Secrets({"DYNAMICS_CLIENT_SECRET": CLIENT_SECRET}), None
    )
    connector = DynamicsConnector.from_config(loaded, policy=RetryPolicy(sleep=lambda _: None))
    try:
        connector.preflight()
    finally:
        connector.close()


def test_apply_twice_creates_nothing_the_second_time(
    dynamics_config: Path, fake: FakeDataverse, tmp_path: Path
) -> None:
    """A second --apply finds every column and POSTs nothing."""
    cli(dynamics_config, "fields", "--out", str(tmp_path / "a"), "--apply")
    posts = len(fake.column_bodies)
    again = cli(dynamics_config, "fields", "--out", str(tmp_path / "b"), "--apply")
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

    def post_metadata(self, path: str, body: Mapping[str, Any], headers: Mapping[str, str]) -> Any:
        self.posted.append((path, headers))
        status, code = self.answers.pop(0)
        return _Answer(status, json.dumps({"error": {"code": code, "message": "said"}}))


class _Answer:
    def __init__(self, status: int, text: str) -> None:
        self.status_code, self.text = status, text


def test_apply_takes_a_duplicate_answer_as_existing_and_stops_on_another_refusal() -> None:
    """A duplicate (0x80047013) counts as existing; another refusal stops, naming what was made."""
    wanted = {f"new_c{n}": {"SchemaName": f"new_c{n}"} for n in range(3)}
    client = _Client((204, ""), (400, "0x80047013"), (403, "0x80040220"))
    with pytest.raises(FatalError, match=r"'new_c2'.*0x80040220.*created before it: new_c0"):
        dynamics_fields.apply(client, wanted)
    client = _Client((204, ""), (400, "0x80047013"), (204, ""))
    applied = dynamics_fields.apply(client, wanted, "Sol")
    assert (applied.created, applied.existing) == (("new_c0", "new_c2"), ("new_c1",))
    assert client.posted[0] == (
        "EntityDefinitions(LogicalName='contact')/Attributes",
        {"MSCRM.SolutionUniqueName": "Sol"},
    )

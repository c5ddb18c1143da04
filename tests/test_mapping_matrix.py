"""`waconsent check` and each CRM's preflight give the same verdicts, for every field type.

Each kind of field below is created on the stateful fakes (Salesforce describe,
Dataverse EntityDefinitions) and every key of the mapping is pointed at it. Then the
preflight's ConfigError and the `check` command's are compared line by line, and the
keys refused are compared with what the kind may hold: one row states it for every CRM.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
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
    FakeAttribute,
    FakeDataverse,
)
from tests.fakes.salesforce import INSTANCE, FakeField, FakeSalesforce, default_schema
from waconsent import config
from waconsent.cli import main
from waconsent.config.check import LEDGER, MappingUnderCheck, check_mapping, problem_lines
from waconsent.connectors.base import CrmConnector
from waconsent.connectors.dynamics import DynamicsConnector
from waconsent.connectors.http import RetryPolicy
from waconsent.connectors.ledger import LedgerCrm
from waconsent.connectors.salesforce import SalesforceConnector
from waconsent.domain import DATETIME_FIELDS, LOGICAL_FIELDS, FieldDescription
from waconsent.errors import ConfigError
from waconsent.store.engine import open_engine

USER, PASSWORD, TOKEN = "integration@acme.example", "s3cret-Pa55", "TOKEN123456"
DYNAMICS_PRESET = (
    resources.files("waconsent.config").joinpath("presets/dynamics.toml").read_text("utf-8")
)
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "waconsent.toml"

PHONES = "mapping.phone_fields"
KEYS = frozenset({*(f"mapping.fields.{name}" for name in LOGICAL_FIELDS), PHONES})
OPT_IN, PROOF_MISSING = "mapping.fields.opt_in", "mapping.fields.proof_missing"
USER_ID = "mapping.fields.whatsapp_user_id"
MOMENTS = frozenset(f"mapping.fields.{name}" for name in DATETIME_FIELDS)
EVIDENCE = frozenset({"mapping.fields.opt_in_ip", "mapping.fields.opt_in_source"})


@dataclass(frozen=True)
class Kind:
    """One kind of field as each CRM types it (None: that CRM has no such type), and the
    keys it may stand for; every other key must be refused, by check and preflight alike."""

    label: str
    salesforce: str | None
    dataverse: str | None
    ledger: str | None
    holds: frozenset[str]
    updateable: bool = True


MATRIX = (
    Kind("checkbox", "boolean", "Boolean", "boolean", frozenset({OPT_IN, PROOF_MISSING})),
    Kind("single choice", "picklist", "Picklist", None, frozenset({OPT_IN})),
    Kind("multi-select choice", "multipicklist", "Virtual", None, frozenset()),
    Kind("record state", None, "State", None, frozenset()),
    Kind("record status reason", None, "Status", None, frozenset()),
    Kind("date and time", "datetime", "DateTime", "datetime", MOMENTS),
    Kind("date only", "date", None, None, frozenset()),
    Kind("single-line text", "string", "String", "string", EVIDENCE | {USER_ID, PHONES}),
    Kind("multi-line text", "textarea", "Memo", None, EVIDENCE),
    Kind("encrypted text", "encryptedstring", None, None, EVIDENCE),
    Kind("phone", "phone", None, None, frozenset({PHONES})),
    Kind("email", "email", None, None, frozenset()),
    Kind("url", "url", None, None, EVIDENCE),
    Kind("whole number", "int", "Integer", None, frozenset()),
    Kind("decimal number", "double", "Double", None, frozenset()),
    Kind("currency", "currency", "Money", None, frozenset()),
    Kind("lookup", "reference", "Lookup", None, frozenset()),
    # phone fields are only read, so only they may be read-only
    Kind("read-only text", "string", "String", "string", frozenset({PHONES}), updateable=False),
)


def _kinds(crm: str) -> list[Any]:
    return [pytest.param(kind, id=kind.label) for kind in MATRIX if getattr(kind, crm)]


def _toml(document: Mapping[str, Any], prefix: str = "") -> str:
    """A config document as TOML (JSON spells these strings, numbers and lists alike)."""
    scalars = [
        f"{key} = {json.dumps(value)}\n"
        for key, value in document.items()
        if not isinstance(value, Mapping)
    ]
    tables = [
        _toml(value, f"{prefix}{key}.")
        for key, value in document.items()
        if isinstance(value, Mapping)
    ]
    return (f"[{prefix.rstrip('.')}]\n" if prefix else "") + "".join(scalars + tables)


def _every_key_to(name: str) -> dict[str, Any]:
    return {"fields": {logical: name for logical in LOGICAL_FIELDS}, "phone_fields": [name]}


def _both_paths(
    path: Path, connect: Callable[[config.LoadedConfig], CrmConnector]
) -> tuple[tuple[str, ...], Result]:
    """The preflight's problems (none when it passes) and the `check` command's result."""
    connector = connect(config.load(path))
    problems: tuple[str, ...] = ()
    try:
        connector.preflight()
    except ConfigError as refused:
        problems = refused.problems
    finally:
        connector.close()
    return problems, CliRunner().invoke(main, ["--config", str(path), "check"])


def _assert_same(problems: tuple[str, ...], result: Result, path: Path) -> set[str]:
    """`check` exits as preflight does and reports its very problems, in order; returns the
    keys refused."""
    if problems:
        assert result.exit_code == 1, result.output
        assert str(ConfigError(problems, source=str(path))) in result.output
    else:
        assert result.exit_code == 0, result.output
        assert "all mapped fields exist, fit their types and are updateable" in result.output
    return {problem.split(": ", 1)[0] for problem in problems}


# ---- Salesforce -----------------------------------------------------------------------------


@pytest.fixture
def salesforce_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SALESFORCE_PASSWORD", PASSWORD)
    monkeypatch.setenv("SALESFORCE_SECURITY_TOKEN", TOKEN)


def _salesforce(
    tmp_path: Path, mapping: Mapping[str, Any], *extra: FakeField
) -> tuple[tuple[str, ...], Result, Path]:
    schema = default_schema()
    schema["Contact"].update({field.name: field for field in extra})
    org = FakeSalesforce(schema=schema)
    org.users[USER] = PASSWORD + TOKEN
    path = tmp_path / "salesforce.toml"
    path.write_text(
        _toml(
            {
                "store": {"url": f"sqlite:///{tmp_path / 'w.db'}"},
                "crm": {"kind": "salesforce"},
                "salesforce": {"auth": "password", "username": USER, "instance_url": INSTANCE},
                "mapping": {"object": "Contact", **mapping},
            }
        ),
        encoding="utf-8",
    )
    with org.active():
        problems, result = _both_paths(
            path,
            lambda loaded: SalesforceConnector.from_config(
                loaded, policy=RetryPolicy(sleep=lambda _: None)
            ),
        )
    return problems, result, path


@pytest.mark.parametrize("kind", _kinds("salesforce"))
@pytest.mark.usefixtures("salesforce_env")
def test_salesforce_check_and_preflight_agree_on_every_field_type(
    kind: Kind, tmp_path: Path
) -> None:
    """Each Salesforce field type is refused for the same keys, in the same words, by both."""
    field = FakeField(
        "Matrix__c",
        kind.salesforce or "",
        255,
        updateable=kind.updateable,
        picklist=("Yes", "No") if "picklist" in str(kind.salesforce) else (),
    )
    problems, result, path = _salesforce(
        tmp_path,
        {**_every_key_to("Matrix__c"), "values": {"opted_in": "Yes", "opted_out": "No"}},
        field,
    )
    assert _assert_same(problems, result, path) == KEYS - kind.holds


@pytest.mark.usefixtures("salesforce_env")
def test_salesforce_near_names_wrong_case_and_picklist_values_agree(tmp_path: Path) -> None:
    """Near-name and case hints and a picklist's wrong or missing values read alike in both."""
    consent = FakeField("Consent__c", "picklist", 255, picklist=("Yes", "No"))
    problems, result, path = _salesforce(
        tmp_path,
        {
            "phone_fields": ["mobilephone", "Fax"],
            "fields": {
                "opt_in": "Consent__c",
                "opt_in_date": "WhatsApp_Opt_In_Dte__c",
                "opt_out_date": "whatsapp_opt_out_date__c",
            },
            "values": {"opted_in": "Maybe"},
        },
        consent,
    )
    assert _assert_same(problems, result, path) == {
        PHONES,
        "mapping.fields.opt_in_date",
        "mapping.fields.opt_out_date",
        "mapping.values.opted_in",
        "mapping.values.opted_out",
    }
    assert (
        "mapping.phone_fields: object Contact has no field 'mobilephone' "
        "(did you mean 'MobilePhone'? the case matters)"
    ) in problems
    assert "mapping.phone_fields: object Contact has no field 'Fax'" in problems
    assert (
        "mapping.fields.opt_in_date: object Contact has no field 'WhatsApp_Opt_In_Dte__c' "
        "(did you mean 'WhatsApp_Opt_In_Date__c'?)"
    ) in problems


# ---- Dataverse ------------------------------------------------------------------------------


@pytest.fixture
def dataverse_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYNAMICS_CLIENT_SECRET", CLIENT_SECRET)


@pytest.fixture
def mock() -> Iterator[responses.RequestsMock]:
    # The fake registers every route of the service and a check uses a few of them.
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


def _dataverse(
    tmp_path: Path, fake: FakeDataverse, mapping: Mapping[str, Any], **dynamics: Any
) -> tuple[tuple[str, ...], Result, Path]:
    document = tomllib.loads(DYNAMICS_PRESET)
    document["store"]["url"] = f"sqlite:///{tmp_path / 'w.db'}"
    document["dynamics"].update(
        {
            "url": ORG_URL,
            "tenant_id": TENANT_ID,
            "client_id": CLIENT_ID,
            "authority_host": AUTHORITY_HOST,
            **dynamics,
        }
    )
    document["mapping"].update(mapping)
    path = tmp_path / "dynamics.toml"
    path.write_text(_toml(document), encoding="utf-8")
    problems, result = _both_paths(
        path,
        lambda loaded: DynamicsConnector.from_config(
            loaded, policy=RetryPolicy(sleep=lambda _: None)
        ),
    )
    return problems, result, path


_OPTIONS = {
    "Picklist": ((OPTED_IN, "Opted in"), (OPTED_OUT, "Opted out")),
    "Virtual": ((OPTED_IN, "WhatsApp"), (OPTED_OUT, "Email")),
    "State": ((0, "Active"), (1, "Inactive")),
    "Status": ((1, "Active"), (2, "Inactive")),
}


@pytest.mark.parametrize("kind", _kinds("dataverse"))
@pytest.mark.usefixtures("dataverse_env")
def test_dataverse_check_and_preflight_agree_on_every_attribute_type(
    kind: Kind, tmp_path: Path, mock: responses.RequestsMock
) -> None:
    """Each Dataverse attribute type is refused for the same keys, in the same words, by both."""
    fake = FakeDataverse().install(mock)
    kind_type = kind.dataverse or ""
    fake.attributes["new_matrix"] = FakeAttribute(
        "new_matrix",
        kind_type,
        updatable=kind.updateable,
        max_length=100 if kind_type in ("String", "Memo") else None,
        options=_OPTIONS.get(kind_type, ()),
        metadata_type="MultiSelectPicklist" if kind_type == "Virtual" else None,
    )
    problems, result, path = _dataverse(
        tmp_path,
        fake,
        {**_every_key_to("new_matrix"), "values": {"opted_in": OPTED_IN, "opted_out": OPTED_OUT}},
    )
    assert _assert_same(problems, result, path) == KEYS - kind.holds


@pytest.mark.usefixtures("dataverse_env")
def test_dataverse_near_names_choice_values_and_change_tracking_agree(
    tmp_path: Path, mock: responses.RequestsMock
) -> None:
    """Hints, a foreign Choice value and change tracking off read alike in check and preflight."""
    fake = FakeDataverse(opt_in_choice=True, change_tracking_enabled=False).install(mock)
    problems, result, path = _dataverse(
        tmp_path,
        fake,
        {
            "phone_fields": ["MobilePhone", "telephone1"],
            "fields": {
                "opt_in": "new_whatsappoptin",
                "opt_in_date": "new_whatsappoptindte",
                "opt_out_date": "new_whatsappoptoutdate",
            },
            "values": {"opted_in": 1, "opted_out": OPTED_OUT},
        },
        change_tracking=True,
    )
    assert _assert_same(problems, result, path) == {
        PHONES,
        "mapping.fields.opt_in_date",
        "mapping.values.opted_in",
        "dynamics.change_tracking",
    }
    assert (
        "mapping.phone_fields: the contact entity (entity set 'contacts') has no attribute "
        "'MobilePhone' (did you mean 'mobilephone'? the case matters)"
    ) in problems
    assert any("did you mean 'new_whatsappoptindate'" in p for p in problems)
    assert (
        "mapping.values.opted_in: 1 is not an option value of 'new_whatsappoptin' "
        f"(expected one of {OPTED_IN}, {OPTED_OUT}, 100000002)"
    ) in problems


# ---- the ledger -----------------------------------------------------------------------------


def test_ledger_check_and_preflight_agree_its_table_fits(tmp_path: Path) -> None:
    """The ledger's own table passes check and preflight, every key and phone column ok."""
    path = tmp_path / "ledger.toml"
    path.write_text(
        EXAMPLE.read_text(encoding="utf-8").replace(
            "sqlite:///waconsent-demo.db", f"sqlite:///{tmp_path / 'w.db'}"
        ),
        encoding="utf-8",
    )
    engine = open_engine(f"sqlite:///{tmp_path / 'w.db'}")
    try:
        problems, result = _both_paths(path, lambda _: LedgerCrm(engine))
        verdicts = LedgerCrm(engine).mapping_verdicts()
    finally:
        engine.dispose()
    assert _assert_same(problems, result, path) == set()
    assert {v.key for v in verdicts} == KEYS and all(v.ok for v in verdicts)
    assert [v.crm_field for v in verdicts if v.key == PHONES] == ["mobile_phone", "phone"]


@pytest.mark.parametrize("kind", _kinds("ledger"))
def test_ledger_types_hold_what_the_matrix_says(kind: Kind) -> None:
    """The ledger column of the type table holds the same keys as its peers' rows."""
    mapping = MappingUnderCheck(
        LEDGER,
        "the ledger's contacts table",
        {logical: "matrix" for logical in LOGICAL_FIELDS},
        ["matrix"],
    )
    described = {"matrix": FieldDescription("matrix", kind.ledger or "", kind.updateable)}
    refused = {line.split(": ", 1)[0] for line in problem_lines(check_mapping(mapping, described))}
    assert refused == KEYS - kind.holds

"""Configuration: every error names the file, the key and what was expected, all at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from waconsent import config
from waconsent.errors import ConfigError

SALESFORCE_OK = """
[crm]
kind = "salesforce"
[salesforce]
instance_url = "https://acme.my.salesforce.com"
auth = "jwt"
username = "integration@acme.example"
consumer_key = "3MVG9"
private_key_file = "/etc/waconsent/salesforce.key"
[mapping]
object = "Contact"
[mapping.fields]
opt_in = "WhatsApp_Opt_In__c"
opt_in_date = "WhatsApp_Opt_In_Date__c"
opt_out_date = "WhatsApp_Opt_Out_Date__c"
"""


def load_text(tmp_path: Path, text: str) -> config.LoadedConfig:
    path = tmp_path / "waconsent.toml"
    path.write_text(text, encoding="utf-8")
    return config.load(path, environ={})


def problems(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text)
    return str(caught.value)


def test_empty_file_is_the_ledger_default(tmp_path: Path) -> None:
    """An empty file is a valid ledger configuration with the documented defaults."""
    loaded = load_text(tmp_path, "")
    assert loaded.settings.crm.kind == "ledger"
    assert loaded.settings.store.url == "sqlite:///waconsent.db"
    assert loaded.settings.webhook.max_body_bytes == 4 * 1024 * 1024


def test_settings_are_frozen(tmp_path: Path) -> None:
    """Settings cannot be changed after load."""
    loaded = load_text(tmp_path, "")
    with pytest.raises(ValueError, match="frozen"):
        loaded.settings.crm.kind = "salesforce"  # type: ignore[misc]


def test_missing_file_hints_at_init(tmp_path: Path) -> None:
    """A missing config file says how to create one."""
    with pytest.raises(ConfigError, match="waconsent init"):
        config.load(tmp_path / "nope.toml", environ={})


def test_path_resolution_order(tmp_path: Path) -> None:
    """--config wins over $WACONSENT_CONFIG, which wins over ./waconsent.toml."""
    from waconsent.config.loading import resolve_path

    assert resolve_path("a.toml", {"WACONSENT_CONFIG": "b.toml"}) == Path("a.toml")
    assert resolve_path(None, {"WACONSENT_CONFIG": "b.toml"}) == Path("b.toml")
    assert resolve_path(None, {}) == Path("waconsent.toml")


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    """Broken TOML is reported with the file name and the parser's position."""
    message = problems(tmp_path, "[crm\nkind = 1")
    assert "waconsent.toml" in message and "not valid TOML" in message


def test_all_errors_reported_at_once(tmp_path: Path) -> None:
    """Several problems in one file come back together, each with its key path."""
    message = problems(
        tmp_path,
        """
[crm]
kind = "sap"
[webhook]
port = 99999
prot = 1
[mapping]
default_region = "XX"
[schedule]
timezone = "Mars/Olympus"
""",
    )
    assert "5 problems" in message
    assert "crm.kind: expected one of 'salesforce', 'dynamics' or 'ledger', got 'sap'" in message
    assert "webhook.port" in message
    assert "webhook.prot: unknown key" in message
    assert "mapping.default_region" in message and "'XX'" in message
    assert "schedule.timezone" in message and "Europe/Berlin" in message


@pytest.mark.parametrize(
    ("section", "key", "variable"),
    [
        ("salesforce", "password", "SALESFORCE_PASSWORD"),
        ("salesforce", "security_token", "SALESFORCE_SECURITY_TOKEN"),
        ("salesforce", "consumer_secret", "SALESFORCE_CONSUMER_SECRET"),
        ("salesforce", "access_token", "SALESFORCE_ACCESS_TOKEN"),
        ("dynamics", "client_secret", "DYNAMICS_CLIENT_SECRET"),
        ("dynamics", "access_token", "DYNAMICS_ACCESS_TOKEN"),
        ("whatsapp", "app_secret", "WHATSAPP_APP_SECRET"),
        ("webhook", "verify_token", "WHATSAPP_VERIFY_TOKEN"),
    ],
)
def test_secret_in_file_names_the_variable(
    tmp_path: Path, section: str, key: str, variable: str
) -> None:
    """A secret-looking key is refused with the environment variable to use instead."""
    message = problems(tmp_path, f'[{section}]\n{key} = "hunter2"\n')
    assert f"{section}.{key}" in message and variable in message
    assert "hunter2" not in message


def test_unknown_secret_looking_key_is_refused(tmp_path: Path) -> None:
    """Any other key that looks like a secret is refused, not silently ignored."""
    message = problems(tmp_path, '[store]\napi_key = "x"\n')
    assert "store.api_key: looks like a secret" in message


def test_key_material_in_a_value_is_refused(tmp_path: Path) -> None:
    """Private key contents pasted into the file are refused."""
    message = problems(tmp_path, '[salesforce]\nusername = "-----BEGIN PRIVATE KEY-----"\n')
    assert "salesforce.username: holds key material" in message


def test_password_in_store_url_is_refused(tmp_path: Path) -> None:
    """A database password in the URL is refused with PGPASSWORD as the way."""
    message = problems(tmp_path, '[store]\nurl = "postgresql+psycopg://u:pw@db/x"\n')
    assert "PGPASSWORD" in message and ":pw@" not in message


def test_secrets_come_from_the_environment(tmp_path: Path) -> None:
    """Secrets are read from the named variables and never shown in repr."""
    path = tmp_path / "waconsent.toml"
    path.write_text("", encoding="utf-8")
    loaded = config.load(path, environ={"WHATSAPP_APP_SECRET": "s3cr3t"})
    assert loaded.secrets.get("WHATSAPP_APP_SECRET") == "s3cr3t"
    assert "s3cr3t" not in repr(loaded)
    with pytest.raises(ConfigError, match="export WHATSAPP_VERIFY_TOKEN"):
        loaded.secrets.require("WHATSAPP_VERIFY_TOKEN", "the webhook receiver")


def test_salesforce_config_valid(tmp_path: Path) -> None:
    """A complete Salesforce configuration loads, with mapped fields by logical name."""
    settings = load_text(tmp_path, SALESFORCE_OK).settings
    assert settings.mapped_fields()["opt_in"] == "WhatsApp_Opt_In__c"
    assert settings.crm_name.startswith("salesforce:")


def test_salesforce_auth_mode_requirements(tmp_path: Path) -> None:
    """Each auth mode names the keys it needs."""
    text = SALESFORCE_OK.replace('username = "integration@acme.example"\n', "")
    assert "salesforce.username: required for salesforce.auth = 'jwt'" in problems(tmp_path, text)


def test_mapping_without_rule_fields_names_them(tmp_path: Path) -> None:
    """A CRM mapping lacking a field the rules need says which field."""
    text = SALESFORCE_OK.replace('opt_out_date = "WhatsApp_Opt_Out_Date__c"\n', "")
    message = problems(tmp_path, text)
    assert "mapping.fields.opt_out_date: required" in message


def test_dynamics_url_must_be_https(tmp_path: Path) -> None:
    """A Dynamics org URL that is not https is a configuration error."""
    message = problems(
        tmp_path,
        """
[crm]
kind = "dynamics"
[dynamics]
url = "http://acme.crm4.dynamics.com"
auth = "access_token"
[mapping]
object = "contacts"
[mapping.fields]
opt_in = "a"
opt_in_date = "b"
opt_out_date = "c"
""",
    )
    assert "dynamics.url: expected an https:// organization URL" in message


def test_keyword_in_both_lists_is_refused(tmp_path: Path) -> None:
    """A keyword cannot both opt in and opt out."""
    message = problems(
        tmp_path, '[whatsapp]\nopt_in_keywords = ["Stop!"]\nopt_out_keywords = ["STOP"]\n'
    )
    assert "whatsapp" in message and "stop" in message


@pytest.mark.parametrize("preset", ["ledger", "salesforce", "dynamics"])
def test_presets_load(preset: str) -> None:
    """Every starter config written by `waconsent init` is itself valid."""
    import tomllib
    from importlib import resources

    text = resources.files("waconsent.config").joinpath(f"presets/{preset}.toml").read_text()
    settings = config.parse(tomllib.loads(text), source=preset)
    assert settings.crm.kind == preset

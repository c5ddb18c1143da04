"""The systemd units in deploy/: they parse, run real waconsent commands, and carry the
sandbox; `systemd-analyze verify` accepts them where it is installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from waconsent.cli import main

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SERVICES = ("waconsent-serve.service", "waconsent-webhook.service", "waconsent-sync.service")
Unit = dict[str, dict[str, list[str]]]
# the sandbox every service must carry, as systemd spells it
HARDENING = {
    "DynamicUser": "yes",
    "ProtectSystem": "strict",
    "StateDirectory": "waconsent",
    "NoNewPrivileges": "yes",
    "PrivateTmp": "yes",
    "ProtectHome": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "CapabilityBoundingSet": "",
    "UMask": "0077",
    "SystemCallArchitectures": "native",
}


def parse_unit(text: str) -> Unit:
    """A unit file with systemd's own reading: sections, `Key=value` split at the first `=`,
    `#`/`;` comments, backslash continuation, and repeated keys kept in order."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"a key outside any section: {line!r}"
        key, equals, value = line.partition("=")
        assert equals and key.strip(), f"not Key=value: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    assert not pending, "a continuation at the end of the file"
    return unit


def _unit(name: str) -> Unit:
    return parse_unit((DEPLOY / name).read_text(encoding="utf-8"))


def _one(unit: Unit, section: str, key: str) -> str:
    [value] = unit[section][key]
    return value


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_is_sandboxed_and_reads_secrets_from_a_file(name: str) -> None:
    """Each service runs as a dynamic user, fully sandboxed, secrets from the EnvironmentFile."""
    service = _unit(name)["Service"]
    for key, value in HARDENING.items():
        assert service.get(key) == [value], key
    assert service["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert service["EnvironmentFile"] == ["/etc/waconsent/waconsent.env"]
    assert service["Environment"] == ["WACONSENT_CONFIG=/etc/waconsent/waconsent.toml"]
    assert "@system-service" in service["SystemCallFilter"]
    assert "~@privileged @resources" in service["SystemCallFilter"]


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("waconsent-serve.service", ["serve"]),
        ("waconsent-webhook.service", ["webhook"]),
        ("waconsent-sync.service", ["sync", "--full"]),
    ],
)
def test_each_unit_starts_a_real_waconsent_command(name: str, command: list[str]) -> None:
    """ExecStart names a command (and options) the CLI really has."""
    executable, *args = _one(_unit(name), "Service", "ExecStart").split()
    assert executable.endswith("/bin/waconsent") and args == command
    cli_command = main.commands[args[0]]
    options = {opt for param in cli_command.params for opt in getattr(param, "opts", [])}
    assert set(args[1:]) <= options


def test_the_receivers_restart_on_failure_and_the_sync_is_one_shot() -> None:
    """serve and webhook restart on failure and start at boot; sync is one-shot, timer-started."""
    for name in ("waconsent-serve.service", "waconsent-webhook.service"):
        unit = _unit(name)
        assert _one(unit, "Service", "Restart") == "on-failure"
        assert _one(unit, "Install", "WantedBy") == "multi-user.target"
        assert _one(unit, "Unit", "After").startswith("network-online.target")
    sync = _unit("waconsent-sync.service")
    assert _one(sync, "Service", "Type") == "oneshot"
    assert "Restart" not in sync["Service"] and "Install" not in sync


def test_the_timer_starts_the_sync_nightly_and_catches_up() -> None:
    """The timer fires nightly, catches up a run missed while off, and starts the service."""
    timer = _unit("waconsent-sync.timer")
    assert _one(timer, "Timer", "OnCalendar") == "*-*-* 02:00:00"
    assert _one(timer, "Timer", "Persistent") == "true"
    assert _one(timer, "Timer", "Unit") == "waconsent-sync.service"
    assert _one(timer, "Install", "WantedBy") == "timers.target"


def test_the_env_example_names_every_secret_and_no_value() -> None:
    """The EnvironmentFile template lists the secrets the README names, all empty."""
    lines = (DEPLOY / "waconsent.env.example").read_text().splitlines()
    keys = {
        line.lstrip("#").split("=")[0]
        for line in lines
        if "=" in line and not line.startswith("# ")
    }
    assert {
        "WHATSAPP_APP_SECRET",
        "WHATSAPP_VERIFY_TOKEN",
        "SALESFORCE_PASSWORD",
        "DYNAMICS_CLIENT_SECRET",
        "PGPASSWORD",
    } <= keys
    assert all(
        line.split("=", 1)[1] in ("", "/run/credentials/waconsent-serve.service/dynamics.pem")
        for line in lines
        if "=" in line and not line.startswith("# ")
    )


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    """systemd-analyze verify loads every unit without a complaint (ExecStart: this venv)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed; the parser tests above still ran")
    waconsent = Path(sys.executable).with_name("waconsent")
    assert waconsent.exists()
    names = [*SERVICES, "waconsent-sync.timer"]
    for name in names:
        text = (DEPLOY / name).read_text(encoding="utf-8")
        text = text.replace("/opt/waconsent/venv/bin/waconsent", str(waconsent))
        text = text.replace("EnvironmentFile=/", "EnvironmentFile=-/")  # not on this machine
        (tmp_path / name).write_text(text, encoding="utf-8")
    result = subprocess.run(
        [analyze, "verify", *(str(tmp_path / n) for n in names)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    complaints = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if any(name in line for name in names)
    ]
    assert result.returncode == 0 and complaints == [], result.stdout + result.stderr

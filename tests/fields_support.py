"""Shared by the `waconsent fields` tests: presets as dicts, a small TOML writer, the CLI."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from waconsent.cli import main

PRESETS = resources.files("waconsent.config").joinpath("presets")


def preset(name: str, **overrides: Any) -> dict[str, Any]:
    raw = tomllib.loads(PRESETS.joinpath(f"{name}.toml").read_text("utf-8"))
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    return raw


def toml(raw: Mapping[str, Any], prefix: str = "") -> str:
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
        text += f"\n[{name}]\n" + toml(value, f"{name}.")
    return text


def write_config(tmp_path: Path, raw: dict[str, Any]) -> Path:
    raw["store"] = {"url": f"sqlite:///{tmp_path / 'w.db'}"}
    path = tmp_path / "waconsent.toml"
    path.write_text(toml(raw), encoding="utf-8")
    return path


def cli(path: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(path), *args], catch_exceptions=False)

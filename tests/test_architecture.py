"""The arrows of the house: pure rules in the middle, I/O at the rim (STYLE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "waconsent"


def imports_of(path: Path) -> set[str]:
    """Every waconsent module a file imports, at any depth (also inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("waconsent")}


def modules(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py")) if folder else sorted(PACKAGE.glob("*.py"))


@pytest.mark.parametrize(
    "path",
    [PACKAGE / "sync" / "rules.py", PACKAGE / "domain.py", PACKAGE / "keywords.py"],
    ids=lambda p: p.name,
)
def test_the_rules_and_the_bottom_floor_import_only_domain(path: Path) -> None:
    """The consent rules, the domain and the keywords import nothing but the domain."""
    assert imports_of(path) <= {"waconsent.domain", "waconsent.domain.Signal"} | {
        name for name in imports_of(path) if name.startswith("waconsent.domain")
    }


@pytest.mark.parametrize(
    "path",
    modules("connectors") + modules("store") + modules("config"),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_connectors_store_and_config_never_import_sync_or_the_cli(path: Path) -> None:
    """Connectors, the store and the configuration know nothing of runs or commands."""
    assert not {
        name
        for name in imports_of(path)
        if name.startswith(
            (
                "waconsent.sync",
                "waconsent.cli",
                "waconsent.web",
                "waconsent.server",
                "waconsent.service",
            )
        )
    }


def test_nothing_imports_the_cli() -> None:
    """The CLI is the rim: no module outside it imports it (but `python -m waconsent`)."""
    outside = [
        path
        for path in PACKAGE.rglob("*.py")
        if "cli" not in path.parts and path.name != "__main__.py"
    ]
    assert not [
        path.name
        for path in outside
        if any(name.startswith("waconsent.cli") for name in imports_of(path))
    ]


def test_no_module_is_over_400_lines() -> None:
    """Rooms a newcomer can read: no module of the package over 400 lines."""
    long = {
        str(path.relative_to(PACKAGE)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > 400
        and "migrations" not in path.parts
    }
    assert long == {}

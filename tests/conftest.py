"""Shared fixtures: a migrated store on SQLite and, for real, on the local PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text

from waconsent.store.engine import open_engine

SHARED_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
POSTGRES_HINT = (
    "PostgreSQL tests need a server: set WACONSENT_TEST_POSTGRES_URL="
    "postgresql+psycopg://postgres@127.0.0.1:5432/test (trust auth) or run .ci/run, "
    "which starts the local cluster"
)


def postgres_base_url() -> str | None:
    url = os.environ.get("WACONSENT_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("WACONSENT_REQUIRE_POSTGRES"):
            pytest.fail("WACONSENT_REQUIRE_POSTGRES is set but WACONSENT_TEST_POSTGRES_URL is not")
        return None
    try:
        probe = create_engine(url)
        with probe.connect() as connection:
            connection.execute(text("SELECT 1"))
        probe.dispose()
    except Exception as exc:
        if os.environ.get("WACONSENT_REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL at {url} is required in CI but unreachable: {exc}")
        return None
    return url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    base = postgres_base_url()
    if base is None:
        pytest.skip(POSTGRES_HINT)
    schema = f"wac_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in base else "?"
    yield f"{base}{separator}options=-csearch_path%3D{schema}"
    with admin.begin() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Parametrized: the same test on SQLite and on the real local PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def engine(store_url: str) -> Iterator[Engine]:
    engine = open_engine(store_url)
    yield engine
    engine.dispose()

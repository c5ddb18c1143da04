"""Shared fixtures: a migrated store on SQLite and, for real, on the local PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    except Exception as exc:  # noqa: BLE001 - any failure to connect means: skip or fail with the hint
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


# ---- a real browser (Debian's chromium + chromium-driver, driven by Selenium) --------------

BROWSER_HINT = (
    "browser tests need Chromium and its driver: `apt-get install chromium chromium-driver` "
    "(Debian) and `pip install -e '.[test]'` for selenium, or run .ci/run, which installs them; "
    "set WACONSENT_REQUIRE_BROWSER=1 to make their absence a failure"
)
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--window-size=1200,1600",
)


def _browser_required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("WACONSENT_REQUIRE_BROWSER") == "1"


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A headless Chromium driven by Selenium, with its console log kept; skipped (with how
    to run it) where no browser is installed, failed instead in CI."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None  # type: ignore[assignment]
    if chromium is None or driver_path is None or webdriver is None:
        missing = ", ".join(
            name
            for name, found in (
                ("chromium", chromium),
                ("chromedriver", driver_path),
                ("selenium", webdriver),
            )
            if found is None
        )
        if _browser_required():
            pytest.fail(
                f"a browser is required here (CI or WACONSENT_REQUIRE_BROWSER=1) but "
                f"{missing} is missing; {BROWSER_HINT}"
            )
        pytest.skip(f"{missing} not installed: {BROWSER_HINT}")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()

"""`waconsent report html`: the trend arithmetic, the page's safety (escaping, CSP, no external
asset), and, in a real headless Chromium, that the page renders and shows the run report's
numbers for the bundled demo."""

from __future__ import annotations

import json
import re
import shutil
import stat
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from waconsent.cli import main
from waconsent.reports.gather import write_private
from waconsent.reports.model import HEADLINE, Flagged, ReportData, Run, trend
from waconsent.reports.page import CSS, content_security_policy, render
from waconsent.store.engine import open_engine
from waconsent.store.tables import runs

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HOSTILE = '<img src=x onerror="alert(1)"><script>alert(2)</script>'
T = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)


def _run(run_id: int, day: int, mode: str, status: str = "ok", **counts: Any) -> Run:
    return Run(run_id, T.replace(day=day), mode, status, counts)


# ---- the model ------------------------------------------------------------------------------


def test_trend_adds_changes_per_day_and_carries_missing_proof_from_full_runs() -> None:
    """Per day: changes add up over finished runs; missing proof is the last full run's, carried."""
    days = trend(
        [
            _run(1, 20, "incremental", revocations=1, opt_ins=1, proof_missing=2),
            _run(2, 20, "full", revocations=2, proof_missing=7),
            _run(3, 21, "targeted", revocations=1),
            _run(4, 21, "incremental", status="failed", revocations=50),
            _run(5, 21, "incremental", status="partial", opt_ins=3, proof_missing=1),
            _run(6, 23, "full", proof_missing=5),
        ]
    )
    assert [(d.day, d.runs, d.revocations, d.opt_ins, d.proof_missing) for d in days] == [
        (date(2026, 11, 20), 2, 3, 1, 7),
        (date(2026, 11, 21), 2, 1, 3, 7),
        (date(2026, 11, 23), 1, 0, 0, 5),
    ]
    assert trend([_run(1, 20, "incremental", proof_missing=3)])[0].proof_missing is None


def test_the_last_run_is_the_newest_finished_scheduled_one_and_a_later_failure_is_named() -> None:
    """A targeted run's few records are not the org's numbers; a failed newest run is shown."""
    data = ReportData(
        T,
        "ledger",
        [_run(1, 20, "full"), _run(2, 20, "targeted"), _run(3, 21, "incremental", status="failed")],
        [],
        0,
    )
    assert data.last is not None and data.last.id == 1
    assert data.failed_since is not None and data.failed_since.id == 3
    page = render(data)
    assert 'id="failed-run"' in page and "Run #1, full, ok" in page


# ---- the page, statically ---------------------------------------------------------------------


def _hostile_data() -> ReportData:
    last = _run(
        9,
        21,
        "full",
        revocations=2,
        unmatched_numbers=1,
        conflicts=[{"record": HOSTILE, "conflict": "a & b"}],
        unmatched=["*****<b>"],
    )
    flagged = [Flagged("C1", HOSTILE, None, '"><b>bold</b>', ("opt_in_date",))]
    return ReportData(T, "salesforce:<x>", [last], flagged, 1)


def test_every_text_is_escaped_and_the_page_loads_nothing() -> None:
    """CRM text is escaped; no script, no external URL; the CSP allows only the inline CSS."""
    page = render(_hostile_data())
    assert "<script" not in page and "<img" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in page
    assert "&quot;&gt;&lt;b&gt;bold&lt;/b&gt;" in page
    urls = set(re.findall(r"https?://[^\"' ]+", page))
    assert urls == {"http://www.w3.org/2000/svg"}  # the SVG namespace name, never fetched
    csp = content_security_policy()
    assert f'<meta http-equiv="Content-Security-Policy" content="{csp}">' in page.replace(
        "&#x27;", "'"
    )
    assert "default-src 'none'" in csp and "script-src 'none'" in csp
    assert f"<style>{CSS}</style>" in page


def test_the_page_is_written_for_its_owner_only(tmp_path: Path) -> None:
    """The page names contacts: it is created 0600 and replaces an old one whole."""
    target = tmp_path / "r" / "page.html"
    write_private(target, "one")
    write_private(target, "two")
    assert target.read_text() == "two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["page.html"]


# ---- the demo, end to end -----------------------------------------------------------------------


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    """The README's demo: sample contacts and webhook archive in a fresh ledger."""
    for name in ("contacts.csv", "webhooks.ndjson"):
        shutil.copy(EXAMPLES / name, tmp_path / name)
    text = (EXAMPLES / "waconsent.toml").read_text(encoding="utf-8")
    text = re.sub(r'url = "sqlite:///[^"]*"', f'url = "sqlite:///{tmp_path / "demo.db"}"', text)
    config = tmp_path / "waconsent.toml"
    config.write_text(text, encoding="utf-8")
    for args in (
        ["contacts", "import", str(tmp_path / "contacts.csv")],
        ["import", str(tmp_path / "webhooks.ndjson")],
    ):
        _cli(config, *args)
    return config


def _cli(config: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(config), *args], catch_exceptions=False)


def test_each_run_keeps_its_conflicts_and_unmatched_numbers(demo: Path, tmp_path: Path) -> None:
    """The run record keeps the report's bounded lists next to its counts."""
    _cli(demo, "sync", "--full", "--report", str(tmp_path / "r.json"))
    report = json.loads((tmp_path / "r.json").read_text())
    engine = open_engine(f"sqlite:///{tmp_path / 'demo.db'}")
    try:
        with engine.connect() as connection:
            [kept] = connection.execute(runs.select()).mappings().all()
    finally:
        engine.dispose()
    assert kept["counts"]["conflicts"] == report["conflicts"] != []
    assert kept["counts"]["unmatched"] == report["unmatched"] != []
    assert kept["counts"]["revocations"] == report["revocations"]


def _console_errors(browser: Any) -> list[dict[str, Any]]:
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def test_the_page_renders_in_chromium_with_the_run_reports_numbers(
    browser: Any, demo: Path, tmp_path: Path
) -> None:
    """In Chromium: the chart renders, no console error or fetch, numbers equal the run report's."""
    from selenium.webdriver.common.by import By

    _cli(demo, "sync", "--full", "--report", str(tmp_path / "r.json"))
    report = json.loads((tmp_path / "r.json").read_text())
    missing = json.loads(_cli(demo, "report", "missing-proof", "--format", "json").output)
    page = tmp_path / "report.html"
    assert _cli(demo, "report", "html", "--out", str(page)).exit_code == 0
    browser.get(page.as_uri())
    assert _console_errors(browser) == []
    chart = browser.find_element(By.ID, "trend-chart")
    assert chart.is_displayed() and chart.size["width"] > 300
    points = {
        (c.get_attribute("data-series"), int(c.get_attribute("data-value") or -1))
        for c in chart.find_elements(By.CSS_SELECTOR, "circle")
    }
    assert points == {
        ("revocations", report["revocations"]),
        ("opt_ins", report["opt_ins"]),
        ("proof_missing", report["proof_missing"]),
    }
    shown = {
        cell.get_attribute("data-key"): cell.text
        for cell in browser.find_elements(By.CSS_SELECTOR, "#last-run td[data-key]")
    }
    assert shown == {
        **{key: str(report[key]) for key, _ in HEADLINE},
        "conflicts": str(len(report["conflicts"])),
    }
    assert report["revocations"] > 0 and report["proof_missing"] > 0
    conflict_rows = browser.find_elements(By.CSS_SELECTOR, "#conflicts tbody tr")
    assert [row.find_elements(By.TAG_NAME, "td")[0].text for row in conflict_rows] == [
        c["record"] for c in report["conflicts"]
    ]
    assert [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#unmatched li")] == report[
        "unmatched"
    ]
    assert [
        row.get_attribute("data-record")
        for row in browser.find_elements(By.CSS_SELECTOR, "#flagged tbody tr")
    ] == [row["id"] for row in missing]
    assert browser.find_element(By.CSS_SELECTOR, "[data-key=flagged_total]").text == str(
        len(missing)
    )
    header = browser.find_element(By.CSS_SELECTOR, "#trend-table th")
    assert header.value_of_css_property("font-weight") == "600"  # the hashed style applied
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0


def test_a_hostile_name_stays_text_in_chromium(browser: Any, tmp_path: Path) -> None:
    """Markup in CRM data is shown as text: no script element, no image, no alert."""
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    page = tmp_path / "hostile.html"
    write_private(page, render(_hostile_data()))
    browser.get(page.as_uri())
    assert _console_errors(browser) == []
    assert browser.execute_script("return document.scripts.length + document.images.length") == 0
    assert browser.find_element(By.CSS_SELECTOR, "#flagged tbody td:nth-child(2)").text == HOSTILE
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018

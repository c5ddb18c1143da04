"""`waconsent sync`'s progress: what the run tells (totals from the CRM's first page, records
decided, writes sent), the bar that draws it on a terminal, and nothing on a pipe."""

from __future__ import annotations

import io
import os
import re
import select
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from rich.console import Console
from sqlalchemy import Engine

from tests import payloads as p
from tests import test_dynamics_sync as dv
from tests import test_salesforce_sync as sf
from tests.fakes.salesforce import Clock, FakeSalesforce
from tests.test_run import NOW, T0, clock, deliver, loaded, opted_in
from waconsent.cli.progress import SyncBar
from waconsent.store.contacts import upsert_contacts
from waconsent.sync.run import run_once

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Recorded:
    """A `Progress` that remembers every call, with how many records were decided when the
    total was told."""

    active: bool = True
    totals: list[tuple[int | None, bool, int]] = field(default_factory=list)
    decided_records: int = 0
    backlogs: list[int] = field(default_factory=list)
    ok: int = 0
    failed: int = 0

    def total(self, records: int | None, *, estimated: bool = False) -> None:
        self.totals.append((records, estimated, self.decided_records))

    def decided(self, records: int) -> None:
        self.decided_records += records

    def sending(self, backlog: int) -> None:
        self.backlogs.append(backlog)

    def sent(self, ok: int, failed: int) -> None:
        self.ok += ok
        self.failed += failed


def test_ledger_run_tells_its_count_first_then_records_and_writes(
    engine: Engine, store_url: str
) -> None:
    """On the ledger the total is the contacts' count, told before any record is decided;
    every record read is told decided and every write sent, as the report counts them."""
    cfg = loaded(store_url, read_chunk_size=10)
    upsert_contacts(
        engine, [opted_in(f"R{i}", f"0151 2345{i:04d}") for i in range(35)], T0 - timedelta(days=3)
    )
    deliver(
        engine, cfg, p.message("4915123450003", T0, "STOP"), p.message("4915123450007", T0, "STOP")
    )
    seen = Recorded()
    report = run_once(cfg, engine=engine, clock=clock, progress=seen)
    assert seen.totals == [(35, False, 0)]
    assert seen.decided_records == report.records_read == 35
    assert (seen.ok, seen.failed) == (report.writes_sent, 0) == (2, 0)
    assert seen.backlogs == [0, 2]  # the leftovers pass, then this run's writes

    again = Recorded()
    upsert_contacts(engine, [opted_in("R1", "0151 23450001", name="renamed")], NOW)
    second = run_once(cfg, engine=engine, clock=clock, progress=again)
    assert second.mode == "incremental"
    # the changed records' count plus the two with new activity, read by id unless changed
    assert second.read_plan == "changed+ids"
    told = again.totals[0][0]
    assert told is not None and second.records_read <= told <= second.records_read + 2


def test_salesforce_total_is_the_first_pages_total_size(
    engine: Engine, store_url: str, fake: FakeSalesforce, org_clock: Clock
) -> None:
    """Salesforce: the total is `totalSize` of the first of three query pages (no extra
    call), told before the first record is decided."""
    cfg = sf.loaded(store_url)
    sf.populate(fake, org_clock)
    seen = Recorded()
    report = run_once(
        cfg, connector=sf.connector(cfg), engine=engine, clock=lambda: NOW, progress=seen
    )
    assert seen.totals == [(sf.CONTACTS, False, 0)]
    assert seen.decided_records == report.records_read == sf.CONTACTS
    assert fake.query_calls == 3


def test_dataverse_total_is_estimated_from_the_last_full_run(
    fake_dataverse: object, engine: Engine, store_url: str
) -> None:
    """Dataverse beyond one page tells no total (`@odata.count` stops at 5,000): the first
    full run has none, the next full run the ledger's last full size, marked estimated."""
    cfg = dv.config_for(store_url)
    first, second = Recorded(), Recorded()
    dv.run(cfg, engine, progress=first)
    report, _ = dv.run(cfg, engine, full=True, progress=second)
    assert first.totals == [(None, False, 0)]
    assert second.totals == [(dv.CONTACTS, True, 0)]
    assert second.decided_records == report.records_read == dv.CONTACTS


@pytest.fixture
def org_clock() -> Clock:
    return Clock(sf.CREATED)


@pytest.fixture
def fake(org_clock: Clock) -> Iterator[FakeSalesforce]:
    org = FakeSalesforce(clock=org_clock)
    org.users[sf.USER] = "pwtok"
    with org.active():
        yield org


@pytest.fixture
def fake_dataverse() -> Iterator[object]:
    with dv.dataverse_with_contacts() as populated:
        yield populated


def test_bar_on_a_forced_terminal_shows_counts_totals_and_writes(
    engine: Engine, store_url: str
) -> None:
    """The renderer, on a console forced to be a terminal, draws records decided out of the
    total and the writes sent."""
    cfg = loaded(store_url)
    upsert_contacts(
        engine, [opted_in(f"R{i}", f"0151 2345{i:04d}") for i in range(40)], T0 - timedelta(days=3)
    )
    deliver(engine, cfg, p.message("4915123450003", T0, "STOP"))
    screen = io.StringIO()
    bar = SyncBar(Console(file=screen, force_terminal=True, width=160))
    bar.start()
    try:
        run_once(cfg, engine=engine, clock=clock, progress=bar)
    finally:
        bar.stop()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert "records read and decided" in text and "40/40" in text
    assert "writes sent" in text and "1/1" in text


def test_dry_run_bar_has_no_writes_line(engine: Engine, store_url: str) -> None:
    """A dry run sends nothing, so its bar draws records only."""
    cfg = loaded(store_url)
    upsert_contacts(
        engine, [opted_in(f"R{i}", f"0151 2345{i:04d}") for i in range(12)], T0 - timedelta(days=3)
    )
    screen = io.StringIO()
    bar = SyncBar(Console(file=screen, force_terminal=True, width=160), writes=False)
    bar.start()
    try:
        run_once(cfg, engine=engine, clock=clock, dry_run=True, progress=bar)
    finally:
        bar.stop()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert "12/12" in text and "writes sent" not in text


def _sync_command(tmp_path: Path) -> list[str]:
    db = tmp_path / "cli.db"
    cfg = tmp_path / "waconsent.toml"
    cfg.write_text(f'[store]\nurl = "sqlite:///{db}"\n[crm]\nkind = "ledger"\n', encoding="utf-8")
    return [sys.executable, "-m", "waconsent", "--config", str(cfg), "sync"]


@pytest.fixture
def cli_store(tmp_path: Path) -> Path:
    from waconsent.store.engine import open_engine

    engine = open_engine(f"sqlite:///{tmp_path / 'cli.db'}")
    upsert_contacts(
        engine, [opted_in(f"R{i}", f"0151 2345{i:04d}") for i in range(25)], T0 - timedelta(days=3)
    )
    engine.dispose()
    return tmp_path


def test_sync_on_a_pipe_draws_no_bar(cli_store: Path) -> None:
    """`waconsent sync` with standard error on a pipe writes nothing there (no bar, no
    escape codes); the summary goes to standard output as before."""
    done = subprocess.run(
        _sync_command(cli_store), cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "records read" in done.stdout


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_sync_on_a_terminal_draws_the_bar(cli_store: Path) -> None:
    """`waconsent sync` with standard error on a (pseudo-)terminal draws the bar there with
    the records out of the ledger's count; standard output still gets the summary only."""
    primary, secondary = os.openpty()
    env = {**os.environ, "COLUMNS": "150", "LINES": "40", "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    process = subprocess.Popen(
        _sync_command(cli_store),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=secondary,
        env=env,
    )
    os.close(secondary)
    drawn = bytearray()
    while True:
        ready, _, _ = select.select([primary], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            drawn += chunk
        elif process.poll() is not None:
            break
    out = process.stdout.read().decode() if process.stdout else ""
    process.wait(timeout=60)
    if process.stdout:
        process.stdout.close()
    os.close(primary)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn.decode(errors="replace"))
    assert process.returncode == 0, text[-2000:]
    assert "records read and decided" in text and "25/25" in text
    assert "records read and decided" not in out and "records read" in out

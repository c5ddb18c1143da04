"""The commands as a new user runs them: init, import, contacts, sync, proof, runs, verify."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import update

from tests import payloads as p
from tests.test_run import T0
from waconsent.cli import main
from waconsent.store.engine import open_engine
from waconsent.store.tables import evidence

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "waconsent.toml"
    demo = (ROOT / "examples/waconsent.toml").read_text(encoding="utf-8")
    path.write_text(
        demo.replace("sqlite:///waconsent-demo.db", f"sqlite:///{tmp_path / 'w.db'}"),
        encoding="utf-8",
    )
    return path


def run(cfg: Path, *args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(
        main, ["--config", str(cfg), *args], input=stdin, catch_exceptions=False
    )


def test_init_writes_a_loadable_config_and_refuses_overwrite(tmp_path: Path) -> None:
    """init writes the preset, refuses to overwrite without --force."""
    target = tmp_path / "new.toml"
    first = CliRunner().invoke(main, ["init", "--path", str(target)])
    assert first.exit_code == 0 and 'kind = "ledger"' in target.read_text()
    again = CliRunner().invoke(main, ["init", "--path", str(target)])
    assert again.exit_code == 1 and "--force" in again.output
    forced = CliRunner().invoke(main, ["init", "--path", str(target), "--force"])
    assert forced.exit_code == 0


def test_missing_config_exit_1_with_hint(tmp_path: Path) -> None:
    """Without a config file, commands exit 1 and point at init."""
    result = CliRunner().invoke(main, ["--config", str(tmp_path / "none.toml"), "runs"])
    assert result.exit_code == 1 and "waconsent init" in result.output


def test_import_is_idempotent_and_counts(cfg: Path, tmp_path: Path) -> None:
    """Importing the same archive twice stores nothing new the second time."""
    archive = tmp_path / "a.ndjson"
    archive.write_text(
        "\n".join(
            json.dumps(p.payload(p.message(f"49151234567{i:02d}", T0, "hi"))) for i in range(5)
        )
        + "\n"
    )
    first = run(cfg, "import", str(archive))
    assert first.exit_code == 0
    assert "5 stored, 0 duplicates, 0 acknowledged, 0 skipped" in first.output
    second = run(cfg, "import", str(archive))
    assert "0 stored, 5 duplicates, 0 acknowledged, 0 skipped" in second.output


def test_import_accepts_object_array_and_stdin(cfg: Path, tmp_path: Path) -> None:
    """A single JSON object, a JSON array of payloads, and '-' for stdin all work."""
    single = tmp_path / "one.json"
    single.write_text(json.dumps(p.payload(p.message("4915123456701", T0, "STOP")), indent=2))
    array = tmp_path / "many.json"
    array.write_text(
        json.dumps(
            [
                p.payload(p.message("4915123456702", T0, "x")),
                p.payload(p.status("4915123456702", T0)),
            ]
        )
    )
    assert "1 stored" in run(cfg, "import", str(single)).output
    # both payloads read: the message stored, the plain status acknowledged without a row
    assert "1 stored, 0 duplicates, 1 acknowledged" in run(cfg, "import", str(array)).output
    piped = run(cfg, "import", "-", stdin=json.dumps(p.payload(p.message("49151", T0, "x"))))
    assert "-: 1 stored" in piped.output


def test_partly_bad_file_keeps_good_lines_and_exits_1(cfg: Path, tmp_path: Path) -> None:
    """A bad line is reported FILE:LINE; every good line is stored; exit code 1."""
    archive = tmp_path / "mixed.ndjson"
    good = json.dumps(p.payload(p.message("4915123456789", T0, "STOP")))
    archive.write_text(f"{good}\n{{not json\n\n{json.dumps(p.payload(p.status('49151', T0)))}\n")
    result = run(cfg, "import", str(archive))
    assert result.exit_code == 1
    assert f"{archive}:2: not JSON" in result.output
    assert "1 stored, 0 duplicates, 1 acknowledged, 1 skipped" in result.output


def test_contacts_import_reports_bad_rows_by_line(cfg: Path, tmp_path: Path) -> None:
    """Rows without id or with bad dates/booleans are refused by line; the rest imported."""
    csv_file = tmp_path / "c.csv"
    csv_file.write_text(
        "id,name,mobile_phone,opt_in,opt_in_date\n"
        "A,Anna,0151 23456789,true,2026-01-01T10:00:00Z\n"
        ",Nobody,0151 1,true,\n"
        "B,Ben,0151 2,maybe,\n"
        "C,Cem,0151 3,true,yesterday\n"
        "D,Dora,n/a,false,\n"
    )
    result = run(cfg, "contacts", "import", str(csv_file))
    assert result.exit_code == 1
    assert f"{csv_file}:3: no id" in result.output
    assert f"{csv_file}:4: opt_in: expected true or false" in result.output
    assert f"{csv_file}:5: opt_in_date: expected an ISO 8601 datetime" in result.output
    assert f"{csv_file}:6: mobile_phone" in result.output and "kept" in result.output
    exported = json.loads(run(cfg, "contacts", "export", "--format", "json").output)
    assert [row["id"] for row in exported] == ["A", "D"]
    assert exported[0]["opt_in_date"] == "2026-01-01T10:00:00Z"


def test_demo_flow_sync_proof_runs_verify(cfg: Path) -> None:
    """The README's demo data: sync revokes, proof lists evidence, verify-ledger is clean."""
    assert run(cfg, "contacts", "import", str(ROOT / "examples/contacts.csv")).exit_code == 0
    assert run(cfg, "import", str(ROOT / "examples/webhooks.ndjson")).exit_code == 0
    report_file = cfg.parent / "report.json"
    synced = run(cfg, "sync", "--full", "--report", str(report_file))
    assert synced.exit_code == 0, synced.output
    report = json.loads(report_file.read_text())
    assert report["revocations"] == 8 and report["opt_ins"] >= 2
    assert report["writes_failed"] == 0 and len(report["conflicts"]) == 1
    proof = json.loads(run(cfg, "proof", "0160 1234567", "--format", "json").output)
    assert proof[0]["what"] == "whatsapp message: opt_out"
    assert {row["id"] for row in proof if row["what"] == "CRM write confirmed"} == {"C015", "C016"}
    assert "evidence chain intact" in run(cfg, "verify-ledger").output
    assert "full" in run(cfg, "runs").output
    missing = json.loads(run(cfg, "report", "missing-proof", "--format", "json").output)
    assert {row["id"] for row in missing} == {"C007", "C008", "C009", "C010"}
    again = run(cfg, "sync")
    assert again.exit_code == 0


def test_dry_run_prints_diff(cfg: Path) -> None:
    """sync --dry-run prints record, field, old -> new and why, and writes nothing."""
    run(cfg, "contacts", "import", str(ROOT / "examples/contacts.csv"))
    run(cfg, "import", str(ROOT / "examples/webhooks.ndjson"))
    result = CliRunner().invoke(
        main,
        ["--config", str(cfg), "sync", "--dry-run"],
        terminal_width=250,
        catch_exceptions=False,
    )
    assert "nothing written" in result.output
    assert "opt-out by whatsapp:keyword:STOP" in result.output
    assert "(dry run)" in result.output
    assert "CRM write" not in run(cfg, "proof", "0160 1234567").output


def test_verify_ledger_exit_1_on_tampering(cfg: Path, tmp_path: Path) -> None:
    """verify-ledger exits 1 and names the row when evidence was altered."""
    archive = tmp_path / "a.json"
    archive.write_text(
        json.dumps(
            p.payload(
                p.message("4915123456789", T0, "STOP"), p.message("4915123456788", T0, "STOP")
            )
        )
    )
    run(cfg, "import", str(archive))
    assert run(cfg, "verify-ledger").exit_code == 0
    engine = open_engine(f"sqlite:///{tmp_path / 'w.db'}")
    with engine.begin() as connection:
        connection.execute(update(evidence).where(evidence.c.id == 1).values(body="{}"))
    engine.dispose()
    result = run(cfg, "verify-ledger")
    assert result.exit_code == 1 and "row 1" in result.output


def test_proof_rejects_non_numbers(cfg: Path) -> None:
    """proof with something that is no number nor user id exits 1 and says why."""
    result = run(cfg, "proof", "hello")
    assert result.exit_code == 1 and "neither a phone number nor" in result.output


def test_sync_exit_3_when_lock_held(cfg: Path, tmp_path: Path) -> None:
    """A held run lock makes sync exit 3 (could not proceed)."""
    from datetime import UTC, datetime

    from waconsent.store import runs as run_store

    engine = open_engine(f"sqlite:///{tmp_path / 'w.db'}")
    run_store.acquire_lock(engine, "ledger", "elsewhere:1:x", datetime.now(UTC))
    engine.dispose()
    result = run(cfg, "sync")
    assert result.exit_code == 3 and "in progress" in result.output


def test_check_ledger_passes(cfg: Path) -> None:
    """check on the ledger: config valid, store reachable, every logical field fits."""
    result = run(cfg, "check")
    assert result.exit_code == 0, result.output
    assert "all mapped fields exist" in result.output


def test_contacts_import_line_numbers_bom_and_lengths(cfg: Path, tmp_path: Path) -> None:
    """Line numbers stay right after a quoted newline, a BOM on stdin is ignored, and an
    over-long value is refused by line instead of failing the whole import."""
    text = (
        "\ufeffid,name,mobile_phone,opt_in\n"
        'A,"Anna\nMarie",0151 23456789,true\n'
        "B,Ben,0151 2,maybe\n"
        f"C,{'x' * 400},0151 3,true\n"
        "D,Dora,0151 4,false\n"
    )
    result = run(cfg, "contacts", "import", "-", stdin=text)
    assert result.exit_code == 1
    assert "-:4: opt_in: expected true or false" in result.output
    assert "-:5: too long: name (400 characters, at most 300)" in result.output
    exported = json.loads(run(cfg, "contacts", "export", "--format", "json").output)
    assert [row["id"] for row in exported] == ["A", "D"]
    assert exported[0]["name"] == "Anna\nMarie"


def test_proof_includes_events_known_only_by_user_id(cfg: Path, tmp_path: Path) -> None:
    """proof for a number also lists that person's events that carried only their user id."""
    with_both = p.message("4915123456789", T0, "hello", user_id="US.42")
    only_uid = p.message("4915123456789", T0.replace(hour=10), "STOP", user_id="US.42")
    del only_uid["value"]["messages"][0]["from"]
    only_uid["value"]["contacts"] = [{"user_id": "US.42"}]
    archive = tmp_path / "a.json"
    archive.write_text(json.dumps([p.payload(with_both), p.payload(only_uid)]))
    run(cfg, "import", str(archive))
    rows = json.loads(run(cfg, "proof", "+49 151 23456789", "--format", "json").output)
    assert [row["what"] for row in rows] == ["whatsapp message: none", "whatsapp message: opt_out"]


@pytest.mark.parametrize(
    "args",
    [
        ["sync", "--config", "{cfg}"],
        ["--config", "{cfg}", "sync"],
        ["contacts", "export", "--config", "{cfg}"],
        ["contacts", "--config", "{cfg}", "export"],
        ["report", "missing-proof", "--format", "json", "--config", "{cfg}"],
        ["proof", "+4915123456789", "--config", "{cfg}"],
    ],
    ids=" ".join,
)
def test_config_after_the_command_word(
    cfg: Path, args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--config PATH` works after the command (and sub-command) word as well as before it."""
    moved = cfg.rename(cfg.parent / "prod.toml")
    monkeypatch.chdir(cfg.parent)  # no ./waconsent.toml here to fall back on
    monkeypatch.delenv("WACONSENT_CONFIG", raising=False)
    result = CliRunner().invoke(main, [a.format(cfg=moved) for a in args])
    assert result.exit_code == 0, result.output
    assert "no configuration file" not in result.output


def test_config_given_twice_differently_is_refused(cfg: Path) -> None:
    """Two different --config values are a usage error, not a silent choice."""
    result = CliRunner().invoke(main, ["--config", str(cfg), "runs", "--config", "other.toml"])
    assert result.exit_code != 0 and "--config given twice" in result.output

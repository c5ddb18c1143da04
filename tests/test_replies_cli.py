"""`waconsent replies send` / `replies list`, the import path, and the configuration of the
reply channel: its keys, its texts and its secret."""

from __future__ import annotations

import json
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from tests import payloads as p
from tests.fakes.meta_messages import GRAPH, PHONE_NUMBER_ID, TOKEN, VERSION
from tests.replies_support import BUSINESS, USER, meta, settings_raw
from waconsent.cli import main
from waconsent.config import parse
from waconsent.errors import ConfigError
from waconsent.replies.policy import reply_policy


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "waconsent.toml"
    path.write_text(
        textwrap.dedent(f"""
        [store]
        url = "sqlite:///{tmp_path / "w.db"}"
        [whatsapp]
        phone_number_id = "{PHONE_NUMBER_ID}"
        graph_url = "{GRAPH}"
        graph_api_version = "{VERSION}"
        business_name = "{BUSINESS}"
        [replies]
        enabled = true
    """),
        encoding="utf-8",
    )
    return path


def run(cfg: Path, *args: str, token: str | None = TOKEN) -> Result:
    env = {"WHATSAPP_ACCESS_TOKEN": token}
    return CliRunner(env=env).invoke(main, ["--config", str(cfg), *args], catch_exceptions=False)


def archive(tmp_path: Path, at: datetime, *users: str) -> str:
    path = tmp_path / f"archive-{at:%H%M%S}.ndjson"
    path.write_text(
        "\n".join(json.dumps(p.payload(p.message(user, at, "STOP"))) for user in users) + "\n",
        encoding="utf-8",
    )
    return str(path)


def test_import_of_old_events_answers_nobody_and_send_lists_what_went(
    cfg: Path, tmp_path: Path
) -> None:
    """An archive of old STOPs queues no reply; a fresh one does, `replies send` sends it
    (exit 0) and `replies list` shows it sent, the number masked."""
    old = archive(tmp_path, datetime.now(UTC) - timedelta(days=3), "4915123456701")
    assert run(cfg, "import", old).exit_code == 0
    assert json.loads(run(cfg, "replies", "list", "--format", "json").output) == []
    fresh = archive(tmp_path, datetime.now(UTC).replace(microsecond=0), USER)
    assert run(cfg, "import", fresh).exit_code == 0
    with meta() as fake:
        sent = run(cfg, "replies", "send")
    assert sent.exit_code == 0 and "1 sent, 0 failed" in sent.output and fake.calls == 1
    listed = json.loads(run(cfg, "replies", "list", "--format", "json").output)
    assert [(r["state"], r["keyword"], r["to"]) for r in listed] == [
        ("sent", "STOP", "**********789")
    ]
    table = run(cfg, "replies", "list", "--state", "sent")
    assert "1 sent" in table.output and USER not in table.output


def test_send_refuses_without_token_or_with_replies_off(cfg: Path, tmp_path: Path) -> None:
    """Without WHATSAPP_ACCESS_TOKEN, or with replies off, `replies send` exits 1 saying
    what to set."""
    missing = run(cfg, "replies", "send", token=None)
    assert missing.exit_code == 1 and "WHATSAPP_ACCESS_TOKEN" in missing.output
    off = tmp_path / "off.toml"
    off.write_text(cfg.read_text().replace("enabled = true", "enabled = false"))
    refused = run(off, "replies", "send")
    assert refused.exit_code == 1 and "[replies] enabled = true" in refused.output


def test_send_with_a_rejected_token_exits_3_and_says_how_to_fix(cfg: Path, tmp_path: Path) -> None:
    """A token Meta rejects stops `replies send` with exit 3, the reason and the fix; the
    reply stays queued."""
    run(cfg, "import", archive(tmp_path, datetime.now(UTC).replace(microsecond=0), USER))
    with meta() as fake:
        fake.revoke_token()
        result = run(cfg, "replies", "send")
    assert result.exit_code == 3 and "190" in result.output
    assert "system user token" in result.output and TOKEN not in result.output
    listed = json.loads(run(cfg, "replies", "list", "--format", "json").output)
    assert [r["state"] for r in listed] == ["queued"]


def test_configuration_checks_name_the_key_and_what_is_expected() -> None:
    """Replies on need a phone number id and a business name; placeholders are checked;
    a keyword text must belong to a configured keyword; the token may not stand in the file."""
    raw = settings_raw(
        "sqlite:////tmp/x.db", opt_out="Bye {company}", keywords={"HALT": "Stopped."}
    )
    raw["whatsapp"].pop("phone_number_id")
    raw["whatsapp"]["access_token"] = "EAAG..."
    with pytest.raises(ConfigError) as caught:
        parse(raw)
    problems = "\n".join(caught.value.problems)
    assert "replies.opt_out: unknown placeholder {company}" in problems
    assert "whatsapp.access_token: secrets must not stand in the file" in problems
    assert "WHATSAPP_ACCESS_TOKEN" in problems
    raw = settings_raw("sqlite:////tmp/x.db", keywords={"HALT": "Stopped."})
    raw["whatsapp"].pop("phone_number_id")
    raw["whatsapp"].pop("business_name")
    with pytest.raises(ConfigError) as caught:
        parse(raw)
    problems = "\n".join(caught.value.problems)
    assert "whatsapp.phone_number_id: required when replies.enabled" in problems
    assert "whatsapp.business_name: required" in problems
    assert "replies.keywords.HALT: not a keyword" in problems


def test_default_texts_name_the_business_the_channel_and_the_way_back() -> None:
    """The default texts name the business, say messages come over WhatsApp, and how to
    stop (opt-in) or restart (opt-out), with the first configured keyword."""
    settings = parse(settings_raw("sqlite:////tmp/x.db"))
    policy = reply_policy(settings)
    assert policy is not None
    assert BUSINESS in policy.opt_in and "WhatsApp" in policy.opt_in
    assert "reply STOP" in policy.opt_in
    assert BUSINESS in policy.opt_out and "WhatsApp" in policy.opt_out
    assert "reply START" in policy.opt_out
    assert reply_policy(parse({})) is None  # off by default
    assert parse({}).whatsapp.graph_api_version == "v27.0"

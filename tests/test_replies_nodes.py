"""Never twice: a crash between Meta's answer and the commit, two receivers and two
senders on one PostgreSQL store, and `waconsent serve` sending within about a second."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, select

from tests import payloads as p
from tests.fakes.meta_messages import PHONE_NUMBER_ID, TOKEN, VERSION, FakeCloudApi, SentMessage
from tests.replies_support import BUSINESS, NOW, USER, deliver, meta, replies_config, rows, sender
from tests.replies_support import send_pass as one_pass
from tests.serving import free_port
from tests.serving import start_serve as start_serve_process
from waconsent.connectors.webhook_signature import sign
from waconsent.replies.rules import UNKNOWN_AFTER
from waconsent.replies.sending import send_due
from waconsent.store import evidence as evidence_store
from waconsent.store.engine import open_engine
from waconsent.store.tables import evidence

ROOT = Path(__file__).resolve().parents[1]

DYING_SENDER = textwrap.dedent("""
    import json, os, signal, sys
    from dataclasses import asdict
    import responses
    from tests.fakes.meta_messages import FakeCloudApi
    from tests.replies_support import NOW, sender
    from waconsent.replies.sending import send_due
    from waconsent.store.engine import open_engine

    url, record = sys.argv[1], sys.argv[2]
    fake = FakeCloudApi()

    class DiesAfterMetaAnswered:
        def send_text(self, **reply):
            result = sender().send_text(**reply)
            with open(record, "w") as out:
                json.dump([asdict(message) for message in fake.sent], out)
            os.kill(os.getpid(), signal.SIGKILL)  # Meta took it; the commit never happens

    with responses.RequestsMock() as mock:
        fake.register(mock)
        send_due(open_engine(url), DiesAfterMetaAnswered(), "dying-node", lambda: NOW)
""")


def test_sigkill_after_the_send_never_sends_twice(
    engine: Engine, store_url: str, tmp_path: Path
) -> None:
    """Killed after Meta took the reply and before the commit: the restarted sender sends
    nothing, and the reply's own status (by its callback data) settles the row, with its
    evidence recorded once."""
    cfg = replies_config(store_url)
    deliver(engine, cfg, p.message(USER, NOW, "STOP"))
    record = tmp_path / "sent.json"
    died = subprocess.run(
        [sys.executable, "-c", DYING_SENDER, store_url, str(record)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    sent = [SentMessage(**message) for message in json.loads(record.read_text())]
    assert len(sent) == 1 and rows(engine)[0].state == "sending"
    with meta(strict=False) as fake:
        restarted = one_pass(engine, now=NOW + timedelta(seconds=30))
    assert (restarted.sent, fake.calls) == (0, 0)
    for status in ("sent", "delivered"):
        deliver(engine, cfg, body=fake.status_payload(sent[0], status, NOW))
    row = rows(engine)[0]
    assert (row.state, row.reply_id) == ("delivered", sent[0].id)
    with meta(strict=False) as fake:
        later = one_pass(engine, now=NOW + UNKNOWN_AFTER + timedelta(hours=1))
    assert (later.marked_unknown, fake.calls) == (0, 0)
    with engine.connect() as connection:
        replies_evidence = (
            connection.execute(select(evidence.c.body).where(evidence.c.kind == "reply"))
            .scalars()
            .all()
        )
        assert evidence_store.verify(connection) == []
    assert len(replies_evidence) == 1
    assert json.loads(replies_evidence[0])["learnt_from"] == "status"


def test_two_receivers_and_two_senders_on_postgresql_send_one_reply(postgres_url: str) -> None:
    """Every STOP delivered to two receivers at the same moment, then two senders on
    two nodes draining the queue at once: each trigger is answered exactly once."""
    cfg = replies_config(postgres_url)
    nodes = [open_engine(postgres_url) for _ in range(2)]
    bodies = [p.payload(p.message(f"49151234560{n:02d}", NOW, "STOP")) for n in range(20)]
    try:
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def receive(engine: Engine) -> None:
            try:
                for body in bodies:
                    barrier.wait()
                    deliver(engine, cfg, body=body)
            except BaseException as exc:  # noqa: BLE001 - reported below, not lost in the thread
                errors.append(exc)

        run_all([threading.Thread(target=receive, args=(e,)) for e in nodes])
        assert errors == [] and len(rows(nodes[0])) == 20
        with meta() as fake:

            def drain(engine: Engine, holder: str) -> None:
                barrier.wait()
                while send_due(engine, sender(), holder, lambda: NOW).looked_at:
                    pass

            run_all(
                [threading.Thread(target=drain, args=(e, f"node-{i}")) for i, e in enumerate(nodes)]
            )
        assert fake.calls == 20
        assert sorted(m.to or "" for m in fake.sent) == sorted(
            f"49151234560{n:02d}" for n in range(20)
        )
        assert {r.state for r in rows(nodes[0])} == {"sent"}
    finally:
        for engine in nodes:
            engine.dispose()


def run_all(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)


def start_serve(tmp_path: Path, db: Path, graph: str, token: str) -> tuple[Any, str]:
    port = free_port()
    cfg = tmp_path / "waconsent.toml"
    cfg.write_text(
        textwrap.dedent(f"""
        [store]
        url = "sqlite:///{db}"
        [webhook]
        port = {port}
        [schedule]
        incremental_minutes = 600
        [whatsapp]
        phone_number_id = "{PHONE_NUMBER_ID}"
        graph_url = "{graph}"
        graph_api_version = "{VERSION}"
        business_name = "{BUSINESS}"
        [replies]
        enabled = true
    """),
        encoding="utf-8",
    )
    secrets = {
        "WHATSAPP_APP_SECRET": "app-secret",
        "WHATSAPP_VERIFY_TOKEN": "vt",
        "WHATSAPP_ACCESS_TOKEN": token,
    }
    return start_serve_process(cfg, port, secrets)


def post(base: str, body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    answer = httpx.post(
        f"{base}/webhooks/whatsapp",
        content=raw,
        timeout=10,
        headers={
            "X-Hub-Signature-256": sign(raw, "app-secret"),
            "Content-Type": "application/json",
        },
    )
    assert answer.status_code == 200


def wait_for(condition: Any, seconds: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if condition():
            return time.monotonic() - started
        time.sleep(0.05)
    return None


def stop(process: Any) -> str:
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err[-2000:]
    return str(err)


def test_serve_drains_at_start_and_answers_within_a_second(tmp_path: Path) -> None:
    """`waconsent serve` sends a reply queued while it was down as it starts, answers a
    STOP posted to it within about a second, and settles it from the status Meta posts."""
    db = tmp_path / "serve.db"
    engine = open_engine(f"sqlite:///{db}")
    cfg = replies_config(f"sqlite:///{db}")
    now = datetime.now(UTC).replace(microsecond=0)
    deliver(engine, cfg, p.message("4915123456700", now, "START"), now=now)
    fake = FakeCloudApi()
    with fake.serve_http() as graph:
        process, base = start_serve(tmp_path, db, graph, TOKEN)
        try:
            assert wait_for(lambda: len(fake.sent) == 1, 10) is not None
            post(base, p.payload(p.message(USER, datetime.now(UTC), "STOP")))
            answered = wait_for(lambda: len(fake.sent) == 2, 10)
            post(base, fake.status_payload(fake.sent[1], "delivered", datetime.now(UTC)))
            settled = wait_for(lambda: {r.state for r in rows(engine)} == {"sent", "delivered"}, 10)
        finally:
            err = stop(process)
            engine.dispose()
    assert answered is not None and answered < 1.5, answered
    assert settled is not None
    assert fake.calls == 2 and "replies.sent" in err and USER not in err


def test_serve_stops_sending_on_an_invalid_token_and_healthz_says_so(tmp_path: Path) -> None:
    """A token Meta rejects stops the sender: /healthz answers 200 "degraded" with why and
    how to fix it, the log says so, the reply stays queued, and STOPs are still stored."""
    db = tmp_path / "serve.db"
    fake = FakeCloudApi()
    with fake.serve_http() as graph:
        process, base = start_serve(tmp_path, db, graph, "EAAG-expired")
        try:
            post(base, p.payload(p.message(USER, datetime.now(UTC), "STOP")))
            health: dict[str, Any] = {}

            def degraded() -> bool:
                health.update(httpx.get(f"{base}/healthz", timeout=2).json())
                return health.get("replies") == "stopped"

            assert wait_for(degraded, 10) is not None
            post(base, p.payload(p.message("4915123456790", datetime.now(UTC), "STOP")))
            time.sleep(0.5)
        finally:
            err = stop(process)
    assert health["status"] == "degraded" and "190" in health["reason"]
    assert "WHATSAPP_ACCESS_TOKEN" in health["fix"]
    assert fake.calls == 1 and "replies.stopped" in err and "EAAG-expired" not in err
    engine = open_engine(f"sqlite:///{db}")
    try:
        assert [r.state for r in rows(engine)] == ["queued", "queued"]
    finally:
        engine.dispose()

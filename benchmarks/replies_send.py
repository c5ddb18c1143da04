"""Reply channel throughput: replies sent per second against the Cloud API fake.

Run by hand (not a test):

    python benchmarks/replies_send.py                          # SQLite and PostgreSQL
    python benchmarks/replies_send.py --targets sqlite --replies 5000

For each target, a fresh store gets `--replies` STOPs, delivered 100 to a POST through
the one ingest path (so each is queued in its delivery's transaction), and then:

- **floor**: the Cloud API sender alone, one request per reply, no store (what the fake
  and `requests` cost);
- **send, in-process fake**: `send_due` passes until the queue is empty, against the
  `responses` fake: claim (one commit), request, record with evidence (one commit) per
  reply: waconsent's own cost;
- **send, HTTP fake**: the same against the fake served on a loopback port (a real HTTP
  round trip through `requests`, one connection kept alive);
- **settle**: Meta's `sent`, `delivered` and `read` statuses of every reply, 100 to a
  POST, through the ingest path (each matched to its reply by callback data).

`queue` is the time the deliveries took, including the replies queued with them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import responses  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from benchmarks.webhook_throughput import store_for  # noqa: E402
from tests import payloads as p  # noqa: E402
from tests.fakes.meta_messages import FakeCloudApi  # noqa: E402
from tests.replies_support import replies_config, sender  # noqa: E402
from waconsent.connectors.http import RetryPolicy  # noqa: E402
from waconsent.connectors.whatsapp_send import CloudApiSender  # noqa: E402
from waconsent.replies.policy import reply_policy  # noqa: E402
from waconsent.replies.sending import send_due  # noqa: E402
from waconsent.store.engine import open_engine  # noqa: E402
from waconsent.store.tables import replies  # noqa: E402
from waconsent.sync.ingest import ingest_payload, keyword_rules  # noqa: E402

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BATCH = 100


def timed(step: Callable[[], int]) -> tuple[int, float]:
    started = time.perf_counter()
    count = step()
    return count, time.perf_counter() - started


def run_target(target: str, count: int, postgres_url: str) -> list[tuple[str, int, float]]:
    results: list[tuple[str, int, float]] = []
    now = datetime.now(UTC).replace(microsecond=0)
    with store_for(target, postgres_url) as url:
        cfg = replies_config(url)
        keywords, policy = keyword_rules(cfg.settings), reply_policy(cfg.settings)
        users = [f"4915{n:09d}" for n in range(count)]

        def queue(chunk: list[str]) -> int:
            body = p.payload(*[p.message(u, now - timedelta(seconds=5), "STOP") for u in chunk])
            return ingest_payload(
                engine, body, keywords, "bench", lambda: now, replies=policy
            ).replies_queued

        engine = open_engine(url)
        try:
            results.append(
                (
                    "queue (100 STOPs a delivery)",
                    *timed(
                        lambda: sum(queue(users[i : i + BATCH]) for i in range(0, count, BATCH))
                    ),
                )
            )
            half = count // 2
            fake = FakeCloudApi()
            with responses.RequestsMock() as mock:
                fake.register(mock)
                floor = sender()
                results.append(
                    (
                        "floor: sender alone, in-process fake",
                        *timed(
                            lambda: sum(
                                floor.send_text(
                                    wa_id=u,
                                    user_id=None,
                                    text="x",
                                    reply_to=f"w.{u}",
                                    callback_data=f"c.{u}",
                                )
                                is not None
                                for u in users[:half]
                            )
                        ),
                    )
                )
                results.append(
                    ("send, in-process fake", *timed(lambda: drain(engine, sender(), now, half)))
                )
            with fake.serve_http() as graph:
                http_sender = CloudApiSender(
                    graph_url=graph,
                    api_version="v27.0",
                    phone_number_id="106540352242922",
                    access_token="EAAG-fake-system-user-token",
                    policy=RetryPolicy(),
                )
                results.append(
                    (
                        "send, HTTP fake on loopback",
                        *timed(lambda: drain(engine, http_sender, now, count - half)),
                    )
                )
            sent = fake.sent[half:]  # the floor's messages are no replies
            results.append(
                (
                    "settle (3 statuses a reply, 100 a delivery)",
                    *timed(lambda: settle(engine, fake, sent, keywords, now)),
                )
            )
            with engine.connect() as connection:
                states = dict(
                    connection.execute(
                        select(replies.c.state, func.count()).group_by(replies.c.state)
                    ).all()
                )
            assert states == {"read": count}, states
        finally:
            engine.dispose()
    return results


def drain(engine: Any, reply_sender: Any, now: datetime, expected: int) -> int:
    """Passes until `expected` replies are sent or none is due: a pass sends up to
    PASS_LIMIT, so the first phase may take more than its half (with 50 replies, all of
    them), and the next phase then counts what was left, never waiting for more."""
    done = 0
    while done < expected:
        summary = send_due(engine, reply_sender, "bench-node", lambda: now)
        assert summary.stopped is None and summary.sent == summary.looked_at, summary
        if summary.looked_at == 0:
            break
        done += summary.sent
    return done


def settle(engine: Any, fake: FakeCloudApi, sent: list[Any], keywords: Any, now: datetime) -> int:
    statuses = 0
    for state in ("sent", "delivered", "read"):
        for i in range(0, len(sent), BATCH):
            changes = [
                fake.status_payload(m, state, now)["entry"][0]["changes"][0]
                for m in sent[i : i + BATCH]
            ]
            report = ingest_payload(engine, p.payload(*changes), keywords, "bench", lambda: now)
            statuses += report.replies_settled
    return statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replies", type=int, default=2000)
    parser.add_argument("--targets", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES)
    args = parser.parse_args()
    for target in args.targets:
        print(f"\n{target}: {args.replies} replies")
        for name, count, seconds in run_target(target, args.replies, args.postgres_url):
            print(f"  {name:<46} {count:>6} in {seconds:6.2f} s = {count / seconds:8.0f}/s")


if __name__ == "__main__":
    main()

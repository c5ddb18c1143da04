"""Full sync on the ledger: contacts per second and peak memory (issue 3's benchmark).

Run by hand, not in CI:

    .venv/bin/python benchmarks/sync_full_ledger.py --contacts 1000000 --events 1000000

It builds a SQLite ledger in a temporary folder (contacts in mixed phone formats,
events spread over a fifth of the numbers, one in twenty a STOP), then measures in
separate child processes, so each peak RSS is that step's own:

* baseline: streaming every contact through the ledger connector (the I/O floor);
* first full sync: onboarding, once per ledger (parses every number into the phone
  index, decides, queues and writes back a third of the records);
* nightly full sync: what the schedule runs every night, after a day's new events
  (1% of the archive, one in twenty a STOP) arrived;
* idle full sync: nothing new since, so zero writes (idempotence at scale).

Reported: seconds, contacts/s, peak RSS, and the ratio of each sync to the baseline.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert

from waconsent.phones import wa_id_key
from waconsent.store.engine import open_engine
from waconsent.store.tables import contacts, events

FORMATS = ("0151 {a}{b}", "+49 151 {a} {b}", "0049151{a}{b}", "+49151{a}{b}", "0151/{a}{b}")


NOW = datetime(2026, 11, 1, tzinfo=UTC)


def build(url: str, n_contacts: int, n_events: int, seed: int = 1) -> None:
    engine = open_engine(url)
    now = NOW
    with engine.begin() as connection:
        batch = []
        for i in range(n_contacts):
            a, b = f"{i // 10000:04d}", f"{i % 10000:04d}"
            opted = i % 3 == 0
            batch.append(
                {
                    "id": f"C{i:08d}",
                    "name": f"Contact {i}",
                    "mobile_phone": FORMATS[i % len(FORMATS)].format(a=a, b=b),
                    "opt_in": opted,
                    "opt_in_date": now - timedelta(days=90) if opted else None,
                    "opt_in_ip": "203.0.113.1" if i % 6 == 0 else None,
                    "opt_in_source": "web-form" if opted else None,
                    "modified_at": now,
                }
            )
            if len(batch) == 20_000:
                connection.execute(insert(contacts), batch)
                batch = []
        if batch:
            connection.execute(insert(contacts), batch)
    engine.dispose()
    add_events(url, n_contacts, n_events, "B", NOW, seed)


def add_events(
    url: str, n_contacts: int, n_events: int, prefix: str, start: datetime, seed: int
) -> None:
    """Messages from a fifth of the numbers, one in twenty a STOP, a second apart."""
    rnd = random.Random(seed)
    engine = open_engine(url)
    active = max(1, n_contacts // 5)
    with engine.begin() as connection:
        batch = []
        for j in range(n_events):
            i = rnd.randrange(active)
            wa_id = f"49151{i // 10000:04d}{i % 10000:04d}"
            stop = j % 20 == 0
            batch.append(
                {
                    "key": f"msg:wamid.{prefix}{j:09d}",
                    "kind": "message",
                    "occurred_at": start + timedelta(seconds=j),
                    "wa_id": wa_id,
                    "phone_key": wa_id_key(wa_id),
                    "message_id": f"wamid.{prefix}{j:09d}",
                    "message_type": "text",
                    "signal": "opt_out" if stop else "none",
                    "keyword": "STOP" if stop else None,
                    "opens_session": True,
                    "source": "benchmark",
                    "received_at": start,
                }
            )
            if len(batch) == 20_000:
                connection.execute(insert(events), batch)
                batch = []
        if batch:
            connection.execute(insert(events), batch)
    engine.dispose()


CHILD = """
import json, resource, sys, time
from waconsent import config
from waconsent.config import LoadedConfig, Secrets
from waconsent.connectors.ledger import LedgerCrm
from waconsent.store.engine import open_engine
from waconsent.sync.run import run_once

url, step = sys.argv[1], sys.argv[2]
engine = open_engine(url)
start = time.perf_counter()
if step == "baseline":
    count = sum(1 for _ in LedgerCrm(engine).read_all())
    extra = {}
else:
    cfg = LoadedConfig(config.parse({"store": {"url": url}, "crm": {"kind": "ledger"}}),
                       Secrets(), None)
    report = run_once(cfg, full=True, engine=engine)
    count = report.records_read
    extra = {"writes_sent": report.writes_sent, "revocations": report.revocations,
             "events_considered": report.events_considered}
elapsed = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"step": step, "records": count, "seconds": elapsed, "peak_bytes": peak,
                  **extra}))
"""


def measure(url: str, step: str) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, url, step], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{Path(folder) / 'bench.db'}"
        started = time.perf_counter()
        build(url, args.contacts, args.events)
        print(
            f"built {args.contacts:,} contacts and {args.events:,} events in "
            f"{time.perf_counter() - started:.1f} s"
        )
        baseline = measure(url, "baseline")
        rows = [baseline, measure(url, "first")]
        add_events(
            url,
            args.contacts,
            max(1, args.events // 100),
            "N",
            NOW + timedelta(seconds=args.events + 86_400),
            seed=2,
        )
        rows += [measure(url, "nightly"), measure(url, "idle")]
    for row in rows:
        rate = row["records"] / row["seconds"]
        print(
            f"{row['step']:>8}: {row['records']:,} contacts in {row['seconds']:.1f} s = "
            f"{rate:,.0f} contacts/s, peak RSS {row['peak_bytes'] / 2**20:,.0f} MiB, "
            f"{row['seconds'] / baseline['seconds']:.2f}x the baseline"
            + (f", writes {row['writes_sent']:,}" if "writes_sent" in row else "")
        )


if __name__ == "__main__":
    main()

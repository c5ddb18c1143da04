"""The pre-send check (issue 16): `audience check` numbers per second and peak memory, and the
consent API's latency at a steady rate.

Run by hand, not in CI:

    .venv/bin/python benchmarks/audience_check.py --contacts 100000 --numbers 1000000

It builds a SQLite ledger in a temporary folder (as `sync_full_ledger.py` does: contacts in
mixed phone formats, events over a fifth of the numbers, one in twenty a STOP), runs one full
sync (which fills the consent snapshot), then lets a day's new events arrive after it (1 %,
one in twenty a STOP: the check must apply them). Then:

* **CLI**: a campaign list of `--numbers` rows (half carried by a record, half unknown;
  spellings: 50 % E.164, 25 % wa_id digits, 15 % spaced E.164, 7 % national, 3 % junk) is
  checked by `waconsent audience check` in a child process, output to /dev/null: wall time,
  numbers/s and the child's peak RSS; the same with a tenth of the list, so that memory can
  be compared (flat: the same peak for a tenth and for all). The baseline, in the same run:
  a child process that only copies the list through Python's csv module, adding the four
  answer columns (the I/O floor of any CSV-in, CSV-out tool); reported as "x the copy";
* **API**: the receiver (production uvicorn settings) in a child process, `GET
  /v1/consent/{number}` sent open loop at `--rate` per second for `--duration` seconds
  (after 2 s of warm-up at the same rate; latency counted from the scheduled moment), then
  `POST /v1/consent/check` with 1,000 numbers, 20 times back to back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.sync_full_ledger import add_events, build  # noqa: E402
from benchmarks.webhook_throughput import Connection, Phase, wait_for_port  # noqa: E402

TOKEN = "benchmark-api-token"
SECRETS = {
    "WHATSAPP_APP_SECRET": "benchmark-app-secret",
    "WHATSAPP_VERIFY_TOKEN": "benchmark-verify-token",
    "WACONSENT_API_TOKEN": TOKEN,
}


def number(i: int, style: int) -> str:
    a, b = f"{i // 10000:04d}", f"{i % 10000:04d}"
    if style < 50:
        return f"+49151{a}{b}"
    if style < 75:
        return f"49151{a}{b}"
    if style < 90:
        return f"+49 151 {a} {b}"
    if style < 97:
        return f"0151 {a}{b}"
    return "n/a"


def write_list(path: Path, contacts: int, count: int, seed: int = 3) -> None:
    rnd = random.Random(seed)
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write("name,phone,segment\r\n")
        for n in range(count):
            out.write(
                f"Person {n},{number(rnd.randrange(2 * contacts), rnd.randrange(100))},s{n % 7}\r\n"
            )


def config_file(folder: Path, url: str, port: int = 8080) -> Path:
    path = folder / "waconsent.toml"
    path.write_text(
        f'[store]\nurl = "{url}"\n\n[crm]\nkind = "ledger"\n\n'
        f"[webhook]\nport = {port}\n\n[api]\nrate_per_minute = 1000000\n",
        encoding="utf-8",
    )
    return path


def sync_once(url: str) -> None:
    from waconsent import config
    from waconsent.config import LoadedConfig, Secrets
    from waconsent.store.engine import open_engine
    from waconsent.sync.run import run_once

    engine = open_engine(url)
    cfg = LoadedConfig(
        config.parse({"store": {"url": url}, "crm": {"kind": "ledger"}}), Secrets(), None
    )
    report = run_once(cfg, full=True, engine=engine)
    engine.dispose()
    print(f"full sync: {report.records_read:,} records, {report.writes_sent:,} writes")


def cli_check(cfg: Path, listing: Path) -> tuple[float, int]:
    """Seconds and peak RSS (of the reader or of its largest worker process, whichever is
    larger) of one `audience check` in a child process."""
    child = (
        f"import resource, sys, runpy; sys.argv = ['waconsent', '--config', {str(cfg)!r}, "
        f"'audience', 'check', {str(listing)!r}]\n"
        "try:\n    runpy.run_module('waconsent', run_name='__main__')\n"
        "finally:\n    print(max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
        " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss), file=sys.stderr)"
    )
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", child],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"audience check failed: {result.stderr}")
    lines = result.stderr.strip().splitlines()
    print("   ", lines[-2] if len(lines) > 1 else "")
    return seconds, int(lines[-1]) * 1024


COPY = """
import csv, sys
with open(sys.argv[1], newline="", encoding="utf-8") as source:
    reader = csv.reader(source)
    writer = csv.writer(sys.stdout, lineterminator="\\r\\n")
    writer.writerow(next(reader) + ["may_send", "reason", "session_open_until", "records"])
    for row in reader:
        writer.writerow(row + ["false", "no_record", "", ""])
"""


def csv_copy(listing: Path) -> float:
    """Seconds of the baseline: the list copied through the csv module, nothing checked."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", COPY, str(listing)], stdout=subprocess.DEVNULL, check=True
    )
    return time.perf_counter() - started


# ------------------------------------------------------------------ API


def run_server(store_url: str, port_file: str) -> None:
    import logging

    import uvicorn

    from waconsent import logs
    from waconsent.config.loading import LoadedConfig, Secrets, parse
    from waconsent.server import listen, uvicorn_config
    from waconsent.store.engine import open_engine
    from waconsent.web import create_app

    config = LoadedConfig(
        parse(
            {
                "store": {"url": store_url},
                "crm": {"kind": "ledger"},
                "api": {"rate_per_minute": 1_000_000},
            }
        ),
        Secrets(SECRETS),
        None,
    )
    logs.configure(logging.INFO)  # as in production: one check line and one access line
    app = create_app(config, open_engine(store_url))
    sock = listen("127.0.0.1", 0)
    Path(port_file).write_text(str(sock.getsockname()[1]))
    uvicorn.Server(uvicorn_config(app, config)).run(sockets=[sock])


@contextmanager
def server(store_url: str) -> Iterator[int]:
    with tempfile.TemporaryDirectory() as folder:
        port_file = os.path.join(folder, "port")
        process = subprocess.Popen(
            [sys.executable, __file__, "--serve", store_url, "--port-file", port_file],
            stderr=subprocess.DEVNULL,
        )
        try:
            yield wait_for_port(process, port_file, "the server")
        finally:
            process.terminate()
            process.wait(30)


def get_request(port: int, value: str | None) -> bytes:
    """A consent check of `value`; None: the baseline, `GET /healthz`."""
    path = "/healthz" if value is None else f"/v1/consent/{value}"
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    ).encode()


def post_request(port: int, values: list[str]) -> bytes:
    body = json.dumps({"numbers": values}).encode()
    return (
        f"POST /v1/consent/check HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def api_open_loop(
    port: int,
    contacts: int,
    rate: float,
    duration: float,
    connections: int = 32,
    baseline: bool = False,
) -> Phase:
    """GETs started on schedule over a fixed set of keep-alive connections (a sending tool's
    HTTP client pool); a request waits for a free connection, and that wait counts. With
    `baseline`, the same schedule of `GET /healthz`."""
    phase = Phase(f"GET {'/healthz' if baseline else 'open loop'} at {rate:.0f}/s")
    rnd = random.Random(5)
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(await Connection.open(port))
    tasks: set[asyncio.Task[None]] = set()

    async def one(scheduled: float, value: str | None) -> None:
        connection = await pool.get()
        try:
            status = await connection.exchange(get_request(port, value))
        except (ConnectionError, asyncio.IncompleteReadError):
            # the server closed a connection that sat idle past its keep-alive: the request
            # was not read; send it again on a new one (what an HTTP client library does)
            connection.close()
            connection = await Connection.open(port)
            status = await connection.exchange(get_request(port, value))
        phase.latencies.append(time.perf_counter() - scheduled)
        if status == 200:
            phase.ok += 1
        else:
            phase.failed += 1
        pool.put_nowait(connection)

    started = time.perf_counter()
    for n in range(int(rate * duration)):
        scheduled = started + n / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        value = number(rnd.randrange(2 * contacts), rnd.randrange(75))
        task = asyncio.create_task(one(scheduled, None if baseline else value))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    phase.seconds = time.perf_counter() - started
    while not pool.empty():
        pool.get_nowait().close()
    return phase


async def api_posts(port: int, contacts: int, times: int = 20) -> Phase:
    phase = Phase("POST 1,000 numbers")
    rnd = random.Random(6)
    connection = await Connection.open(port)
    started = time.perf_counter()
    for _ in range(times):
        values = [number(rnd.randrange(2 * contacts), rnd.randrange(97)) for _ in range(1000)]
        sent = time.perf_counter()
        status = await connection.exchange(post_request(port, values))
        phase.latencies.append(time.perf_counter() - sent)
        phase.ok += status == 200
        phase.failed += status != 200
    phase.seconds = time.perf_counter() - started
    connection.close()
    return phase


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--numbers", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--serve")
    parser.add_argument("--port-file")
    args = parser.parse_args()
    if args.serve:
        run_server(args.serve, args.port_file)
        return
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        url = f"sqlite:///{folder / 'bench.db'}"
        started = time.perf_counter()
        build(url, args.contacts, args.events)
        sync_once(url)
        add_events(
            url,
            args.contacts,
            max(1, args.events // 100),
            "N",
            datetime.now(UTC) - timedelta(hours=2),
            seed=2,
        )
        print(
            f"ledger built and synced in {time.perf_counter() - started:.1f} s; "
            f"{max(1, args.events // 100):,} events arrived since the sync"
        )
        cfg = config_file(folder, url)
        for count in (max(1, args.numbers // 10), args.numbers):
            listing = folder / f"list-{count}.csv"
            write_list(listing, args.contacts, count)
            cpu_before = os.times()
            seconds, peak = cli_check(cfg, listing)
            cpu = sum(os.times()[2:4]) - sum(cpu_before[2:4])
            copy = csv_copy(listing)
            print(
                f"audience check: {count:,} numbers in {seconds:.1f} s = "
                f"{count / seconds:,.0f} numbers/s, peak RSS {peak / 2**20:,.0f} MiB, "
                f"CPU {cpu:.1f} s (load average {os.getloadavg()[0]:.1f}); plain CSV copy "
                f"{copy:.1f} s = {count / copy:,.0f} rows/s; the check {seconds / copy:.1f}x "
                "the copy"
            )
        with server(url) as port:
            asyncio.run(api_open_loop(port, args.contacts, args.rate, 2))  # warm-up, not kept
            print(
                asyncio.run(
                    api_open_loop(port, args.contacts, args.rate, args.duration, baseline=True)
                ).line()
            )
            print(asyncio.run(api_open_loop(port, args.contacts, args.rate, args.duration)).line())
            print(asyncio.run(api_posts(port, args.contacts)).line())


if __name__ == "__main__":
    main()

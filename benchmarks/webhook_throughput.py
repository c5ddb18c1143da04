"""Webhook receiver throughput and latency, measured from a second process on loopback.

Run by hand (not a test):

    python benchmarks/webhook_throughput.py                      # baseline, SQLite, PostgreSQL
    python benchmarks/webhook_throughput.py --targets sqlite --duration 20

For each target a server process is started with the production uvicorn settings
(`waconsent.web.uvicorn_config`) on a free 127.0.0.1 port; this process is the load
generator. It speaks HTTP/1.1 over raw keep-alive asyncio connections (an HTTP client
library would spend more CPU than the server on this 2-core machine) and sends signed
deliveries, each a new message (every tenth a STOP, so evidence rows are appended too).

Two phases per target:

- **closed loop**: `--connections` clients send back to back for `--duration` seconds;
  the sustained deliveries per second is the capacity;
- **open loop** at each of `--rates` deliveries per second (default 250 and 500, the
  target): requests start on schedule whether or not earlier ones finished, and latency
  is counted from the scheduled moment, so a stalled server cannot hide its queue (no
  coordinated omission). More than 256 in flight are not sent and counted as such.

Targets: `baseline` is a bare Starlette endpoint on the same server settings that reads
the body and answers 200 without checking or storing anything; `sqlite` a fresh file in a
temporary folder; `postgresql` a fresh schema in `--postgres-url`, dropped afterwards.
After each run the stored events are counted: every 200 must have stored its event.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from waconsent.connectors.webhook_signature import SIGNATURE_HEADER, sign  # noqa: E402

APP_SECRET = "benchmark-app-secret"
VERIFY_TOKEN = "benchmark-verify-token"
PATH = "/webhooks/whatsapp"
DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


# ------------------------------------------------------------------ server side (subprocess)


def run_server(target: str, store_url: str, port_file: str) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    from waconsent import logs
    from waconsent.config.loading import LoadedConfig, Secrets, parse
    from waconsent.server import listen, uvicorn_config
    from waconsent.store.engine import open_engine
    from waconsent.web import create_app

    config = LoadedConfig(
        parse({"store": {"url": store_url}, "webhook": {"path": PATH}}),
        Secrets({"WHATSAPP_APP_SECRET": APP_SECRET, "WHATSAPP_VERIFY_TOKEN": VERIFY_TOKEN}),
        None,
    )
    logs.configure(logging.INFO)  # INFO events as in production (2 lines per delivery)
    if target == "baseline":

        async def bare(request: Request) -> Response:
            await request.body()
            return PlainTextResponse("ok")

        app = Starlette(
            routes=[Route(PATH, bare, methods=["POST"]), Route("/healthz", bare, methods=["GET"])]
        )
    else:
        app = create_app(config, open_engine(store_url))
    sock = listen("127.0.0.1", 0)  # the production listener (TCP_NODELAY, backlog)
    Path(port_file).write_text(str(sock.getsockname()[1]))
    uvicorn.Server(uvicorn_config(app, config)).run(sockets=[sock])


# ------------------------------------------------------------------ load generator


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    ok: int = 0
    failed: int = 0
    shed: int = 0  # open loop: not sent, already `max_connections` requests in flight
    seconds: float = 0.0

    def line(self) -> str:
        ordered = sorted(self.latencies)
        p50 = statistics.median(ordered) * 1000 if ordered else float("nan")
        p99 = ordered[int(len(ordered) * 0.99) - 1] * 1000 if ordered else float("nan")
        return (
            f"{self.name:<28} {self.ok / self.seconds:8.0f}/s  median {p50:6.2f} ms  "
            f"p99 {p99:6.2f} ms  ok {self.ok}  non-200 {self.failed}"
            + (f"  not sent (too far behind) {self.shed}" if self.shed else "")
        )

    def summary(self) -> dict[str, float]:
        ordered = sorted(self.latencies)
        return {
            "per_second": self.ok / self.seconds,
            "median_ms": statistics.median(ordered) * 1000,
            "p99_ms": ordered[int(len(ordered) * 0.99) - 1] * 1000,
            "ok": self.ok,
            "failed": self.failed,
            "shed": self.shed,
        }


class Deliveries:
    """Signed request bytes. Without `statuses`: each a new message, every tenth a STOP.
    With `statuses` N: a campaign's status storm, N sent/delivered/read statuses of the
    business's own messages per delivery; in every tenth, one of them is a user's STOP."""

    def __init__(self, port: int, statuses: int = 0) -> None:
        self.port = port
        self.statuses = statuses
        self.counter = itertools.count()
        self.run = uuid.uuid4().hex[:8]

    def _status(self, n: int, i: int) -> dict[str, object]:
        wa_id = f"49171{(n * self.statuses + i) % 9_000_000 + 1_000_000:07d}"
        return {
            "id": f"wamid.out.{self.run}.{n}.{i // 3}",
            "status": ("sent", "delivered", "read")[i % 3],
            "timestamp": str(1_760_000_000 + n),
            "recipient_id": wa_id,
            "pricing": {
                "billable": True,
                "pricing_model": "PMP",
                "type": "regular",
                "category": "marketing",
            },
        }

    def next(self) -> bytes:
        n = next(self.counter)
        wa_id = f"49170{n % 9_000_000 + 1_000_000:07d}"
        value: dict[str, object] = {
            "messaging_product": "whatsapp",
            "metadata": {
                "display_phone_number": "15550001111",
                "phone_number_id": "106540352242922",
            },
            "contacts": [{"profile": {"name": "Kunde"}, "wa_id": wa_id}],
            "messages": [
                {
                    "from": wa_id,
                    "id": f"wamid.bench.{self.run}.{n}",
                    "timestamp": str(1_760_000_000 + n),
                    "type": "text",
                    "text": {"body": "STOP" if n % 10 == 0 else "Hallo, eine Frage"},
                }
            ],
        }
        if self.statuses:
            with_stop = n % 10 == 0
            value["statuses"] = [
                self._status(n, i) for i in range(self.statuses - (1 if with_stop else 0))
            ]
            if not with_stop:
                del value["messages"], value["contacts"]
        body = json.dumps(
            {
                "object": "whatsapp_business_account",
                "entry": [
                    {"id": "102290129340398", "changes": [{"field": "messages", "value": value}]}
                ],
            },
            separators=(",", ":"),
        ).encode()
        head = (
            f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Content-Type: application/json\r\n{SIGNATURE_HEADER}: "
            f"{sign(body, APP_SECRET)}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def exchange(self, request: bytes) -> int:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


async def closed_loop(port: int, connections: int, duration: float, statuses: int = 0) -> Phase:
    phase = Phase(f"closed loop x{connections}")
    deliveries = Deliveries(port, statuses)
    stop_at = time.perf_counter() + duration

    async def client() -> None:
        connection = await Connection.open(port)
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            status = await connection.exchange(deliveries.next())
            phase.latencies.append(time.perf_counter() - started)
            if status == 200:
                phase.ok += 1
            else:
                phase.failed += 1
        connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(connections)))
    phase.seconds = time.perf_counter() - started
    return phase


async def open_loop(
    port: int, rate: float, duration: float, max_connections: int, statuses: int = 0
) -> Phase:
    phase = Phase(f"open loop at {rate:.0f}/s")
    deliveries = Deliveries(port, statuses)
    idle: list[Connection] = [await Connection.open(port) for _ in range(16)]
    opened = len(idle)
    tasks: set[asyncio.Task[None]] = set()

    async def one(scheduled: float) -> None:
        nonlocal opened
        if idle:
            connection = idle.pop()
        else:
            opened += 1
            connection = await Connection.open(port)
        status = await connection.exchange(deliveries.next())
        phase.latencies.append(time.perf_counter() - scheduled)  # from the schedule: queue too
        if status == 200:
            phase.ok += 1
        else:
            phase.failed += 1
        idle.append(connection)

    started = time.perf_counter()
    total = int(rate * duration)
    for n in range(total):
        scheduled = started + n / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if opened - len(idle) >= max_connections:
            phase.shed += 1  # the server is so far behind that we would open too many
            continue
        task = asyncio.create_task(one(scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    phase.seconds = time.perf_counter() - started
    for connection in idle:
        connection.close()
    return phase


# ------------------------------------------------------------------ orchestration


@contextmanager
def store_for(target: str, postgres_url: str) -> Iterator[str]:
    if target == "postgresql":
        from sqlalchemy import create_engine, text

        schema = f"wac_bench_{uuid.uuid4().hex[:8]}"
        admin = create_engine(postgres_url)
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        try:
            yield f"{postgres_url}?options=-csearch_path%3D{schema}"
        finally:
            with admin.begin() as connection:
                connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()
    else:
        with tempfile.TemporaryDirectory() as folder:
            yield f"sqlite:///{folder}/ledger.db"


@contextmanager
def server(target: str, store_url: str) -> Iterator[int]:
    with tempfile.TemporaryDirectory() as folder:
        port_file = os.path.join(folder, "port")
        process = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve",
                target,
                "--store-url",
                store_url,
                "--port-file",
                port_file,
            ],
            stderr=subprocess.DEVNULL,
        )
        try:
            yield wait_for_port(process, port_file, f"the {target} server")
        finally:
            process.terminate()
            process.wait(30)


def wait_for_port(process: subprocess.Popen[bytes], port_file: str, what: str) -> int:
    """The port a child server wrote to `port_file`, once it accepts connections."""
    deadline = time.monotonic() + 30
    while not os.path.exists(port_file) or not Path(port_file).read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start")
        time.sleep(0.05)
    port = int(Path(port_file).read_text())
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            time.sleep(0.05)
        else:
            return port


def stored_events(store_url: str) -> int:
    from sqlalchemy import create_engine, func, select

    from waconsent.store.tables import events

    engine = create_engine(store_url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(events)).scalar_one())
    finally:
        engine.dispose()


def _items(phase: Phase, items: int) -> str:
    return f"  items {phase.ok * items / phase.seconds:8.0f}/s" if items > 1 else ""


def bench(target: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    with store_for(target, args.postgres_url) as store_url, server(target, store_url) as port:
        items = max(1, args.statuses)
        asyncio.run(closed_loop(port, args.connections, 1.5, args.statuses))  # warm-up
        closed = asyncio.run(closed_loop(port, args.connections, args.duration, args.statuses))
        print(f"{target:<11}" + closed.line() + _items(closed, items), flush=True)
        results["closed"] = {
            **closed.summary(),
            "items_per_second": closed.ok * items / closed.seconds,
        }
        for rate in (float(r) for r in args.rates.split(",")):
            opened = asyncio.run(open_loop(port, rate, args.duration, 256, args.statuses))
            print(f"{target:<11}" + opened.line() + _items(opened, items), flush=True)
            results[f"open {rate:.0f}/s"] = {
                **opened.summary(),
                "items_per_second": opened.ok * items / opened.seconds,
            }
        if target != "baseline":
            stored = stored_events(store_url)
            # each 200 stored its message; in a status storm only every tenth delivery has
            # one (the STOP), its statuses are acknowledged without a row
            sent = sum(int(r["ok"]) // (10 if args.statuses else 1) for r in results.values())
            print(
                f"{'':<11}stored events: {stored} (expected from the measured phases' 200s: "
                f"at least {sent}, plus the warm-up's)",
                flush=True,
            )
            if stored < sent:
                raise SystemExit("fewer events stored than deliveries answered 200")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default="baseline,sqlite,postgresql")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--connections", type=int, default=8, help="closed-loop clients")
    parser.add_argument(
        "--rates", default="250,500", help="open-loop deliveries per second, comma-separated"
    )
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES)
    parser.add_argument(
        "--statuses",
        type=int,
        default=0,
        help="a status storm: updates per delivery (N - 1 statuses, 1 STOP)",
    )
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--store-url", help=argparse.SUPPRESS)
    parser.add_argument("--port-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        run_server(args.serve, args.store_url, args.port_file)
        return
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.duration:.0f} s per phase",
        flush=True,
    )
    results = {target: bench(target, args) for target in args.targets.split(",")}
    if "baseline" in results:
        base = results["baseline"]["closed"]["per_second"]
        for target, numbers in results.items():
            if target != "baseline":
                print(
                    f"{target}: {numbers['closed']['per_second'] / base:.2f} x the bare "
                    f"endpoint's capacity"
                )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

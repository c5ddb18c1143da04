"""Parsing one large webhook delivery (issue 11's benchmark).

Run by hand, not in CI:

    .venv/bin/python benchmarks/parse_delivery.py
    .venv/bin/python benchmarks/parse_delivery.py --before d599391   # also time that revision

A delivery here is one change holding `messages` messages (one in ten a STOP) and a
`contacts[]` list of `contacts` entries (the senders plus others), shaped as Meta sends
them; every message looks its sender's user id up in that list. Measured, each the best
of a few repetitions:

* decode: `json.loads` of the raw body (the floor every receiver pays);
* parse: `parse_payload` of the decoded body, the receiver's work under the write lock;
* with `--before REV`: the same parse by `waconsent/connectors/whatsapp.py` as it stood at
  that revision (loaded from git into its own module), so both run in one process, on one
  machine state, and compare as a ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from waconsent.connectors.whatsapp import parse_payload
from waconsent.keywords import DEFAULT_KEYWORDS

ROOT = Path(__file__).resolve().parents[1]
BASE_TS = 1_780_000_000


def delivery(messages: int, contacts: int) -> bytes:
    senders = [f"49151{i:08d}" for i in range(messages)]
    items = [
        {
            "from": wa_id,
            "id": f"wamid.BENCH{i:06d}",
            "timestamp": str(BASE_TS + i),
            "type": "text",
            "text": {"body": "STOP" if i % 10 == 0 else "hello"},
        }
        for i, wa_id in enumerate(senders)
    ]
    listed = [
        {"profile": {"name": f"Kunde {i}"}, "wa_id": wa_id, "user_id": f"DE.{i}"}
        for i, wa_id in enumerate(senders)
    ]
    listed += [
        {"profile": {"name": "Other"}, "wa_id": f"49170{i:08d}", "user_id": f"DE.x{i}"}
        for i in range(max(0, contacts - messages))
    ]
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550001111", "phone_number_id": "1"},
        "contacts": listed[:contacts] if contacts >= messages else listed,
        "messages": items,
    }
    document = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "WABA", "changes": [{"field": "messages", "value": value}]}],
    }
    return json.dumps(document, separators=(",", ":")).encode()


def best(fn: Callable[[], Any], budget: float = 2.0, most: int = 7) -> float:
    """The shortest of up to `most` runs, stopping once `budget` seconds are spent."""
    times: list[float] = []
    spent = 0.0
    while len(times) < most and (not times or spent < budget):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
        spent += times[-1]
    return min(times)


def parser_at(revision: str) -> Callable[..., Any]:
    """`parse_payload` from whatsapp.py at `revision`, as its own module."""
    source = subprocess.run(
        ["git", "show", f"{revision}:waconsent/connectors/whatsapp.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = types.ModuleType(f"whatsapp_at_{revision}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{revision}:whatsapp.py", "exec"), module.__dict__)
    parse: Callable[..., Any] = module.parse_payload
    return parse


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--messages", type=int, default=1000)
    options.add_argument(
        "--contacts",
        default="1000,20000",
        help="comma-separated sizes of contacts[] (default 1000,20000)",
    )
    options.add_argument("--before", metavar="REV", help="also time the parser at REV")
    args = options.parse_args()
    before = parser_at(args.before) if args.before else None
    header = f"{'contacts':>8}  {'decode':>9}  {'parse':>9}  {'parse/decode':>12}"
    if before is not None:
        header += f"  {'before':>9}  {'before/now':>10}"
    print(f"{args.messages} messages per delivery; best of several runs")
    print(header)
    for contacts in (int(n) for n in args.contacts.split(",")):
        body = delivery(args.messages, contacts)
        document = json.loads(body)
        decode = best(lambda body=body: json.loads(body))
        parsed = parse_payload(document, DEFAULT_KEYWORDS)
        assert len(parsed.events) == args.messages and not parsed.skipped
        now = best(lambda document=document: parse_payload(document, DEFAULT_KEYWORDS))
        line = (
            f"{contacts:>8}  {decode * 1000:>7.1f}ms  {now * 1000:>7.1f}ms  {now / decode:>11.1f}x"
        )
        if before is not None:
            then = best(
                lambda document=document: before(document, DEFAULT_KEYWORDS), budget=5.0, most=3
            )
            line += f"  {then * 1000:>7.0f}ms  {then / now:>9.0f}x"
        print(line)


if __name__ == "__main__":
    main()

"""One log format: valid JSON lines whatever they hold, fields kept, a run id on every line."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from tests import payloads as p
from tests.test_run import T0, clock, deliver, loaded, opted_in
from waconsent import logs
from waconsent.connectors.ledger import LedgerCrm
from waconsent.store.contacts import upsert_contacts
from waconsent.sync.run import run_once


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """A JSON-lines handler of our own on the package logger (so caplog is not needed)."""
    stream = io.StringIO()
    handler = logs._Handler(stream, json_lines=True)  # the handler `configure` installs
    package = logging.getLogger("waconsent")
    level = package.level
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    yield stream
    package.removeHandler(handler)
    package.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@settings(max_examples=200, deadline=None)
@given(
    st.text(),
    st.dictionaries(
        st.text(min_size=1, max_size=10).filter(
            lambda k: k not in ("event", "ts", "level", "logger")
        ),
        st.text() | st.integers(),
        max_size=4,
    ),
)
def test_every_line_is_one_json_object(name: str, fields: dict[str, object]) -> None:
    """Quotes, newlines, non-ASCII or control characters in the event or fields never break
    the line: one JSON object per line, every field kept."""
    stream = io.StringIO()
    logger = logging.getLogger("waconsent.test.json")
    handler = logs._Handler(stream, json_lines=True)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logs.event(logger, name, **fields)
    finally:
        logger.removeHandler(handler)
    [line] = stream.getvalue().splitlines()
    parsed = json.loads(line)
    assert parsed["event"] == name and parsed["level"] == "info"
    assert {k: parsed[k] for k in fields} == fields


def test_extra_fields_and_exceptions(captured: io.StringIO) -> None:
    """`extra=` values from libraries are kept; an exception shows its type, not its text."""
    logger = logging.getLogger("waconsent.test.extra")
    logger.warning('he said "stop"\nthen left', extra={"count": 3})
    try:
        raise ValueError("+4915123456789 in a message")  # noqa: TRY301 - a real traceback
    except ValueError:
        logger.exception("failed")
    first, second = lines(captured)
    assert first["event"] == 'he said "stop"\nthen left' and first["count"] == 3
    assert second["error"] == "ValueError" and "4915123456789" not in captured.getvalue()


def test_text_lines_on_a_terminal() -> None:
    """On a terminal a person reads `LEVEL logger: event key=value`."""
    stream = io.StringIO()
    logger = logging.getLogger("waconsent.test.text")
    handler = logs._Handler(stream, json_lines=False)
    logger.addHandler(handler)
    try:
        logs.event(logger, "webhook.forged", logging.WARNING, bytes=120)
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "WARNING waconsent.test.text: webhook.forged bytes=120\n"


def test_bound_fields_reach_worker_threads(captured: io.StringIO) -> None:
    """Fields bound in a block reach threads started through `in_context`, and end with it."""
    logger = logging.getLogger("waconsent.test.bound")
    with logs.bound(run_id=7):
        worker = threading.Thread(target=logs.in_context(lambda: logs.event(logger, "in.thread")))
        worker.start()
        worker.join()
        plain = threading.Thread(target=lambda: logs.event(logger, "plain.thread"))
        plain.start()
        plain.join()
    logs.event(logger, "after")
    by_event = {line["event"]: line for line in lines(captured)}
    assert by_event["in.thread"]["run_id"] == 7
    assert "run_id" not in by_event["plain.thread"] and "run_id" not in by_event["after"]


class ChattyLedger(LedgerCrm):
    """A ledger whose reads log from the read-ahead thread, like a network CRM's would."""

    read_ahead = True

    def read_all(self):  # type: ignore[no-untyped-def]
        logs.event(logging.getLogger("waconsent.test.crm"), "crm.page")
        yield from super().read_all()


def test_every_line_of_a_run_carries_its_run_id(
    engine: Engine, store_url: str, captured: io.StringIO
) -> None:
    """A sync run's lines, the read-ahead thread's included, carry its run id."""
    cfg = loaded(store_url)
    upsert_contacts(engine, [opted_in("A", "0151 23456789")], T0)
    deliver(engine, cfg, p.message("4915123456789", T0, "STOP"))
    report = run_once(cfg, engine=engine, clock=clock, connector=ChattyLedger(engine))
    run_lines = [line for line in lines(captured) if line["event"] in ("crm.page", "sync.finished")]
    assert {line["event"] for line in run_lines} == {"crm.page", "sync.finished"}
    assert all(line["run_id"] == report.run_id for line in run_lines)
    assert "4915123456789" not in captured.getvalue()

"""One log format for all of waconsent: an event name plus fields, one line each.

Every part logs through `event(logger, "webhook.delivery", stored=3, ...)`; the CLI, the
receiver, `serve` and the scheduler install the same handler (`configure`), which writes
one JSON object per line when standard error is not a terminal and `LEVEL logger: event
key=value` when it is. Fields bound with `bound(run_id=...)` appear on every line logged
inside the block (in the thread of the block, and in worker threads started through
`in_context`), so every line of a sync run carries its run id.

What goes in: counts, locations, ids, masked numbers (`phones.mask`); never a body, a
token, a signature or an unmasked number. An exception attached to a record is reduced to
its type: its message may quote data.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from types import MappingProxyType
from typing import IO, Any, TypeVar

T = TypeVar("T")

_NOTHING_BOUND: Mapping[str, Any] = MappingProxyType({})
_CONTEXT: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "waconsent_log_context", default=_NOTHING_BOUND
)
_FIELDS = "waconsent_fields"
#: attributes every LogRecord has; anything else on a record came in through `extra=`
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log the event `name` with its fields (and the bound context)."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={_FIELDS: fields})


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Add `fields` to every line logged inside the block."""
    token = _CONTEXT.set({**_CONTEXT.get(), **fields})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def in_context(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` wrapped to run in a copy of the caller's bound fields, for a worker thread
    (threads do not inherit context variables)."""
    context = contextvars.copy_context()

    def run(*args: Any, **kwargs: Any) -> T:
        return context.copy().run(fn, *args, **kwargs)

    return run


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """A record as one flat mapping: event, bound context, its fields, `extra=` values."""
    found: dict[str, Any] = {"event": record.getMessage()}
    found.update(getattr(record, "waconsent_context", None) or {})
    found.update(
        {
            key: value
            for key, value in vars(record).items()
            if key not in _STANDARD and key not in (_FIELDS, "waconsent_context")
        }
    )
    found.update(getattr(record, _FIELDS, None) or {})
    if record.exc_info and record.exc_info[0] is not None:
        found["error"] = record.exc_info[0].__name__
    return found


class _ContextFilter(logging.Filter):
    """Attaches the bound fields when the record is made (in the logging thread)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "waconsent_context"):
            record.waconsent_context = dict(_CONTEXT.get())
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, whatever the message or the fields hold."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        line.update(fields_of(record))
        # ASCII only: a raw U+2028 or U+0085 would end the line for some log shippers
        return json.dumps(line, default=str, ensure_ascii=True)


class TextFormatter(logging.Formatter):
    """For a person at a terminal: `WARNING waconsent.web: webhook.forged bytes=120`."""

    def format(self, record: logging.LogRecord) -> str:
        fields = fields_of(record)
        name = fields.pop("event")
        shown = " ".join(f"{key}={value}" for key, value in fields.items())
        return f"{record.levelname} {record.name}: {name}" + (f" {shown}" if shown else "")


_HANDLER_NAME = "waconsent"


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to the given stream, or to whatever `sys.stderr` is at the moment (a test
    runner swaps it); JSON lines unless the stream is a terminal or `json_lines` says."""

    def __init__(self, stream: IO[str] | None, json_lines: bool | None) -> None:
        super().__init__(stream or sys.stderr)
        self._fixed = stream
        self._json_lines = json_lines
        self.set_name(_HANDLER_NAME)
        self.addFilter(_ContextFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = self._fixed or sys.stderr
        self.formatter = _JSON if self.writes_json() else _TEXT
        super().emit(record)

    def writes_json(self) -> bool:
        stream = self._fixed or sys.stderr
        return (
            self._json_lines
            if self._json_lines is not None
            else not getattr(stream, "isatty", lambda: False)()
        )


_JSON, _TEXT = JsonFormatter(), TextFormatter()


def writes_json() -> bool:
    """Whether the installed handler writes JSON lines now (issue 17: a progress bar would
    break them); True without a handler, where nothing decides yet."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _Handler):
            return handler.writes_json()
    return True


def configure(
    level: int = logging.WARNING, *, stream: IO[str] | None = None, json_lines: bool | None = None
) -> None:
    """The one handler, on the root logger so that uvicorn's and APScheduler's lines come
    out in the same format; `level` is waconsent's own. Idempotent: a second call only
    sets the level."""
    logging.getLogger("waconsent").setLevel(level)
    root = logging.getLogger()
    if not any(h.get_name() == _HANDLER_NAME for h in root.handlers):
        root.addHandler(_Handler(stream, json_lines))

"""`waconsent audience check`: may we message these numbers now, and why (issue 16)."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections import Counter, deque
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import IO, Any

import click

from waconsent.cli.base import EXIT_USAGE, Failed, config_of, engine_of, err, guarded, main, now
from waconsent.consent_check import BATCH, ConsentChecker, check_batches, default_workers
from waconsent.csvfiles import LINE_END, csv_cell, csv_value
from waconsent.domain import jsonable
from waconsent.errors import InputError
from waconsent.store import snapshot as snapshot_store
from waconsent.store.engine import reading
from waconsent.sync.audience import MARKETING, PURPOSES, Answer

ADDED = ("may_send", "reason", "session_open_until", "records")


@main.group()
def audience() -> None:
    """Campaign lists: whom may we message now."""


def _open_text(name: str) -> IO[str]:
    """The file (or standard input for '-') as text: UTF-8, a BOM dropped, a byte that is
    not UTF-8 kept (as a lone surrogate) so that it costs only its own row."""
    raw = sys.stdin.buffer if name == "-" else Path(name).open("rb")  # noqa: SIM115
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _output() -> io.TextIOWrapper:
    return io.TextIOWrapper(
        sys.stdout.buffer,
        encoding="utf-8",
        errors="surrogateescape",
        newline="",
        write_through=False,
    )


@audience.command(name="check")
@click.argument("file", type=click.Path(allow_dash=True, dir_okay=False))
@click.option(
    "--column",
    default="phone",
    show_default=True,
    help="The column that holds the number (or WhatsApp user id).",
)
@click.option(
    "--purpose",
    type=click.Choice(PURPOSES),
    default=MARKETING,
    show_default=True,
    help="marketing: opted in with complete proof, not revoked since; "
    "service: a customer service window is open now.",
)
@click.option("--only-allowed", is_flag=True, help="Write only the rows that may be sent.")
@click.option(
    "--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True
)
@click.pass_context
@guarded
def check(
    ctx: click.Context, file: str, column: str, purpose: str, only_allowed: bool, fmt: str
) -> None:
    """For each row of a campaign list (CSV; - for stdin): may we message the number now?
    Every input column is kept; may_send, reason, session_open_until and records are added."""
    loaded = config_of(ctx)
    engine = engine_of(loaded)
    settings = loaded.settings
    checker = ConsentChecker(engine, settings.crm_name, settings.mapping.default_region)
    counts: Counter[str] = Counter()
    skipped: list[str] = []
    allowed = 0
    try:
        _warn_if_incomplete(checker)
        try:
            source = _open_text(file)
        except OSError as exc:
            raise InputError(f"{file}: cannot read: {exc.strerror or type(exc).__name__}") from None
        with source:
            reader = csv.reader(source)
            header = next(reader, None)
            if header is None:
                raise InputError(f"{file}: empty file, expected a header row with {column!r}")
            if column not in header:
                raise InputError(
                    f"{file}: no column {column!r} in the header (columns: "
                    f"{', '.join(header) or 'none'}); choose one with --column"
                )
            index = header.index(column)
            sink = _output()
            writer = _CsvOut(sink, header) if fmt == "csv" else _JsonOut(sink, header)
            readable = _readable_rows(reader, file, skipped)
            for rows, answers in _batches(readable, index, checker, settings.store.url, purpose):
                for row, answer in zip(rows, answers, strict=True):
                    counts[answer.reason] += 1
                    allowed += answer.may_send
                    if answer.may_send or not only_allowed:
                        writer.row(row, answer)
            writer.close()
            sink.flush()
            sink.detach()
    finally:
        engine.dispose()
    total = sum(counts.values())
    err.print(
        f"{total} numbers for {purpose}: {allowed} may be sent"
        + "".join(f", {n} {reason}" for reason, n in sorted(counts.items()))
        + (f"; {len(skipped)} unreadable rows skipped" if skipped else "")
    )
    if skipped:
        raise Failed(EXIT_USAGE)


def _readable_rows(
    reader: Iterator[list[str]], file: str, skipped: list[str]
) -> Iterator[list[str]]:
    """Every row the csv module can read; one it cannot (a cell over its size limit, say)
    is skipped and named by its line on standard error, and never costs its neighbours."""
    line_num = getattr(reader, "line_num", 0)
    while True:
        start = line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            where = f"{file}:{start}"
            skipped.append(where)
            err.print(f"skipped: {where}: not readable as CSV ({exc})")
            continue
        finally:
            line_num = getattr(reader, "line_num", line_num)
        yield row


def _warn_if_incomplete(checker: ConsentChecker) -> None:
    with reading(checker.engine) as connection:
        held, indexed = snapshot_store.coverage(connection, checker.crm)
    if held < indexed:
        err.print(
            f"warning: the consent snapshot holds {held} of the {indexed} records the "
            "ledger knows; run `waconsent sync --full` once so that every record is in "
            "it (the others answer no_record)"
        )


def _batches(
    reader: Iterator[list[str]], index: int, checker: ConsentChecker, url: str, purpose: str
) -> Iterator[tuple[list[list[str]], list[Answer]]]:
    """Rows a batch at a time, so memory stays flat however long the list is; a long list
    is checked in worker processes (`consent_check.check_batches`), answers in order."""
    waiting: deque[list[list[str]]] = deque()

    def values() -> Iterator[list[str]]:
        while rows := list(islice(reader, BATCH)):
            waiting.append(rows)
            yield [csv_value(row[index]) if index < len(row) else "" for row in rows]

    for answers in check_batches(checker, url, values(), purpose, now, default_workers()):
        yield waiting.popleft(), answers


def _until(answer: Answer) -> str:
    return str(jsonable(answer.session_open_until)) if answer.session_open_until else ""


class _CsvOut:
    def __init__(self, sink: IO[str], header: list[str]) -> None:
        self.width = len(header)
        self.writer = csv.writer(sink, lineterminator=LINE_END)
        self.writer.writerow([csv_cell(name) for name in (*header, *ADDED)])

    def row(self, row: list[str], answer: Answer) -> None:
        cells = (row + [""] * self.width)[: self.width]
        self.writer.writerow(
            [csv_cell(cell) for cell in cells]
            + [
                "true" if answer.may_send else "false",
                answer.reason,
                _until(answer),
                csv_cell(";".join(answer.records)),
            ]
            + [csv_cell(c) for c in row[self.width :]]
        )

    def close(self) -> None:
        pass


class _JsonOut:
    """A JSON list of objects, written as it goes."""

    def __init__(self, sink: IO[str], header: list[str]) -> None:
        self.sink = sink
        self.header = header
        self.first = True
        sink.write("[")

    def row(self, row: list[str], answer: Answer) -> None:
        item: dict[str, Any] = {
            name: row[i] if i < len(row) else "" for i, name in enumerate(self.header)
        }
        item.update(
            may_send=answer.may_send,
            reason=answer.reason,
            session_open_until=jsonable(answer.session_open_until),
            records=list(answer.records),
        )
        self.sink.write(("\n" if self.first else ",\n") + json.dumps(item, ensure_ascii=False))
        self.first = False

    def close(self) -> None:
        self.sink.write("\n]\n" if not self.first else "]\n")

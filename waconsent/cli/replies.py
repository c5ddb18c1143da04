"""`waconsent replies send` and `replies list`: the confirmation replies to START and STOP
typed in the chat, for setups without `serve` (which sends them itself within a second)."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.table import Table

from waconsent.cli.base import (
    EXIT_CANNOT_PROCEED,
    EXIT_WRITES_FAILED,
    Failed,
    config_of,
    engine_of,
    fail,
    guarded,
    main,
    now,
    out,
)
from waconsent.connectors.whatsapp_send import CREDENTIALS_FIX
from waconsent.domain import jsonable
from waconsent.phones import mask
from waconsent.replies.rules import ReplyState
from waconsent.replies.sending import PassSummary, send_due, sender_from_config
from waconsent.store import replies as reply_store
from waconsent.store.engine import reading
from waconsent.store.runs import node_identity


@main.group()
def replies() -> None:
    """Confirmation replies to START and STOP typed in the chat."""


@replies.command(name="send")
@click.pass_context
@guarded
def send(ctx: click.Context) -> None:
    """Send the queued replies that are due (exit 2 if some were put back for later)."""
    loaded = config_of(ctx)
    sender = sender_from_config(loaded)
    engine = engine_of(loaded)
    total = PassSummary()
    holder = node_identity()
    try:
        while True:
            summary = send_due(engine, sender, holder, now)
            for name in ("looked_at", "sent", "failed", "deferred", "no_answer", "marked_unknown"):
                setattr(total, name, getattr(total, name) + getattr(summary, name))
            total.stopped = summary.stopped
            if not summary.more:
                break
    finally:
        sender.close()
        engine.dispose()
    out.print(
        f"{total.sent} sent, {total.failed} failed, {total.deferred} put back for later, "
        f"{total.no_answer} without an answer (left for their statuses), "
        f"{total.marked_unknown} marked unknown"
    )
    if total.stopped:
        raise fail(f"sending stopped: {total.stopped}; {CREDENTIALS_FIX}", EXIT_CANNOT_PROCEED)
    if total.deferred:
        raise Failed(EXIT_WRITES_FAILED)


@replies.command(name="list")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice([state.value for state in ReplyState]),
    help="Only replies in this state (repeatable).",
)
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True)
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
@click.pass_context
@guarded
def list_(ctx: click.Context, states: tuple[str, ...], limit: int, fmt: str) -> None:
    """Queued, sent and failed replies, newest first (numbers masked)."""
    engine = engine_of(config_of(ctx))
    try:
        with reading(engine) as connection:
            rows = [_shown(row) for row in reply_store.listing(connection, states, limit)]
            totals = reply_store.counts(connection)
    finally:
        engine.dispose()
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    summary = ", ".join(f"{count} {state}" for state, count in totals.items() if count)
    table = Table(title=f"replies, newest first ({summary or 'none'})")
    for column in ("queued", "state", "keyword", "to", "trigger", "reply", "why"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["queued_at"],
            row["state"],
            row["keyword"] or "",
            row["to"] or "",
            row["trigger_id"],
            row["reply_id"] or "",
            row["error"] or "",
        )
    out.print(table)


def _shown(row: Any) -> dict[str, Any]:
    to = mask(row.wa_id) if row.wa_id else row.user_id
    return {
        "queued_at": jsonable(row.queued_at),
        "state": row.state,
        "signal": row.signal,
        "keyword": row.keyword,
        "to": to,
        "trigger_id": row.trigger_id,
        "reply_id": row.reply_id,
        "text_sha256": row.text_sha256,
        "sent_at": jsonable(row.sent_at),
        "delivered_at": jsonable(row.delivered_at),
        "read_at": jsonable(row.read_at),
        "error_code": row.error_code,
        "error": row.error,
        "attempts": row.rounds,
    }

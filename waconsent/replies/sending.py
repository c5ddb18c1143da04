"""One pass over the reply queue: the shell around the decisions (`rules`), the queue
(`store.replies`) and the Cloud API (`connectors.whatsapp_send`). `waconsent replies
send` runs one pass; `waconsent serve` runs passes in a thread (`worker`).

The protocol for each row, which keeps a reply from ever going out twice:

1. claim it (queued -> sending, with a lease) and commit, before any request leaves;
2. send it; the sender retries only answers that say nothing was sent;
3. record the answer in the row's own transaction: accepted (with the reply's id, and
   its evidence), refused for good (failed), refused for now (queued for a later round),
   or no answer at all (left "sending": its own statuses settle it, or it becomes
   "unknown" after an hour; it is never sent again).

A token Meta rejects ends the pass at once, the claimed row goes back untouched: no other
reply can be sent until the token is replaced.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Engine

from waconsent import logs
from waconsent.config.loading import LoadedConfig
from waconsent.connectors.whatsapp_send import CREDENTIALS_FIX, CloudApiSender, SendResult, Sent
from waconsent.errors import ConfigError
from waconsent.phones import mask
from waconsent.replies.rules import DueAction, ReplyState, callback_data_for, due_action
from waconsent.store import reply_claims
from waconsent.store.engine import reading
from waconsent.store.replies import Observation, ReplyRow
from waconsent.store.reply_claims import DueRow

log = logging.getLogger("waconsent.replies")
ACCESS_VARIABLE = "WHATSAPP_ACCESS_TOKEN"
PASS_LIMIT = 200  # rows looked at per pass; a longer queue takes several passes
#: people answered at once in a pass: at ~100 ms a round trip, about Meta's default of
#: 80 messages a second per business number
CONCURRENCY = 8


class TextSender(Protocol):
    def send_text(
        self,
        *,
        wa_id: str | None,
        user_id: str | None,
        text: str,
        reply_to: str,
        callback_data: str,
    ) -> SendResult: ...


@dataclass
class PassSummary:
    """What one pass did; `stopped` holds why sending stopped (a rejected token)."""

    looked_at: int = 0
    sent: int = 0
    failed: int = 0
    deferred: int = 0
    no_answer: int = 0
    marked_unknown: int = 0
    stopped: str | None = None

    @property
    def more(self) -> bool:
        """Whether the queue may hold more rows that are due now."""
        return self.looked_at >= PASS_LIMIT and self.stopped is None


def sender_from_config(config: LoadedConfig) -> CloudApiSender:
    """The Cloud API sender the configuration names; a ConfigError says what is missing."""
    whatsapp = config.settings.whatsapp
    if not config.settings.replies.enabled:
        raise ConfigError(
            [
                "replies.enabled: replies are off; set [replies] enabled = true "
                "to send confirmations of START and STOP"
            ]
        )
    token = config.secrets.require(
        ACCESS_VARIABLE,
        "sending WhatsApp replies (a system user token with whatsapp_business_messaging)",
    )
    assert whatsapp.phone_number_id is not None  # the configuration's cross-checks ensure it
    return CloudApiSender(
        graph_url=whatsapp.graph_url,
        api_version=whatsapp.graph_api_version,
        phone_number_id=whatsapp.phone_number_id,
        access_token=token,
    )


def send_due(
    engine: Engine, sender: TextSender, holder: str, clock: Callable[[], datetime]
) -> PassSummary:
    """Send what is due now (see the module's docstring for the protocol).

    Up to `CONCURRENCY` people are answered at once: each request waits on Meta for a
    round trip, and one at a time would make a burst of STOPs wait in line (Meta takes 80
    messages a second per number by default). One person's replies go one after the other,
    in the order they wrote, which also keeps within Meta's pair rate limit.
    """
    summary = PassSummary(marked_unknown=reply_claims.mark_unknown(engine, clock()))
    if summary.marked_unknown:
        logs.event(log, "replies.unknown", logging.WARNING, count=summary.marked_unknown)
    with reading(engine) as connection:
        due = reply_claims.due(connection, clock(), PASS_LIMIT)
    summary.looked_at = len(due)
    people: dict[str, list[DueRow]] = {}
    for row in due:
        people.setdefault(row.recipient, []).append(row)
    one_pass = _Pass(engine, sender, holder, clock, summary)
    if len(people) <= 1:
        for rows in people.values():
            one_pass.answer(rows)
        return summary
    with ThreadPoolExecutor(
        max_workers=min(CONCURRENCY, len(people)), thread_name_prefix="reply"
    ) as pool:
        list(pool.map(logs.in_context(one_pass.answer), people.values()))
    return summary


class _Pass:
    """The state one pass shares between its threads: the summary, the stop flag, and on
    SQLite one lock for writes (SQLite has one writer; threads queued on a lock are woken
    the moment it is free, while its busy handler would make them sleep in steps)."""

    def __init__(
        self,
        engine: Engine,
        sender: TextSender,
        holder: str,
        clock: Callable[[], datetime],
        summary: PassSummary,
    ) -> None:
        self.engine, self.sender, self.holder, self.clock = engine, sender, holder, clock
        self.summary = summary
        self.counting = threading.Lock()
        self.writing: AbstractContextManager[Any] = (
            threading.Lock() if engine.dialect.name == "sqlite" else nullcontext()
        )

    def answer(self, rows: list[DueRow]) -> None:
        """One person's due replies, in order; none once sending has stopped."""
        for due in rows:
            if self.summary.stopped:
                return
            action = due_action(due.triggered_at, due.rounds, self.clock())
            if action is not DueAction.SEND:
                with self.writing:
                    _close(self.engine, due.id, action, due.rounds, self.clock())
                self.count("failed")
                continue
            with self.writing:
                row = reply_claims.claim(self.engine, due.id, self.holder, self.clock())
            if row is None:
                continue  # another sender claimed it first
            result = self.sender.send_text(
                wa_id=row.wa_id,
                user_id=row.user_id,
                text=row.text,
                reply_to=row.trigger_id,
                callback_data=callback_data_for(row.trigger_id),
            )
            with self.writing:
                outcome = _record(self.engine, row, self.holder, result, self.clock())
            self.count(
                outcome,
                stopped=f"{result.reason} (error {result.code})" if outcome == "stopped" else None,
            )

    def count(self, outcome: str, stopped: str | None = None) -> None:
        with self.counting:
            if outcome == "stopped":
                self.summary.stopped = self.summary.stopped or stopped
            else:
                setattr(self.summary, outcome, getattr(self.summary, outcome) + 1)


def _close(engine: Engine, row_id: int, action: DueAction, rounds: int, now: datetime) -> None:
    if action is DueAction.EXPIRE:
        code, why = "window_closed", "the 24-hour service window closed before it was sent"
    else:
        code, why = "gave_up", f"refused {rounds} times for reasons that may heal; gave up"
    reply_claims.close_unsent(engine, row_id, code, why, now)
    logs.event(log, "replies.not_sent", logging.WARNING, reply=row_id, code=code)


def _record(engine: Engine, row: ReplyRow, holder: str, result: SendResult, now: datetime) -> str:
    """Store Meta's answer; returns the summary's name for it."""
    fields = {
        "trigger": row.trigger_id,
        "to": _who(row),
        "code": result.code,
        "trace": result.trace,
    }
    if result.outcome is Sent.ACCEPTED:
        reply_claims.record(
            engine, row.id, Observation(ReplyState.SENT, now, reply_id=result.reply_id), now
        )
        logs.event(log, "replies.sent", trigger=row.trigger_id, reply=result.reply_id, to=_who(row))
        return "sent"
    if result.outcome is Sent.REFUSED:
        reply_claims.record(
            engine,
            row.id,
            Observation(ReplyState.FAILED, now, error_code=result.code, error=result.reason),
            now,
        )
        logs.event(log, "replies.failed", logging.WARNING, reason=result.reason, **fields)
        return "failed"
    if result.outcome is Sent.RETRY_LATER:
        reply_claims.put_back(
            engine, row, holder, now, error_code=result.code or "retry", error=result.reason
        )
        logs.event(log, "replies.deferred", logging.WARNING, reason=result.reason, **fields)
        return "deferred"
    if result.outcome is Sent.NO_ANSWER:
        reply_claims.note_no_answer(engine, row.id, holder, result.reason)
        logs.event(log, "replies.no_answer", logging.WARNING, reason=result.reason, **fields)
        return "no_answer"
    # the token: nothing was sent, and nothing can be until it is replaced
    reply_claims.put_back(
        engine,
        row,
        holder,
        now,
        error_code=result.code or "token",
        error=result.reason,
        counts=False,
    )
    logs.event(
        log,
        "replies.stopped",
        logging.ERROR,
        reason=f"{result.reason} (error {result.code})",
        fix=CREDENTIALS_FIX,
        trace=result.trace,
    )
    return "stopped"


def _who(row: ReplyRow) -> str | None:
    """The recipient for a log line: a masked number, else the user id's country prefix."""
    if row.wa_id:
        return mask(row.wa_id)
    return f"{row.user_id.split('.', 1)[0]}.***" if row.user_id else None

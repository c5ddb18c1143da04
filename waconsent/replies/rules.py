"""The reply channel's decisions, without side effects: which event gets a reply and with
which text, how a reply row moves between states, and when a queued row is sent, retried
or given up.

Pure like `sync.rules`: plain data and `now` in, values out; no clock, store or HTTP.

A reply row's states, and what moves it (the store applies these, `advance` orders them)::

    queued --claim--> sending --Meta's answer: a message id--> sent --status--> delivered --> read
       ^                 |  \\--a refusal that cannot heal (131047, 131026, ...)--> failed
       |                 |   \\--refused, may heal (131056, 130429, 5xx)--> queued (later)
       |                 \\--no answer known (crash, timeout): never resent; its own statuses
       |                     settle it; none within UNKNOWN_AFTER --> unknown (still settled
       |                     by a status arriving later)
       \\-- (only the holder's own refusal puts a row back; nothing else moves backwards)

A status of the reply itself (found by its `biz_opaque_callback_data`) moves any row
forwards: sent, delivered, read, or failed (an asynchronous failure, e.g. 131047 reported
by webhook). Statuses arrive out of order, so states are ranked and a row only climbs.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from waconsent.domain import Event, EventKind, Signal
from waconsent.keywords import normalize_text

#: `biz_opaque_callback_data` of every reply: this prefix and the trigger's message id.
#: Meta returns it on each status of the reply (at most 512 bytes), so a reply whose
#: send was never recorded is still recognised by its statuses.
CALLBACK_PREFIX = "waconsent:reply:"
CALLBACK_LIMIT = 512
#: Meta lets a business answer freely for 24 hours after the user's message
SERVICE_WINDOW = timedelta(hours=24)
#: a row left "sending" (its sender died, or Meta's answer was lost) waits this long for a
#: status of the reply before it is marked unknown; it is never sent again
UNKNOWN_AFTER = timedelta(hours=1)
#: how long a claim holds a row while its sender works (the retry policy's budget fits)
LEASE = timedelta(minutes=10)
#: a refusal that may heal (rate limits, Meta unwell) puts the row back this many times
MAX_ROUNDS = 5
FIRST_RETRY = timedelta(minutes=1)
LONGEST_RETRY = timedelta(hours=1)


class ReplyState(enum.StrEnum):
    QUEUED = "queued"
    SENDING = "sending"
    UNKNOWN = "unknown"
    SENT = "sent"
    FAILED = "failed"
    DELIVERED = "delivered"
    READ = "read"


# A row only climbs. A failure outranks "sent" (Meta may accept a message, then report that
# it could not deliver it) but not "delivered": a delivered reply was delivered, whatever a
# late or duplicate status says.
_RANK = {state: rank for rank, state in enumerate(ReplyState)}
_STATUS_STATES = {
    "sent": ReplyState.SENT,
    "delivered": ReplyState.DELIVERED,
    "read": ReplyState.READ,
    "failed": ReplyState.FAILED,
}


def advance(current: ReplyState, new: ReplyState) -> ReplyState:
    """The state after an observation: the higher-ranked of the two."""
    return new if _RANK[new] > _RANK[current] else current


def state_of_status(status: str | None) -> ReplyState | None:
    """The reply state a webhook status shows (None for one that shows nothing, such as
    `played`, `deleted` or an unknown value)."""
    return _STATUS_STATES.get(status or "")


def callback_data_for(trigger_id: str) -> str:
    return f"{CALLBACK_PREFIX}{trigger_id}"


def trigger_of(callback_data: str | None) -> str | None:
    """The trigger's message id named by a status's callback data, if it is one of ours."""
    if callback_data and callback_data.startswith(CALLBACK_PREFIX):
        return callback_data[len(CALLBACK_PREFIX) :] or None
    return None


def is_reply_status(event: Event) -> bool:
    return event.kind is EventKind.STATUS and trigger_of(event.callback_data) is not None


def sha256_of(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class ReplyPolicy:
    """The configured texts (placeholders already filled in) and the age limit.
    `by_keyword` is keyed by the normalized keyword."""

    opt_in: str
    opt_out: str
    by_keyword: Mapping[str, str]
    max_age: timedelta

    def text_for(self, signal: Signal, keyword: str | None) -> str:
        if keyword is not None:
            own = self.by_keyword.get(normalize_text(keyword))
            if own is not None:
                return own
        return self.opt_in if signal is Signal.OPT_IN else self.opt_out


@dataclass(frozen=True, slots=True)
class PlannedReply:
    """A confirmation to queue: to whom, in reply to which message, saying what."""

    trigger_id: str
    trigger_key: str
    wa_id: str | None
    user_id: str | None
    signal: Signal
    keyword: str | None
    text: str
    triggered_at: datetime

    @property
    def text_sha256(self) -> str:
        return sha256_of(self.text)


def plan_reply(event: Event, policy: ReplyPolicy, now: datetime) -> PlannedReply | None:
    """The reply an event gets, or None.

    Only an opt-in or opt-out the user sent in the chat is answered: a keyword they typed
    or tapped, or Meta's Stop promotions button (every such event carries its keyword).
    Never a `user_preferences` change, a `system` message or a 131050 status: the user
    wrote nothing, so no service window is open and nobody asked. Never an event older
    than `max_age`: an archive import or a late redelivery answers nobody.
    """
    if (
        event.kind is not EventKind.MESSAGE
        or event.message_type == "system"
        or event.signal not in (Signal.OPT_IN, Signal.OPT_OUT)
        or not event.keyword
        or not event.message_id
        or not (event.wa_id or event.user_id)
    ):
        return None
    if now - event.occurred_at > policy.max_age:
        return None
    if len(callback_data_for(event.message_id).encode()) > CALLBACK_LIMIT:
        return None  # no real message id is this long; its statuses could not name it
    return PlannedReply(
        trigger_id=event.message_id,
        trigger_key=event.key,
        wa_id=event.wa_id,
        user_id=event.user_id,
        signal=event.signal,
        keyword=event.keyword,
        text=policy.text_for(event.signal, event.keyword),
        triggered_at=event.occurred_at,
    )


class DueAction(enum.Enum):
    SEND = "send"
    EXPIRE = "expire"  # the service window closed before it could be sent
    GIVE_UP = "give_up"  # refused MAX_ROUNDS times


def due_action(triggered_at: datetime, rounds: int, now: datetime) -> DueAction:
    """What to do with a queued row whose time has come. A row whose service window has
    closed is not sent: Meta would refuse it (131047), and the answer would come a day
    late."""
    if now >= triggered_at + SERVICE_WINDOW:
        return DueAction.EXPIRE
    if rounds >= MAX_ROUNDS:
        return DueAction.GIVE_UP
    return DueAction.SEND


def retry_at(rounds: int, now: datetime) -> datetime:
    """When a row refused `rounds` times is tried again: 1, 2, 4, ... minutes, at most an
    hour (the retry policy already waited within each round)."""
    doublings = min(max(0, rounds - 1), 10)  # 2**10 minutes is past the cap already
    delay: timedelta = FIRST_RETRY * (2**doublings)
    return now + min(delay, LONGEST_RETRY)

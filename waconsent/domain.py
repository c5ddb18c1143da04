"""Plain data shared by every layer: events, consent state, decisions, write results.

Everything here is a frozen dataclass or an enum so the rules can be pure
functions over values. All datetimes are timezone-aware UTC.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

FieldValue = str | bool | datetime | None


class EventKind(enum.StrEnum):
    MESSAGE = "message"
    STATUS = "status"
    PREFERENCE = "preference"
    ID_CHANGE = "id_change"  # the `user_id_update` webhook field


class Signal(enum.StrEnum):
    """What an event means for consent; decided at parse time so bodies need not be kept."""

    NONE = "none"
    OPT_IN = "opt_in"
    OPT_OUT = "opt_out"
    RESUME = "resume"
    NUMBER_CHANGED = "number_changed"
    USER_ID_CHANGED = "user_id_changed"


CONSENT_SIGNALS = frozenset({Signal.OPT_IN, Signal.OPT_OUT})

# Logical field names of [mapping.fields]; the rules speak only these.
OPT_IN = "opt_in"
OPT_IN_DATE = "opt_in_date"
OPT_IN_IP = "opt_in_ip"
OPT_IN_SOURCE = "opt_in_source"
OPT_OUT_DATE = "opt_out_date"
LAST_INBOUND = "last_inbound"
SESSION_EXPIRES = "session_expires"
PROOF_MISSING = "proof_missing"
WHATSAPP_USER_ID = "whatsapp_user_id"

LOGICAL_FIELDS: tuple[str, ...] = (
    OPT_IN,
    OPT_IN_DATE,
    OPT_IN_IP,
    OPT_IN_SOURCE,
    OPT_OUT_DATE,
    LAST_INBOUND,
    SESSION_EXPIRES,
    PROOF_MISSING,
    WHATSAPP_USER_ID,
)
DATETIME_FIELDS = frozenset({OPT_IN_DATE, OPT_OUT_DATE, LAST_INBOUND, SESSION_EXPIRES})
BOOLEAN_FIELDS = frozenset({OPT_IN, PROOF_MISSING})
# What a consent decision depends on: a queued write is stale once any of these changed.
CONSENT_BASIS: tuple[str, ...] = (OPT_IN, OPT_IN_DATE, OPT_OUT_DATE)
# Without these the rules cannot decide or record a revocation.
REQUIRED_FIELDS: tuple[str, ...] = (OPT_IN, OPT_IN_DATE, OPT_OUT_DATE)


def utc_from_unix(seconds: int | str) -> datetime:
    return datetime.fromtimestamp(int(seconds), tz=UTC)


def error_codes_text(codes: Sequence[int]) -> str | None:
    """Status error codes as the store keeps them: one comma-separated text."""
    return ",".join(str(code) for code in codes) or None


def to_second(moment: datetime) -> datetime:
    """CRMs keep datetimes to the second; compare at that precision or every run sees a change."""
    if moment.microsecond == 0 and moment.tzinfo is UTC:
        return moment  # already whole UTC seconds: most CRM values (the rules ask for several)
    return moment.astimezone(UTC).replace(microsecond=0)


@dataclass(frozen=True, slots=True)
class Event:
    """One normalized WhatsApp update. `key` is its deduplication identity."""

    key: str
    kind: EventKind
    occurred_at: datetime
    wa_id: str | None = None
    user_id: str | None = None
    message_id: str | None = None
    message_type: str | None = None
    status: str | None = None
    error_codes: tuple[int, ...] = ()
    signal: Signal = Signal.NONE
    keyword: str | None = None
    opens_session: bool = False
    window_expires_at: datetime | None = None
    referral_source_id: str | None = None
    new_wa_id: str | None = None
    detail: str | None = None
    #: a changed business-scoped user id: `user_id` is the previous one (when known), this
    #: the new one (user_changed_user_id, user_id_update, user_changed_number)
    new_user_id: str | None = None
    #: parse-only (no column; issue 14): a status's `biz_opaque_callback_data`, which names
    #: the trigger of one of waconsent's own replies, so the status settles that reply
    callback_data: str | None = None
    #: issue 15: a website opt-in confirmed by this message: the form's client IP and
    #: `form:<form id>:token:<token hash prefix>` (stored); the token as typed is parse-only,
    #: never stored or shown (only its hash is kept, in the request)
    opt_in_ip: str | None = None
    opt_in_form: str | None = None
    optin_token: str | None = field(default=None, compare=False, repr=False)

    @property
    def worth_a_row(self) -> bool:
        """Whether the rules can use the event, so the store keeps it. Everything a user
        did is kept, and a status that carries a consent signal (131050), an error code or
        a free entry point window; the plain `sent` / `delivered` / `read` of the
        business's own messages change no field, and a campaign of a million messages
        would otherwise add three million rows that no rule ever reads."""
        return (
            self.kind is not EventKind.STATUS
            or self.signal is not Signal.NONE
            or bool(self.error_codes)
            or self.window_expires_at is not None
        )

    @property
    def match_user_id(self) -> str | None:
        """The user id the event is found by: its sender's; for an announced change whose
        previous id Meta did not name, the new one. (A number change keeps only its old id,
        so it never joins the old number to the new id.)"""
        if self.user_id is None and self.signal is Signal.USER_ID_CHANGED:
            return self.new_user_id
        return self.user_id

    @property
    def evidence(self) -> str:
        """The proof string: `whatsapp:keyword:<KEYWORD>:<message id>` (SPEC 5.4) or the signal;
        for a website opt-in `website:form:<form>:token:<hash prefix>:<message id>`."""
        if self.opt_in_form and self.message_id:
            return f"website:{self.opt_in_form}:{self.message_id}"
        if self.keyword and self.message_id:
            return f"whatsapp:keyword:{self.keyword}:{self.message_id}"
        return self.detail or self.signal.value


@dataclass(frozen=True, slots=True)
class Activity:
    """What the rules need of the events matched to a record, and no more.

    Every consent signal (opt-in, opt-out) is kept whole: each can win or be reported as a
    conflict. Of everything else only three facts matter: the newest user message (the
    24-hour window), the latest free-entry-point expiry, and the newest business-scoped user
    id. A store can compute this per number with SQL aggregates, so a full run costs one row
    per number however long its chat history has grown.
    """

    consent: tuple[Event, ...] = ()
    last_inbound: datetime | None = None
    window_expires_at: datetime | None = None
    #: (when, user id) of the newest event carrying a user id; at one time, the greatest id
    newest_user_id: tuple[datetime, str] | None = None
    event_count: int = 0  # how many events stand behind it (the report's events_considered)
    #: announced changes of the business-scoped user id: (when, previous id, new id); the
    #: previous id is None where Meta did not name it
    user_id_changes: tuple[UserIdChange, ...] = ()

    @classmethod
    def of(cls, events: Iterable[Event]) -> Activity:
        """The reduction itself; a store's aggregate query must answer exactly this.
        An event is its key: one delivered twice counts once."""
        unique = {event.key: event for event in events}
        consent: list[Event] = []
        changes: list[UserIdChange] = []
        last_inbound = window_expires_at = None
        newest_user_id: tuple[datetime, str] | None = None
        for event in unique.values():
            if event.signal in CONSENT_SIGNALS:
                consent.append(event)
            change = UserIdChange.of(event)
            if change is not None:
                changes.append(change)
            if event.opens_session and (last_inbound is None or event.occurred_at > last_inbound):
                last_inbound = event.occurred_at
            expires = event.window_expires_at
            if expires is not None and (window_expires_at is None or expires > window_expires_at):
                window_expires_at = expires
            if event.user_id and (
                newest_user_id is None or (event.occurred_at, event.user_id) > newest_user_id
            ):
                newest_user_id = (event.occurred_at, event.user_id)
        return cls(
            tuple(sorted(consent, key=lambda e: e.key)),
            last_inbound,
            window_expires_at,
            newest_user_id,
            len(unique),
            UserIdChange.in_order(changes),
        )

    @classmethod
    def merged(cls, parts: Sequence[Activity]) -> Activity:
        """The activity of disjoint sets of events (a record matched by several keys)."""
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return NO_ACTIVITY
        consent = {event.key: event for part in parts for event in part.consent}
        return cls(
            tuple(consent[key] for key in sorted(consent)),
            _newest(p.last_inbound for p in parts),
            _newest(p.window_expires_at for p in parts),
            max((p.newest_user_id for p in parts if p.newest_user_id), default=None),
            sum(p.event_count for p in parts),
            UserIdChange.in_order(c for part in parts for c in part.user_id_changes),
        )

    def __bool__(self) -> bool:
        return self.event_count > 0


@dataclass(frozen=True, slots=True)
class UserIdChange:
    """Meta announced that a user's business-scoped user id changed (previous None:
    Meta did not name the previous id). A number change regenerates the id too, but it is
    no `UserIdChange`: a number change moves no consent, so it links nothing."""

    at: datetime
    previous: str | None
    new: str

    @classmethod
    def of(cls, event: Event) -> UserIdChange | None:
        if event.signal is not Signal.USER_ID_CHANGED or not event.new_user_id:
            return None
        return cls(event.occurred_at, event.user_id, event.new_user_id)

    @staticmethod
    def in_order(changes: Iterable[UserIdChange]) -> tuple[UserIdChange, ...]:
        """Oldest first, without duplicates (the same change can reach a record twice)."""
        return tuple(sorted(set(changes), key=lambda c: (c.at, c.previous or "", c.new)))


def _newest(moments: Iterable[datetime | None]) -> datetime | None:
    return max((m for m in moments if m is not None), default=None)


NO_ACTIVITY = Activity()


@dataclass(frozen=True, slots=True)
class SkippedItem:
    """An item of a payload that could not be understood: where it was and why."""

    location: str
    reason: str


@dataclass(frozen=True, slots=True)
class PlainStatus:
    message_id: str
    wa_id: str | None
    user_id: str | None


@dataclass(frozen=True, slots=True)
class ParsedPayload:
    events: tuple[Event, ...]
    skipped: tuple[SkippedItem, ...] = ()
    ignored_changes: int = 0
    #: where each event came from, in the order of `events` (for a skip the store forces)
    locations: tuple[str, ...] = ()
    #: plain statuses of the business's own messages (sent, delivered, read: nothing the
    #: rules can use), read no further than (message id, number, user id)
    plain: tuple[PlainStatus, ...] = ()

    def location_of(self, index: int) -> str:
        return self.locations[index] if index < len(self.locations) else f"event[{index}]"


@dataclass(frozen=True, slots=True)
class CrmRecord:
    """One CRM record as the rules see it: logical consent fields, raw phones, user id."""

    record_id: str
    fields: Mapping[str, FieldValue]
    phones: Mapping[str, str | None] = field(default_factory=dict)
    modified_at: datetime | None = None
    name: str | None = None

    def get(self, logical: str) -> FieldValue:
        return self.fields.get(logical)


@dataclass(frozen=True, slots=True)
class FieldChange:
    field: str
    old: FieldValue
    new: FieldValue
    reason: str


class DecisionKind(enum.IntEnum):
    """Ordering of the outbox: revocations are sent before anything else."""

    REVOCATION = 0
    OPT_IN = 1
    OTHER = 2


@dataclass(frozen=True, slots=True)
class Decision:
    """What the rules decided for one record; empty `changes` means nothing to write."""

    record_id: str
    changes: tuple[FieldChange, ...] = ()
    conflicts: tuple[str, ...] = ()
    proof_missing: bool = False
    session_open: bool = False
    #: the record's consent values the decision was made on (its precondition when sent)
    basis: tuple[tuple[str, FieldValue], ...] = ()

    @property
    def kind(self) -> DecisionKind:
        fields = {c.field: c.new for c in self.changes}
        if fields.get(OPT_IN) is False or OPT_OUT_DATE in fields:
            return DecisionKind.REVOCATION
        if fields.get(OPT_IN) is True or OPT_IN_DATE in fields:
            return DecisionKind.OPT_IN
        return DecisionKind.OTHER

    def changed(self, logical: str) -> bool:
        return any(c.field == logical for c in self.changes)


@dataclass(frozen=True, slots=True)
class WriteRequest:
    """A batch item for a connector: the logical field values to set on one record."""

    record_id: str
    values: Mapping[str, FieldValue]


@dataclass(frozen=True, slots=True)
class WriteResult:
    record_id: str
    ok: bool
    error: str = ""
    code: str = ""
    permanent: bool = False


@dataclass(frozen=True, slots=True)
class FieldDescription:
    """What a CRM says about one of its fields, for the one mapping checker
    (`waconsent.config.check`) that `check` and every preflight run.

    `type` is the CRM's own spelling (Salesforce `datetime`, Dataverse `DateTime`), so a
    message shows the admin the word their CRM uses. `options` are the values of a
    picklist / Choice as the connector compares `[mapping.values]` with them: Salesforce's
    active picklist values, Dataverse's option values as decimal strings.
    """

    name: str
    type: str
    updateable: bool = True
    length: int | None = None
    options: tuple[str, ...] = ()


def jsonable(value: Any) -> Any:
    """Render a field value for JSON reports and evidence rows."""
    if isinstance(value, datetime):
        return to_second(value).isoformat().replace("+00:00", "Z")
    return value

"""Which events belong to which CRM record: a record's numbers and user id as match keys."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from waconsent.domain import Event
from waconsent.phones import UnparseablePhone, mask, phone_key, user_id_key, wa_id_key


@dataclass(frozen=True, slots=True)
class PhoneProblem:
    record_id: str
    field: str
    masked_value: str
    reason: str


@dataclass(frozen=True, slots=True)
class RecordKeys:
    """The match keys of one record: (field, key) pairs, plus problems found on the way."""

    record_id: str
    keys: tuple[tuple[str, str], ...]
    problems: tuple[PhoneProblem, ...] = ()

    key_set: frozenset[str] = frozenset()


def record_keys(
    record_id: str,
    phones: Mapping[str, str | None],
    user_id: str | None,
    default_region: str,
    known: Mapping[str, tuple[str, str]] | None = None,
) -> RecordKeys:
    """The record's keys; `known` (field -> (raw, key) from the phone index) skips re-parsing."""
    keys: list[tuple[str, str]] = []
    problems: list[PhoneProblem] = []
    for field, raw in phones.items():
        if raw is None or not str(raw).strip():
            continue
        remembered = known.get(field) if known else None
        if remembered is not None and remembered[0] == raw:
            keys.append((field, remembered[1]))
            continue
        try:
            keys.append((field, phone_key(str(raw), default_region)))
        except UnparseablePhone as exc:
            problems.append(PhoneProblem(record_id, field, mask(str(raw)), str(exc)))
    uid = user_id_key(user_id)
    if uid:
        keys.append(("whatsapp_user_id", uid))
    unique = tuple(dict.fromkeys(keys))
    return RecordKeys(record_id, unique, tuple(problems), frozenset(key for _, key in unique))


def event_keys(event: Event) -> tuple[str, ...]:
    """The keys an event can be found by: its number and its business-scoped user id."""
    return tuple(k for k in (wa_id_key(event.wa_id), user_id_key(event.match_user_id)) if k)

"""A record's activity from the stored events: what the rules read of them.

Apart from `events` (storing and finding events) because this is the read the sync and the
pre-send check pay for on every record: aggregates per (phone key, user-id key) group, the
consent events themselves only where a group has any, and the keys linked by
`store.identity` followed in the same call.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Mapping
from datetime import datetime
from itertools import chain
from typing import Any

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Connection,
    String,
    any_,
    bindparam,
    case,
    func,
    or_,
    select,
)

from waconsent.domain import CONSENT_SIGNALS, Activity, Event, UserIdChange
from waconsent.phones import USER_ID_PREFIX
from waconsent.store import identity
from waconsent.store.engine import among
from waconsent.store.events import EVENT_COLUMNS, WHOLE_SIGNALS, to_event
from waconsent.store.tables import events

_KEYS_PER_QUERY = 2_000  # bound as one array (see `store.engine.among`)

Group = tuple[str | None, str | None]  # (phone key, user-id key) shared by a set of events


def activity_of(
    connection: Connection, keys_by_record: Mapping[str, Collection[str]]
) -> dict[str, Activity]:
    """Each record's `Activity`, from the events under any of its match keys or any key
    linked to them (`store.identity`); records without events are left out.

    Events are grouped by their (phone key, user-id key) pair. The pairs partition the
    events, so a record's activity is the merge of the pairs carrying any of its keys, and
    an event under both its number and its user id counts once. Aggregates do the reducing,
    so a number with years of chat history still costs one row. The groups read for a
    record's own keys also show which user ids its numbers had; those are followed in the
    same run, so a STOP that carries only the user id applies at once.
    """
    groups: dict[Group, Activity] = {}

    def pairs_of(new_keys: set[str]) -> list[identity.Pair]:
        found = _activity_by_group(connection, new_keys)
        groups.update(found)
        return [(phone, uid) for phone, uid in found if phone is not None and uid is not None]

    people = identity.connect(
        connection, set(chain.from_iterable(keys_by_record.values())), pairs_of
    )
    by_key: dict[str, list[Group]] = defaultdict(list)
    for group in groups:
        for key in group:
            if key is not None:
                by_key[key].append(group)
    found: dict[str, Activity] = {}
    for record_id, keys in keys_by_record.items():
        matched = {group for key in people.expand(keys) for group in by_key.get(key, ())}
        if matched:
            found[record_id] = Activity.merged([groups[group] for group in matched])
    return found


def activity_since(
    connection: Connection, keys: Iterable[str], since: datetime | None
) -> dict[Group, Activity]:
    """The activity of each (phone key, user-id key) group under `keys`, of the events
    received since `since` only (issue 16: what arrived after the last sync)."""
    return _activity_by_group(connection, keys, since)


def groups_since(connection: Connection, keys: Collection[str], since: datetime) -> set[Group]:
    """The (phone key, user-id key) groups of the events under `keys` received since `since`
    (issue 16: most numbers have none, and then the aggregates need not run; a group with
    both keys joins them, as `identity` does). Statements built once: this runs per request
    of the consent API."""
    sqlite = connection.dialect.name == "sqlite"
    found: set[Group] = set()
    for column in ("phone_key", "uid_key"):
        wanted = sorted(k for k in keys if k.startswith(USER_ID_PREFIX) == (column == "uid_key"))
        statement = _SINCE[(column, sqlite)]
        for start in range(0, len(wanted), _KEYS_PER_QUERY):
            chunk = wanted[start : start + _KEYS_PER_QUERY]
            found.update(
                (phone, uid)
                for phone, uid in connection.execute(
                    statement, {"keys": json.dumps(chunk) if sqlite else chunk, "since": since}
                )
            )
    return found


def _since_statement(column: str, sqlite: bool) -> Any:
    matched = events.c[column]
    among_keys: ColumnElement[bool]
    if sqlite:
        listed = func.json_each(bindparam("keys", type_=String)).table_valued("value")
        among_keys = matched.in_(select(listed.c.value))
    else:
        among_keys = matched == any_(bindparam("keys", type_=ARRAY(String())))
    return (
        select(events.c.phone_key, events.c.uid_key)
        .distinct()
        .where(among_keys, events.c.received_at >= bindparam("since"))
    )


_SINCE = {
    (column, sqlite): _since_statement(column, sqlite)
    for column in ("phone_key", "uid_key")
    for sqlite in (True, False)
}


def _activity_by_group(
    connection: Connection, keys: Iterable[str], since: datetime | None = None
) -> dict[Group, Activity]:
    """One aggregate row per group; consent events and user-id changes themselves are read
    only for the groups that have any (most numbers never sent STOP or START)."""
    newer = events.c.received_at >= since if since is not None else None
    wanted = set(keys)
    facts: dict[
        Group, tuple[int, datetime | None, datetime | None, tuple[datetime, str] | None]
    ] = {}
    with_whole: set[str] = set()
    for matches in _under_keys(connection, wanted):
        query = _ACTIVITY.where(matches) if newer is None else _ACTIVITY.where(matches, newer)
        for (
            phone_key,
            uid_key,
            count,
            whole_count,
            inbound,
            window,
            uid_at,
            user_id,
        ) in connection.execute(query).all():
            facts[(phone_key, uid_key)] = (
                count,
                inbound,
                window,
                (uid_at, user_id) if uid_at and user_id else None,
            )
            if whole_count:
                with_whole.add(phone_key if phone_key in wanted else uid_key)
    whole: dict[Group, dict[str, Event]] = defaultdict(dict)
    for matches in _under_keys(connection, with_whole):
        query = _WHOLE.where(matches) if newer is None else _WHOLE.where(matches, newer)
        for row in connection.execute(query).all():
            event = to_event(row)
            whole[(row[5], row[6])][event.key] = event
    activities = {}
    for group, (count, inbound, window, newest_user_id) in facts.items():
        read = _in_key_order(whole.get(group, {}))
        activities[group] = Activity(
            tuple(e for e in read if e.signal in CONSENT_SIGNALS),
            inbound,
            window,
            newest_user_id,
            count,
            UserIdChange.in_order(c for c in map(UserIdChange.of, read) if c is not None),
        )
    return activities


def _in_key_order(by_key: Mapping[str, Event]) -> tuple[Event, ...]:
    return tuple(by_key[key] for key in sorted(by_key))


_ACTIVITY = select(
    events.c.phone_key,
    events.c.uid_key,
    func.count(),
    func.count(case((events.c.signal.in_(WHOLE_SIGNALS), 1))),
    func.max(case((events.c.opens_session, events.c.occurred_at))),
    func.max(events.c.window_expires_at),
    func.max(case((events.c.user_id.is_not(None), events.c.occurred_at))),
    func.max(events.c.user_id),
).group_by(events.c.phone_key, events.c.uid_key)
_WHOLE = select(*EVENT_COLUMNS).where(events.c.signal.in_(WHOLE_SIGNALS))


def _under_keys(
    connection: Connection, keys: Collection[str | None]
) -> Iterator[ColumnElement[bool]]:
    """Conditions matching the events under the keys (phone keys and user-id keys), a
    bounded number of keys at a time."""
    ordered = sorted(k for k in keys if k)
    phone = [k for k in ordered if not k.startswith(USER_ID_PREFIX)]
    uids = [k for k in ordered if k.startswith(USER_ID_PREFIX)]
    for start in range(0, max(len(phone), len(uids)), _KEYS_PER_QUERY):
        conditions = []
        if phone[start : start + _KEYS_PER_QUERY]:
            conditions.append(
                among(connection, events.c.phone_key, phone[start : start + _KEYS_PER_QUERY])
            )
        if uids[start : start + _KEYS_PER_QUERY]:
            conditions.append(
                among(connection, events.c.uid_key, uids[start : start + _KEYS_PER_QUERY])
            )
        yield or_(*conditions)

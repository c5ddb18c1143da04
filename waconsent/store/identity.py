"""Which match keys name the same person, so that every event of a person reaches the
records of that person.

Two kinds of evidence join keys: an event that carries both a number and a
business-scoped user id (a message from a user with a BSUID), and Meta's announcement that
a user id changed (`user_changed_user_id`, `user_id_update`), kept in `identity_links`.
A number change joins nothing: it moves no consent by itself (SPEC 5.9), and the number
left behind may soon belong to somebody else.

Links are followed for `MAX_ROUNDS` steps from the keys asked about, each step one query,
so a full sync of an org without user ids pays one cheap query per chunk and no more.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from datetime import datetime

from sqlalchemy import Connection, and_, or_, select

from waconsent.domain import Event, Signal
from waconsent.phones import USER_ID_PREFIX, user_id_key, wa_id_key
from waconsent.store.engine import among, insert_ignoring
from waconsent.store.tables import events, identity_links

MAX_ROUNDS = 3
_USER_ID_LENGTH = 128  # as the events table holds it (BSUIDs are far shorter)
_KEYS_PER_QUERY = 2_000

Pair = tuple[str, str]
#: given keys not asked about before, the (key, key) pairs that join them to others
PairSource = Callable[[set[str]], Iterable[Pair]]


class People:
    """Keys grouped into people (a union-find over the joins seen)."""

    def __init__(self) -> None:
        self._parent: dict[str, str] = {}
        self._members: dict[str, set[str]] | None = None

    def _root(self, key: str) -> str:
        parent = self._parent.setdefault(key, key)
        while parent != key:
            grand = self._parent[parent]
            self._parent[key] = grand
            key, parent = parent, self._parent[grand]
        return key

    def join(self, a: str, b: str) -> None:
        root_a, root_b = self._root(a), self._root(b)
        if root_a != root_b:
            self._parent[max(root_a, root_b)] = min(root_a, root_b)
            self._members = None

    def expand(self, keys: Iterable[str]) -> set[str]:
        """The keys, with every key that names the same person as one of them."""
        if self._members is None:
            members: dict[str, set[str]] = {}
            for key in list(self._parent):
                members.setdefault(self._root(key), set()).add(key)
            self._members = members
        found: set[str] = set()
        for key in keys:
            found.add(key)
            if key in self._parent:
                found |= self._members[self._root(key)]
        return found


def connect(
    connection: Connection, keys: Collection[str], pairs_of: PairSource | None = None
) -> People:
    """The people behind `keys`, following joins for at most MAX_ROUNDS steps.

    `pairs_of` finds the number-and-user-id pairs of events under the keys it is given;
    the sync passes one that also keeps the activity it reads on the way.
    """
    source = pairs_of or (lambda new: event_pairs(connection, new))
    people = People()
    asked: set[str] = set()
    frontier = {key for key in keys if key}
    for _ in range(MAX_ROUNDS):
        if not frontier:
            break
        asked |= frontier
        found = [*source(frontier), *links(connection, frontier)]
        for a, b in found:
            people.join(a, b)
        frontier = {key for pair in found for key in pair} - asked
    return people


def expand(connection: Connection, keys: Collection[str]) -> set[str]:
    """`keys` and every key linked to them (for finding the records behind events)."""
    return connect(connection, keys).expand(keys)


def _chunks(keys: Collection[str]) -> Iterator[list[str]]:
    ordered = sorted(keys)
    for start in range(0, len(ordered), _KEYS_PER_QUERY):
        yield ordered[start : start + _KEYS_PER_QUERY]


def links(connection: Connection, keys: Collection[str]) -> Iterator[Pair]:
    for chunk in _chunks(keys):
        query = select(identity_links.c.key, identity_links.c.linked_key).where(
            among(connection, identity_links.c.key, chunk)
        )
        yield from ((a, b) for a, b in connection.execute(query))


def links_since(connection: Connection, keys: Collection[str], since: datetime) -> Iterator[Pair]:
    """The links of `keys` first seen since `since` (issue 16: what the pre-send check follows
    before the next sync does). A user-id change counts from when it was received: Meta may
    deliver one days after it happened, and a sync in between never saw it."""
    received = (
        select(events.c.received_at)
        .where(events.c.key == identity_links.c.event_key)
        .scalar_subquery()
    )
    for chunk in _chunks(keys):
        query = select(identity_links.c.key, identity_links.c.linked_key).where(
            among(connection, identity_links.c.key, chunk),
            or_(identity_links.c.occurred_at >= since, received >= since),
        )
        yield from ((a, b) for a, b in connection.execute(query))


def event_pairs(connection: Connection, keys: Collection[str]) -> Iterator[Pair]:
    """(number, user id) pairs of events under the keys: a message from a user who has both."""
    phones = [k for k in keys if not k.startswith(USER_ID_PREFIX)]
    uids = [k for k in keys if k.startswith(USER_ID_PREFIX)]
    both = and_(events.c.phone_key.is_not(None), events.c.uid_key.is_not(None))
    for column, chosen in ((events.c.phone_key, phones), (events.c.uid_key, uids)):
        for chunk in _chunks(chosen):
            query = (
                select(events.c.phone_key, events.c.uid_key)
                .where(both, among(connection, column, chunk))
                .distinct()
            )
            yield from ((a, b) for a, b in connection.execute(query))


def links_of(event: Event) -> list[Pair]:
    """The keys an announced user-id change joins: previous id and number to the new id."""
    if event.signal is not Signal.USER_ID_CHANGED:
        return []
    new = user_id_key(event.new_user_id)
    if new is None:
        return []
    return [
        (key, new)
        for key in (user_id_key(event.user_id), wa_id_key(event.wa_id))
        if key and key != new
    ]


def record(connection: Connection, changes: Sequence[Event]) -> None:
    """Keep the links of freshly stored user-id changes (both ways round), in the caller's
    transaction; a link seen before is kept with its first event."""
    _insert(
        connection,
        [(pair, event.occurred_at, event.key) for event in changes for pair in links_of(event)],
    )


#: (where the pair was seen, a number, a business-scoped user id)
Sighting = tuple[str, str | None, str | None]


Link = tuple[Pair, datetime, str]  # (the pair, when it was seen, where)


def pair_links(sightings: Sequence[Sighting], seen_at: datetime) -> list[Link]:
    """The number-and-user-id pairs of statuses that get no row of their own (a status of
    a message sent to a user who has both): kept, a later STOP that carries only the user
    id still finds the number's records. A user id the store could not hold is left out;
    the status it came with is answered all the same."""
    links = []
    for source, wa_id, user_id in sightings:
        phone = wa_id_key(wa_id)
        if (
            phone is None
            or user_id is None
            or len(user_id) > _USER_ID_LENGTH
            or not user_id.isascii()
        ):
            continue
        links.append(((phone, f"{USER_ID_PREFIX}{user_id}"), seen_at, source))
    return links


def record_links(connection: Connection, links: Sequence[Link]) -> None:
    """Keep `pair_links` in the caller's transaction (a link seen before stays as it was)."""
    _insert(connection, links)


def _insert(connection: Connection, links: Sequence[Link]) -> None:
    rows: dict[Pair, dict[str, str | datetime]] = {}
    for (a, b), occurred_at, event_key in links:
        for key, linked in ((a, b), (b, a)):
            rows.setdefault(
                (key, linked),
                {
                    "key": key,
                    "linked_key": linked,
                    "occurred_at": occurred_at,
                    "event_key": event_key[:300],
                },
            )
    if not rows:
        return
    statement = insert_ignoring(connection, identity_links, ["key", "linked_key"])
    connection.execute(statement, [rows[pair] for pair in sorted(rows)])

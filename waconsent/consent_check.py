"""The pre-send check over the store (issue 16): numbers in, answers out, a batch at a time.

For each batch the store is asked a few indexed questions, whatever its size: which records
carry the batch's numbers (the consent snapshot, by key), which of the numbers no record
carries end like one that some record does (by tail), which of the records' keys had
anything received since their sync and which keys were joined to them since (`_news`), and
for those few keys what (`store.activity`'s aggregates). The answer itself is
`sync.audience.answer`, pure. The CLI (`audience check`) and the HTTP API (`/v1/consent`)
are thin shells over `ConsentChecker.check`.

A number is read the quick way when it is written as a wa_id or as E.164 (`phones.quick_key`);
in any other form (a national number, a user id) by `phones.lookup_keys`. A quick key that no
record carries, while some record's number ends with the same digits, is parsed in full
(a trunk "(0)" typed after the country code still finds its record).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import chain, islice

from sqlalchemy import Connection, Engine

from waconsent.csvfiles import is_utf8
from waconsent.domain import NO_ACTIVITY, Activity
from waconsent.phones import lookup_keys, quick_key
from waconsent.store import activity as activity_store
from waconsent.store import identity as identity_store
from waconsent.store import snapshot as snapshot_store
from waconsent.store.activity import Group
from waconsent.store.engine import open_engine, reading
from waconsent.sync import audience

#: events received this long before a record's sync are applied again (harmless: the rules
#: are idempotent), so a delivery still committing while the sync read is never missed
MARGIN = timedelta(minutes=5)
#: a number no record carries can only have an open service window from events this recent
#: (a free entry point window ends at most 7 days after its status, see README "Times")
UNMATCHED_REACH = timedelta(days=8)
BATCH = 1_000


@dataclass(frozen=True, slots=True)
class _Read:
    key: str | None  # None: unparseable
    quick: bool


class ConsentChecker:
    """Answers batches of numbers (or user ids) for one CRM's snapshot."""

    def __init__(self, engine: Engine, crm: str, default_region: str) -> None:
        self.engine = engine
        self.crm = crm
        self.region = default_region

    def _read(self, value: str) -> _Read:
        if not is_utf8(value):  # bytes that were not UTF-8: no number, and no store holds it
            return _Read(None, False)
        key = quick_key(value)
        if key is not None:
            return _Read(key, True)
        try:
            return _Read(lookup_keys(value, self.region)[0], False)
        except ValueError:
            return _Read(None, False)

    def check(self, values: Sequence[str], purpose: str, now: datetime) -> list[audience.Answer]:
        """One answer per value, in order; `purpose` is "marketing" or "service"."""
        reads = [self._read(value) for value in values]
        with reading(self.engine) as connection:
            by_key = snapshot_store.by_keys(
                connection, self.crm, {r.key for r in reads if r.key is not None}
            )
            tails = {
                t
                for r in reads
                if r.quick
                and r.key is not None
                and r.key not in by_key
                and (t := snapshot_store.tail_of(r.key))
            }
            if tails:
                carried = snapshot_store.tails_carried(connection, self.crm, tails)
                reads = self._second_look(values, reads, by_key.keys(), carried)
                again = {r.key for r in reads if r.key is not None and r.key not in by_key}
                if again:
                    by_key.update(snapshot_store.by_keys(connection, self.crm, again))
            rows = {row.record_id: row for found in by_key.values() for row in found}
            unmatched = {r.key for r in reads if r.key is not None and r.key not in by_key}
            keys_of, groups = _since_sync(connection, rows, unmatched, purpose, now)
        by_group_key: dict[str, list[Activity]] = {}
        for (phone, uid), activity in groups.items():
            for key in (phone, uid):
                if key is not None:
                    by_group_key.setdefault(key, []).append(activity)
        news = (
            {record_id: _merged(keys_of[record_id], by_group_key) for record_id in rows}
            if by_group_key
            else {}
        )
        nobody = audience.Answer(False, audience.NO_RECORD)
        answers = []
        for read in reads:
            if read.key is None:
                answers.append(audience.UNPARSEABLE)
                continue
            held = by_key.get(read.key)
            if held is None:  # most of a bought list; service still looks for a window
                answers.append(
                    audience.answer(purpose, [], _merged({read.key}, by_group_key), now)
                    if by_group_key
                    else nobody
                )
                continue
            records = [
                (_held(row), news.get(row.record_id, NO_ACTIVITY))
                for row in (
                    {row.record_id: row for row in held}.values() if len(held) > 1 else held
                )
            ]
            answers.append(audience.answer(purpose, records, NO_ACTIVITY, now))
        return answers

    def _second_look(
        self, values: Sequence[str], reads: list[_Read], found: Collection[str], carried: set[str]
    ) -> list[_Read]:
        """Quick keys no record carries, whose digits end like a record's number: parsed in
        full (a parse that fails keeps the quick key: a wa_id is never refused)."""
        again = []
        for value, read in zip(values, reads, strict=True):
            tail = snapshot_store.tail_of(read.key) if read.quick and read.key else None
            if tail is None or read.key in found or tail not in carried:
                again.append(read)
                continue
            try:
                again.append(_Read(lookup_keys(value, self.region)[0], False))
            except ValueError:
                again.append(read)
        return again


def _since_sync(
    connection: Connection,
    rows: dict[str, snapshot_store.SnapshotRow],
    unmatched: set[str],
    purpose: str,
    now: datetime,
) -> tuple[dict[str, set[str]], dict[Group, Activity]]:
    """What arrived since each record's sync: every record's keys (with those joined to them
    since), and the activity under the keys of the records that have news (a record's
    activity needs all its keys once one of them has news). A key joined to a record only
    since its sync brings its whole history: the sync never applied any of it to the record
    (a STOP by a new user id can arrive before Meta's notice of the change)."""
    wanted = {key for row in rows.values() for key in row.keys}
    moments = [row.synced_at - MARGIN for row in rows.values()]
    if purpose == audience.SERVICE and unmatched:
        wanted |= unmatched
        moments.append(now - UNMATCHED_REACH)
    since = min(moments, default=now)
    people, active = _news(connection, wanted, since)
    keys_of = {record_id: people.expand(row.keys) for record_id, row in rows.items()}
    joined = {key for record_id, row in rows.items() for key in keys_of[record_id] - row.keys}
    wanted = {key for keys in keys_of.values() if keys & (active | joined) for key in keys}
    wanted = (wanted | (active & unmatched)) - joined
    groups = activity_store.activity_since(connection, wanted, since) if wanted else {}
    if joined:  # whole histories, which also hold what arrived since
        groups.update(activity_store.activity_since(connection, joined, None))
    return keys_of, groups


def _news(
    connection: Connection, keys: set[str], since: datetime
) -> tuple[identity_store.People, set[str]]:
    """The keys with events received since `since`, and the people those events and the
    links first seen since join them to (a message or status carrying a number and a user
    id, a user-id change), followed as far as the sync follows links: a stop that carries
    only a user id joined to the number after the last sync answers "no" at once."""
    people = identity_store.People()
    active: set[str] = set()
    asked: set[str] = set()
    frontier = keys
    for _ in range(identity_store.MAX_ROUNDS):
        if not frontier:
            break
        asked |= frontier
        groups = activity_store.groups_since(connection, frontier, since)
        active |= {key for group in groups for key in group if key is not None}
        pairs = [(a, b) for a, b in groups if a is not None and b is not None]
        pairs += identity_store.links_since(connection, frontier, since)
        for a, b in pairs:
            people.join(a, b)
        frontier = {key for pair in pairs for key in pair} - asked
    return people, active


def _merged(keys: set[str] | frozenset[str], by_key: dict[str, list[Activity]]) -> Activity:
    """The activity of the groups carrying any of the keys, each group once."""
    parts = {id(a): a for key in keys for a in by_key.get(key, ())}
    return Activity.merged(list(parts.values()))


def _held(row: snapshot_store.SnapshotRow) -> audience.Held:
    return audience.Held(
        row.record_id,
        row.opt_in,
        row.opt_in_date,
        row.opt_out_date,
        row.proof_complete,
        row.session_expires,
    )


# ---------------------------------------------------------------- long lists, in parallel
#
# A campaign list of a million numbers is checked a batch at a time in worker processes
# (each with its own connection), at most `2 * workers` batches in flight and the answers
# handed back in the order of the list, so memory stays flat; the reader formats one batch
# while the workers check the next ones. A short list is checked in the calling process
# (it would not pay for the start-up).

PARALLEL_FROM = 10  # batches; a list shorter than 10,000 numbers stays in-process
_worker: ConsentChecker | None = None


def _start_worker(url: str, crm: str, region: str) -> None:
    global _worker  # noqa: PLW0603 - one checker per forked worker process, set at its start
    _worker = ConsentChecker(open_engine(url, run_migrations=False), crm, region)


_Packed = tuple[bool, str, datetime | None, tuple[str, ...]]


def _check_in_worker(values: list[str], purpose: str, now: datetime) -> list[_Packed]:
    """Answers as plain tuples: they cross back to the reader pickled, and a tuple pickles
    in a fraction of a frozen dataclass's time."""
    assert _worker is not None
    return [
        (a.may_send, a.reason, a.session_open_until, a.records)
        for a in _worker.check(values, purpose, now)
    ]


def default_workers() -> int:
    """One worker per core, at most four (beyond that they wait on the store); none where
    processes cannot be forked."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return 0
    return min(4, os.cpu_count() or 1)


def check_batches(
    checker: ConsentChecker,
    url: str,
    batches: Iterable[list[str]],
    purpose: str,
    now: Callable[[], datetime],
    workers: int,
) -> Iterator[list[audience.Answer]]:
    """The answers of each batch, in the order of the batches."""
    iterator = iter(batches)
    ahead = list(islice(iterator, PARALLEL_FROM))
    if len(ahead) < PARALLEL_FROM or workers < 2:
        for values in chain(ahead, iterator):
            yield checker.check(values, purpose, now())
        return
    checker.engine.dispose()  # no pooled connection crosses the fork
    with ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("fork"),
        initializer=_start_worker,
        initargs=(url, checker.crm, checker.region),
    ) as pool:
        pending: deque[Future[list[_Packed]]] = deque()
        for values in chain(ahead, iterator):
            pending.append(pool.submit(_check_in_worker, values, purpose, now()))
            if len(pending) >= 2 * workers:
                yield [audience.Answer(*packed) for packed in pending.popleft().result()]
        while pending:
            yield [audience.Answer(*packed) for packed in pending.popleft().result()]

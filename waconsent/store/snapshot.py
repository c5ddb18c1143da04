"""The consent snapshot (issue 16): what the last sync knew of each record's consent, found
again by match key for the pre-send check.

One row per (CRM, match key, record): a number on three records is three rows, a record with
two numbers and a user id is three rows. A sync writes the rows of the records whose keys or
consent changed (it compares each record's `digest_of` with the one held, so an idle full
sync writes nothing and reads one short value per record); a full sync drops the rows of
records it no longer saw.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import ARRAY, Connection, String, any_, bindparam, delete, exists, func, select

from waconsent.phones import SEARCH_DIGITS, USER_ID_PREFIX
from waconsent.store.engine import among
from waconsent.store.tables import consent_snapshot, phone_index

_CHUNK = 1_000  # keys or ids per statement (bound as one array, see `among`)
#: between the keys of the `keys` column: read for every row a check finds, and splitting
#: costs a tenth of decoding JSON (a key holding it, a user id typed with a line break into
#: a CRM field, is not kept)
KEY_SEPARATOR = "\n"
#: (record's keys, opt_in, opt_in_date, opt_out_date, proof_complete, session_expires)
Fields = tuple[Any, ...]


class SnapshotRow(NamedTuple):
    """A record as the sync leaves it, with all its match keys (a named tuple: a full sync
    builds one per record, and the check one per record it finds)."""

    record_id: str
    keys: frozenset[str]
    opt_in: bool | None
    opt_in_date: datetime | None
    opt_out_date: datetime | None
    proof_complete: bool
    session_expires: datetime | None
    synced_at: datetime


def tail_of(key: str) -> str | None:
    """The last digits of a phone key ("+" and digits; the last eight are the same in every
    spelling the matching accepts, see `phones.SEARCH_DIGITS`)."""
    return None if key.startswith(USER_ID_PREFIX) else key[-SEARCH_DIGITS:]


def digest_of(row: SnapshotRow) -> str:
    """What a record's snapshot says, in 32 hex digits: its keys and its consent, datetimes
    to the second (as the CRMs keep them; finer, every run would see a change). Equal
    digests, equal snapshots: `synced_at` and the run are left out on purpose. The text
    hashed is a tuple's `repr`, so no value can pass for two (a key holding a separator)."""
    text = repr(
        (
            tuple(sorted(row.keys)),
            row.opt_in,
            _seconds(row.opt_in_date),
            _seconds(row.opt_out_date),
            row.proof_complete,
            _seconds(row.session_expires),
        )
    )
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)


def _seconds(moment: datetime | None) -> int | None:
    """Whole seconds since 1970, exactly (a float timestamp rounds up near the year 9999)."""
    return None if moment is None else (moment - _EPOCH) // _SECOND


def held_digests(
    connection: Connection, crm: str, record_ids: Sequence[str]
) -> dict[str, str | None]:
    """record id -> the digest of what the snapshot holds for it (None: a row written before
    digests were kept); a record the snapshot does not hold is left out."""
    found: dict[str, str | None] = {}
    for start in range(0, len(record_ids), _CHUNK):
        query = select(consent_snapshot.c.record_id, consent_snapshot.c.digest).where(
            consent_snapshot.c.crm == crm,
            among(connection, consent_snapshot.c.record_id, record_ids[start : start + _CHUNK]),
        )
        found.update(connection.execute(query).all())
    return found


def replace(
    connection: Connection,
    crm: str,
    record_ids: Sequence[str],
    rows: Iterable[SnapshotRow],
    run_id: int | None,
) -> None:
    """Replace the snapshot of `record_ids` with `rows` (a record without keys has none)."""
    for start in range(0, len(record_ids), _CHUNK):
        connection.execute(
            delete(consent_snapshot).where(
                consent_snapshot.c.crm == crm,
                among(connection, consent_snapshot.c.record_id, record_ids[start : start + _CHUNK]),
            )
        )
    values = [
        {
            "crm": crm,
            "key": key,
            "record_id": row.record_id,
            "tail": tail_of(key),
            "keys": KEY_SEPARATOR.join(sorted(row.keys)),
            "opt_in": row.opt_in,
            "opt_in_date": row.opt_in_date,
            "opt_out_date": row.opt_out_date,
            "proof_complete": row.proof_complete,
            "session_expires": row.session_expires,
            "synced_at": row.synced_at,
            "run_id": run_id or None,
            "digest": digest,
        }
        for row in rows
        for digest in (digest_of(row),)
        for key in sorted(row.keys)
        if KEY_SEPARATOR not in key
    ]
    if values:
        connection.execute(consent_snapshot.insert(), values)


def drop_unseen(connection: Connection, crm: str) -> int:
    """After a full read: records the phone index no longer knows leave the snapshot."""
    known = exists().where(
        phone_index.c.crm == crm, phone_index.c.record_id == consent_snapshot.c.record_id
    )
    return int(
        connection.execute(
            delete(consent_snapshot).where(consent_snapshot.c.crm == crm, ~known)
        ).rowcount
    )


def by_keys(
    connection: Connection, crm: str, keys: Collection[str]
) -> dict[str, list[SnapshotRow]]:
    """key -> the records carrying it, for a batch of keys; one indexed statement per
    `_CHUNK` of them."""
    by_key: dict[str, list[SnapshotRow]] = {}
    wanted = sorted(set(keys))
    sqlite = connection.dialect.name == "sqlite"
    statement = _BY_KEYS_SQLITE if sqlite else _BY_KEYS_ARRAY
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start : start + _CHUNK]
        params = {"crm": crm, "keys": json.dumps(chunk) if sqlite else chunk}
        for row in connection.execute(statement, params).all():
            by_key.setdefault(row[-1], []).append(_to_row(row))
    return by_key


def tails_carried(connection: Connection, crm: str, tails: Collection[str]) -> set[str]:
    """Which of the tails some record's number ends with."""
    found: set[str] = set()
    wanted = sorted(set(tails))
    sqlite = connection.dialect.name == "sqlite"
    statement = _TAILS_SQLITE if sqlite else _TAILS_ARRAY
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start : start + _CHUNK]
        found.update(
            connection.execute(
                statement, {"crm": crm, "keys": json.dumps(chunk) if sqlite else chunk}
            ).scalars()
        )
    return found


def coverage(connection: Connection, crm: str) -> tuple[int, int]:
    """(records in the snapshot, records in the phone index): fewer in the first means no
    full sync ran since the snapshot was introduced."""
    held = connection.execute(
        select(func.count(func.distinct(consent_snapshot.c.record_id))).where(
            consent_snapshot.c.crm == crm
        )
    ).scalar_one()
    indexed = connection.execute(
        select(func.count(func.distinct(phone_index.c.record_id))).where(phone_index.c.crm == crm)
    ).scalar_one()
    return int(held), int(indexed)


_ROWS = select(
    consent_snapshot.c.record_id,
    consent_snapshot.c["keys"].label("record_keys"),
    consent_snapshot.c.opt_in,
    consent_snapshot.c.opt_in_date,
    consent_snapshot.c.opt_out_date,
    consent_snapshot.c.proof_complete,
    consent_snapshot.c.session_expires,
    consent_snapshot.c.synced_at,
)


# `by_keys` runs per API request: its statement is built once (the keys bound as one
# parameter, as `store.engine.among` binds them), so SQLAlchemy finds it compiled
_BY_KEYS_SQLITE = _ROWS.add_columns(consent_snapshot.c.key).where(
    consent_snapshot.c.crm == bindparam("crm"),
    consent_snapshot.c.key.in_(
        select(func.json_each(bindparam("keys", type_=String)).table_valued("value").c.value)
    ),
)
_BY_KEYS_ARRAY = _ROWS.add_columns(consent_snapshot.c.key).where(
    consent_snapshot.c.crm == bindparam("crm"),
    consent_snapshot.c.key == any_(bindparam("keys", type_=ARRAY(String()))),
)


_TAILS_SQLITE = (
    select(consent_snapshot.c.tail)
    .distinct()
    .where(
        consent_snapshot.c.crm == bindparam("crm"),
        consent_snapshot.c.tail.in_(
            select(func.json_each(bindparam("keys", type_=String)).table_valued("value").c.value)
        ),
    )
)
_TAILS_ARRAY = (
    select(consent_snapshot.c.tail)
    .distinct()
    .where(
        consent_snapshot.c.crm == bindparam("crm"),
        consent_snapshot.c.tail == any_(bindparam("keys", type_=ARRAY(String()))),
    )
)


def _to_row(row: Any) -> SnapshotRow:
    """Unpacked by position: this runs for every number a check finds, and attribute access
    by name cost more than the rest of it."""
    (
        record_id,
        keys,
        opt_in,
        opt_in_date,
        opt_out_date,
        proof_complete,
        session_expires,
        synced_at,
    ) = tuple(row)[:8]
    return SnapshotRow(
        record_id,
        frozenset(keys.split(KEY_SEPARATOR)),
        opt_in,
        opt_in_date,
        opt_out_date,
        proof_complete,
        session_expires,
        synced_at,
    )

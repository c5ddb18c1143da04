"""The ledger's own phone index: match key -> CRM record ids.

Updated from every record a run reads, so an incremental run finds the records
behind new WhatsApp activity without searching the CRM's unnormalized phone fields.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy import Connection, and_, delete, func, or_, select, update

from waconsent.store.engine import among
from waconsent.store.tables import events, phone_index

_CHUNK = 2_000  # ids per statement (bound as one array, see `among`)


def replace(
    connection: Connection,
    crm: str,
    record_ids: Sequence[str],
    rows: Iterable[tuple[str, str, str, str | None]],
    run_id: int,
) -> None:
    """Replace the index rows of `record_ids` with `rows` of (record_id, field, key, raw)."""
    for start in range(0, len(record_ids), _CHUNK):
        connection.execute(
            delete(phone_index).where(
                phone_index.c.crm == crm,
                among(connection, phone_index.c.record_id, record_ids[start : start + _CHUNK]),
            )
        )
    values = [
        {
            "crm": crm,
            "record_id": record_id,
            "field": field,
            "key": key,
            "raw": (raw or "")[:200],
            "seen_run": run_id,
        }
        for record_id, field, key, raw in dict.fromkeys(rows)
    ]
    if values:
        connection.execute(phone_index.insert(), values)


def known_keys(
    connection: Connection, crm: str, record_ids: Sequence[str]
) -> dict[str, dict[str, tuple[str, str]]]:
    """record_id -> field -> (raw, key): what earlier runs parsed, so nothing is parsed twice."""
    found: dict[str, dict[str, tuple[str, str]]] = {}
    for start in range(0, len(record_ids), _CHUNK):
        rows = connection.execute(
            select(
                phone_index.c.record_id, phone_index.c.field, phone_index.c.raw, phone_index.c.key
            ).where(
                phone_index.c.crm == crm,
                among(connection, phone_index.c.record_id, record_ids[start : start + _CHUNK]),
            )
        ).all()
        for record_id, field, raw, key in rows:
            found.setdefault(record_id, {})[field] = (raw, key)
    return found


def mark_seen(connection: Connection, crm: str, record_ids: Sequence[str], run_id: int) -> None:
    """Records whose keys did not change keep their rows; a full run still sees them."""
    for start in range(0, len(record_ids), _CHUNK):
        connection.execute(
            update(phone_index)
            .where(
                phone_index.c.crm == crm,
                among(connection, phone_index.c.record_id, record_ids[start : start + _CHUNK]),
            )
            .values(seen_run=run_id)
        )


def records_by_key(connection: Connection, crm: str, keys: Iterable[str]) -> dict[str, set[str]]:
    """key -> ids of the records carrying it; keys no record carries are left out."""
    wanted = sorted(set(keys))
    found: dict[str, set[str]] = {}
    for start in range(0, len(wanted), _CHUNK):
        for key, record_id in connection.execute(
            select(phone_index.c.key, phone_index.c.record_id).where(
                phone_index.c.crm == crm,
                among(connection, phone_index.c.key, wanted[start : start + _CHUNK]),
            )
        ):
            found.setdefault(key, set()).add(record_id)
    return found


def record_ids_for_keys(connection: Connection, crm: str, keys: Iterable[str]) -> set[str]:
    return set().union(*records_by_key(connection, crm, keys).values())


def records_with_keys(connection: Connection, keys: Sequence[str]) -> set[str]:
    """Record ids carrying any of the keys, in any CRM (for `waconsent proof`)."""
    return set(
        connection.execute(
            select(phone_index.c.record_id).where(among(connection, phone_index.c.key, keys))
        ).scalars()
    )


def record_count(connection: Connection, crm: str) -> int:
    """How many records of this CRM the index knows (those with a number or a user id)."""
    return int(
        connection.execute(
            select(func.count(func.distinct(phone_index.c.record_id))).where(
                phone_index.c.crm == crm
            )
        ).scalar_one()
    )


def user_id_keys_of(connection: Connection, record_ids: Sequence[str]) -> set[str]:
    """The business-scoped user ids (as keys) the CRM holds for these records, in any CRM."""
    found: set[str] = set()
    for start in range(0, len(record_ids), _CHUNK):
        found.update(
            connection.execute(
                select(phone_index.c.key).where(
                    phone_index.c.field == "whatsapp_user_id",
                    among(connection, phone_index.c.record_id, record_ids[start : start + _CHUNK]),
                )
            ).scalars()
        )
    return found


def drop_unseen(connection: Connection, crm: str, run_id: int) -> int:
    """After a full read: rows of records that no longer exist (or lost the number) go."""
    return int(
        connection.execute(
            delete(phone_index).where(phone_index.c.crm == crm, phone_index.c.seen_run != run_id)
        ).rowcount
    )


def unmatched_keys(
    connection: Connection, crm: str, after_event_id: int, up_to_event_id: int
) -> list[str]:
    """Numbers (or user ids) with activity in the event range that no record of this CRM carries.

    An event counts as matched when either its number or its user id is indexed.
    """
    by_phone = phone_index.alias("by_phone")
    by_uid = phone_index.alias("by_uid")
    query = (
        select(func.coalesce(events.c.phone_key, events.c.uid_key))
        .distinct()
        .select_from(
            events.outerjoin(
                by_phone, and_(by_phone.c.crm == crm, by_phone.c.key == events.c.phone_key)
            ).outerjoin(by_uid, and_(by_uid.c.crm == crm, by_uid.c.key == events.c.uid_key))
        )
        .where(
            events.c.id > after_event_id,
            events.c.id <= up_to_event_id,
            or_(events.c.phone_key.is_not(None), events.c.uid_key.is_not(None)),
            by_phone.c.key.is_(None),
            by_uid.c.key.is_(None),
        )
    )
    return sorted(str(k) for k in connection.execute(query).scalars())

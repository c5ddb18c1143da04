"""The append-only, hash-chained evidence of consent.

Each row's hash covers the previous row's hash and its own canonical JSON body;
the single `evidence_head` row holds the newest hash and the row count. An altered
row breaks its own hash, a deleted row breaks its successor's link (or the head),
so `verify` finds both. Appends lock the head row, which serializes writers on
PostgreSQL; SQLite's `BEGIN IMMEDIATE` already does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, or_, select, update

from waconsent.domain import jsonable
from waconsent.store.engine import among
from waconsent.store.tables import evidence, evidence_head

GENESIS = "0" * 64


@dataclass(frozen=True, slots=True)
class EvidenceEntry:
    kind: str  # "event" | "write"
    body: Mapping[str, Any]
    phone_key: str | None = None
    uid_key: str | None = None
    record_id: str | None = None


def canonical_json(body: Mapping[str, Any]) -> str:
    return json.dumps(
        {k: jsonable(v) for k, v in body.items()},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=str,
    )


def chain_hash(prev_hash: str, created_at: datetime, kind: str, body: str) -> str:
    material = "\n".join((prev_hash, jsonable(created_at), kind, body))
    return hashlib.sha256(material.encode()).hexdigest()


def append(connection: Connection, entries: Sequence[EvidenceEntry], now: datetime) -> int:
    """Append rows in order, inside the caller's transaction; returns how many."""
    if not entries:
        return 0
    head = connection.execute(
        select(evidence_head).where(evidence_head.c.id == 1).with_for_update()
    ).one()
    prev = head.last_hash
    rows = []
    for entry in entries:
        body = canonical_json(entry.body)
        digest = chain_hash(prev, now, entry.kind, body)
        rows.append(
            {
                "created_at": now,
                "kind": entry.kind,
                "phone_key": entry.phone_key,
                "uid_key": entry.uid_key,
                "record_id": entry.record_id,
                "body": body,
                "prev_hash": prev,
                "hash": digest,
            }
        )
        prev = digest
    connection.execute(evidence.insert(), rows)
    last_id = connection.execute(select(evidence.c.id).where(evidence.c.hash == prev)).scalar_one()
    connection.execute(
        update(evidence_head)
        .where(evidence_head.c.id == 1)
        .values(last_id=last_id, last_hash=prev, count=head._mapping["count"] + len(rows))
    )
    return len(rows)


@dataclass(frozen=True, slots=True)
class ChainProblem:
    row_id: int | None
    problem: str


def verify(connection: Connection, batch: int = 5_000) -> list[ChainProblem]:
    """Walk the chain in id order up to the head read first, streaming; every break is
    reported. Rows appended while the walk runs lie beyond that head and are left out,
    so a busy receiver never looks like tampering."""
    head = connection.execute(select(evidence_head).where(evidence_head.c.id == 1)).one_or_none()
    if head is None:
        return [ChainProblem(None, "the chain head row is missing")]
    problems: list[ChainProblem] = []
    prev = GENESIS
    count = 0
    last_id = 0
    while True:
        rows = connection.execute(
            select(evidence)
            .where(evidence.c.id > last_id, evidence.c.id <= head.last_id)
            .order_by(evidence.c.id)
            .limit(batch)
        ).all()
        if not rows:
            break
        for row in rows:
            count += 1
            if row.prev_hash != prev:
                problems.append(
                    ChainProblem(
                        row.id,
                        "a row before it was deleted or altered "
                        "(its link to the previous row is broken)",
                    )
                )
            if chain_hash(row.prev_hash, row.created_at, row.kind, row.body) != row.hash:
                problems.append(ChainProblem(row.id, "its content was altered (hash mismatch)"))
            prev = row.hash
            last_id = row.id
    if head.last_hash != prev:
        problems.append(ChainProblem(head.last_id or None, "the newest row was deleted or altered"))
    if head._mapping["count"] != count:
        problems.append(
            ChainProblem(
                None, f"the head counts {head._mapping['count']} rows, the table holds {count}"
            )
        )
    return problems


def chain_length(connection: Connection) -> int:
    head = connection.execute(select(evidence_head).where(evidence_head.c.id == 1)).one()
    return int(head._mapping["count"])


def for_keys(
    connection: Connection, keys: Sequence[str], record_ids: Sequence[str] = ()
) -> Iterator[Any]:
    """Evidence rows about the given match keys or records, oldest first."""
    conditions = [
        among(connection, evidence.c.phone_key, keys),
        among(connection, evidence.c.uid_key, keys),
    ]
    if record_ids:
        conditions.append(among(connection, evidence.c.record_id, record_ids))
    yield from connection.execute(select(evidence).where(or_(*conditions)).order_by(evidence.c.id))

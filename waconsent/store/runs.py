"""Sync runs, their watermarks, and the one-run-per-CRM lock shared by every node."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, delete, select, update

from waconsent.errors import RunLockHeld
from waconsent.store.engine import dialect_insert
from waconsent.store.tables import locks, runs

LOCK_TTL = timedelta(minutes=10)


def _pid_namespace() -> str:
    """Tells containers that share a hostname apart (their PIDs are not comparable)."""
    try:
        return os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        return "-"


def node_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_pid_namespace()}:{uuid.uuid4().hex[:8]}"


def acquire_lock(
    engine: Engine, name: str, holder: str, now: datetime, ttl: timedelta = LOCK_TTL
) -> None:
    """Take the lease, or raise RunLockHeld; an expired lease (a dead node) is taken over."""
    with engine.begin() as connection:
        statement = dialect_insert(connection, locks).values(
            name=name, holder=holder, expires_at=now + ttl
        )
        statement = statement.on_conflict_do_update(
            index_elements=["name"],
            set_={"holder": holder, "expires_at": now + ttl},
            where=(locks.c.expires_at < now) | (locks.c.holder == holder),
        )
        connection.execute(statement)
        owner = connection.execute(select(locks.c.holder).where(locks.c.name == name)).scalar()
    if owner != holder and owner is not None and _holder_is_dead(str(owner)):
        with engine.begin() as connection:  # a crashed run on this very host: take over now
            connection.execute(
                update(locks)
                .where(locks.c.name == name, locks.c.holder == owner)
                .values(holder=holder, expires_at=now + ttl)
            )
            owner = connection.execute(select(locks.c.holder).where(locks.c.name == name)).scalar()
    if owner != holder:
        raise RunLockHeld(name, str(owner))


def _holder_is_dead(holder: str) -> bool:
    """True only when the holder ran on this host, in this PID namespace, and is gone."""
    parts = holder.split(":")
    if len(parts) != 4 or parts[0] != socket.gethostname() or parts[2] != _pid_namespace():
        return False
    pid_text = parts[1]
    if not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def refresh_lock(
    engine: Engine, name: str, holder: str, now: datetime, ttl: timedelta = LOCK_TTL
) -> None:
    """Extend the lease; raise RunLockHeld if it was lost (it expired and another node took it)."""
    with engine.begin() as connection:
        renewed = connection.execute(
            update(locks)
            .where(locks.c.name == name, locks.c.holder == holder)
            .values(expires_at=now + ttl)
        ).rowcount
        owner = (
            None
            if renewed
            else connection.execute(select(locks.c.holder).where(locks.c.name == name)).scalar()
        )
    if not renewed:
        raise RunLockHeld(name, str(owner or "nobody: the lease expired"))


def release_lock(engine: Engine, name: str, holder: str) -> None:
    with engine.begin() as connection:
        connection.execute(delete(locks).where(locks.c.name == name, locks.c.holder == holder))


@dataclass(frozen=True, slots=True)
class Watermarks:
    records: datetime | None
    events: int
    run_started: datetime | None = None  # when the run that set them began
    connector_state: str | None = None  # the connector's own cursor (a delta link)


def last_watermarks(connection: Connection, crm: str) -> Watermarks:
    """From the newest full or incremental run that finished its write-back (ok or partial).

    Targeted runs (a webhook revocation's immediate write-back) carry no watermarks.
    """
    row = connection.execute(
        select(
            runs.c.record_watermark,
            runs.c.event_watermark,
            runs.c.started_at,
            runs.c.connector_state,
        )
        .where(
            runs.c.crm == crm,
            runs.c.status.in_(("ok", "partial")),
            runs.c.record_watermark.is_not(None),
        )
        .order_by(runs.c.id.desc())
        .limit(1)
    ).first()
    if row is None:
        return Watermarks(None, 0)
    return Watermarks(
        row.record_watermark, row.event_watermark or 0, row.started_at, row.connector_state
    )


def last_full_size(connection: Connection, crm: str) -> int:
    """Records the newest finished full run read (0 before any): the org's size, as far as
    the ledger knows it without asking the CRM."""
    row = connection.execute(
        select(runs.c.counts)
        .where(runs.c.crm == crm, runs.c.mode == "full", runs.c.status.in_(("ok", "partial")))
        .order_by(runs.c.id.desc())
        .limit(1)
    ).first()
    counts = row.counts if row is not None else None
    return int(counts.get("records_read", 0)) if isinstance(counts, Mapping) else 0


def start_run(engine: Engine, crm: str, mode: str, node: str, now: datetime) -> int:
    with engine.begin() as connection:
        result = connection.execute(
            runs.insert().values(crm=crm, mode=mode, status="running", node=node, started_at=now)
        )
        return int(result.inserted_primary_key[0])  # type: ignore[index]


def finish_run(
    connection: Connection,
    run_id: int,
    status: str,
    now: datetime,
    counts: Mapping[str, Any],
    watermarks: Watermarks | None,
    error: str | None = None,
) -> None:
    values: dict[str, Any] = {
        "status": status,
        "finished_at": now,
        "counts": dict(counts),
        "error": error,
    }
    if watermarks is not None:
        values.update(
            record_watermark=watermarks.records,
            event_watermark=watermarks.events,
            connector_state=watermarks.connector_state,
        )
    connection.execute(update(runs).where(runs.c.id == run_id).values(**values))


def history(connection: Connection, limit: int = 50) -> list[Any]:
    return list(connection.execute(select(runs).order_by(runs.c.id.desc()).limit(limit)))


def finished_since(connection: Connection, crm: str, since: datetime) -> list[Any]:
    """The runs of `crm` started at or after `since`, oldest first, whatever their status
    (`waconsent report html` draws the trend of the finished ones and names a failed one)."""
    return list(
        connection.execute(
            select(runs)
            .where(runs.c.crm == crm, runs.c.started_at >= since, runs.c.status != "running")
            .order_by(runs.c.id)
        )
    )

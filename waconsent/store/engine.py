"""Opening the ledger: engine set-up per database, and migrations that run on first use.

SQLite gets WAL, foreign keys, a busy timeout and `BEGIN IMMEDIATE` write transactions
(so two writers queue up instead of failing a read-to-write upgrade); connections from
`reading()` begin deferred, so readers never block the writer. PostgreSQL
migrations run under an advisory lock so that nodes starting together migrate once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Connection,
    Engine,
    String,
    any_,
    bindparam,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry

from waconsent.errors import ConnectionFailed

MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATION_LOCK_KEY = 0x7761636F  # "waco": one advisory lock id for schema upgrades


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None  # let the "begin" hook below own transactions
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        read_only = connection.get_execution_options().get(READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


READ_ONLY = "waconsent_read_only"


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A connection for reads, its transaction ended when the block ends. On SQLite that
    transaction is deferred, so a long read (a sync's pages, `verify-ledger`, an export)
    never holds the write lock that webhook deliveries wait for; WAL lets readers and the
    one writer work side by side. Writes use `engine.begin()`, which takes the write lock
    up front (`BEGIN IMMEDIATE`)."""
    with engine.connect().execution_options(**{READ_ONLY: True}) as connection:
        try:
            yield connection
        finally:
            connection.rollback()


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


@cache
def _head_revision() -> str | None:
    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision; a no-op when it is already there."""
    with reading(engine) as probe:
        current = MigrationContext.configure(probe).get_current_revision()
    if current == _head_revision():
        return
    config = _alembic_config()
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"),
                               {"k": _MIGRATION_LOCK_KEY})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def open_engine(url: str, *, run_migrations: bool = True) -> Engine:
    """An engine for the ledger at `url`, migrated to the current schema."""
    kwargs: dict[str, Any] = {}
    if url.startswith("postgresql"):
        kwargs.update(pool_pre_ping=True, pool_size=5, max_overflow=10)
    if url.startswith("sqlite"):
        _ensure_sqlite_folder(url)
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        _sqlite_setup(engine)
    if run_migrations:
        try:
            migrate(engine)
        except OperationalError as exc:
            engine.dispose()
            raise ConnectionFailed(
                f"cannot open the store at {engine.url.render_as_string(hide_password=True)}: "
                f"{exc.orig}") from None
        except SQLAlchemyError:
            engine.dispose()
            raise
    return engine


def _ensure_sqlite_folder(url: str) -> None:
    path = url.split("///", 1)[1] if "///" in url else ""
    if path and path != ":memory:" and not path.startswith("file:"):
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)


def among(connection: Connection, column: ColumnElement[Any],
          values: Sequence[str] | Sequence[int]) -> ColumnElement[bool]:
    """`column IN (values)` with the values bound as one parameter: a JSON array on SQLite
    (`json_each`, built into SQLite since 3.38), an array on PostgreSQL.

    SQLAlchemy re-renders a plain IN list with a placeholder per value on every execution,
    and for the lookups of a full sync that rendering cost more than the lookups; one
    parameter keeps the compiled statement cached. Strings are bound as unbounded text: a
    cast to the column's `varchar(n)` would cut an over-long value and match its prefix.
    """
    if connection.dialect.name == "sqlite":
        listed = func.json_each(bindparam(None, json.dumps(list(values)), type_=String))
        return column.in_(select(listed.table_valued("value").c.value))
    item = String() if isinstance(column.type, String) else column.type
    return column == any_(bindparam(None, list(values), type_=ARRAY(item)))

"""Opening the ledger: engine set-up per database, and migrations that run on first use.

SQLite gets WAL, foreign keys, a busy timeout and `BEGIN IMMEDIATE` write transactions
(so two writers queue up instead of failing a read-to-write upgrade); connections from
`reading()` begin deferred, so readers never block the writer. PostgreSQL
migrations run under an advisory lock so that nodes starting together migrate once.

A URL the ledger cannot use (another driver, an in-memory SQLite database, a path under a
file) is a configuration error naming `store.url`. Engines hide SQL parameters from their
errors, and `store_failure` turns a store that is busy, read-only or unreachable into a
sentence (exit 3) chosen by the driver's error code, never by its message.
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
    Table,
    any_,
    bindparam,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DataError,
    DBAPIError,
    IntegrityError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.pool import ConnectionPoolEntry

from waconsent.errors import ConfigError, ConnectionFailed, FatalError

MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATION_LOCK_KEY = 0x7761636F  # "waco": one advisory lock id for schema upgrades
SUPPORTED_DRIVERS = {"sqlite": ("pysqlite",), "postgresql": ("psycopg",)}
# What the store raises for one value it will not hold (too long, a NUL byte, a violated
# constraint, text UTF-8 cannot encode: the drivers raise UnicodeEncodeError themselves,
# unwrapped). Retrying cannot heal it, so callers skip that one item; everything else (the
# store down, busy, read-only) is about the store, not the item, and must reach them.
REFUSED_VALUE = (DataError, IntegrityError, UnicodeEncodeError)
BUSY_TIMEOUT_SECONDS = 30.0  # SQLite: how long a writer waits for the lock (URL: ?timeout=)


def _sqlite_setup(engine: Engine, busy_timeout: float) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None  # let the "begin" hook below own transactions
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
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
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def open_engine(url: str, *, run_migrations: bool = True) -> Engine:
    """An engine for the ledger at `url`, migrated to the current schema.

    Raises ConfigError (naming `store.url`) for a URL the ledger cannot use, FatalError
    when the store cannot be opened or migrated.
    """
    parsed = check_store_url(url)
    # SQL parameters (numbers, names, IP addresses) never appear in an error's text
    kwargs: dict[str, Any] = {"hide_parameters": True}
    if parsed.get_backend_name() == "postgresql":
        kwargs.update(pool_pre_ping=True, pool_size=5, max_overflow=10)
    busy_timeout = BUSY_TIMEOUT_SECONDS
    if parsed.get_backend_name() == "sqlite":
        _ensure_sqlite_folder(parsed)
        busy_timeout = _query_seconds(parsed, "timeout", BUSY_TIMEOUT_SECONDS)
    engine = create_engine(parsed, **kwargs)
    if engine.dialect.name == "sqlite":
        _sqlite_setup(engine, busy_timeout)
    if run_migrations:
        try:
            migrate(engine)
        except DBAPIError as exc:
            engine.dispose()
            failure = store_failure(exc)
            if failure is None:
                raise
            where = engine.url.render_as_string(hide_password=True)
            raise ConnectionFailed(f"{failure} (store.url = {where})") from None
        except SQLAlchemyError:
            engine.dispose()
            raise
    return engine


def check_store_url(url: str) -> URL:
    """The parsed URL, or a ConfigError naming `store.url`: only SQLite files and
    PostgreSQL through psycopg 3 are ledgers (SQLite in memory vanishes at exit, and each
    command, and each of the receiver's connections, would see another empty database)."""
    example = "sqlite:///waconsent.db or postgresql+psycopg://user@host/db"
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError([f"store.url: not a database URL; expected {example}"]) from None
    backend, _, driver = parsed.drivername.partition("+")
    if backend not in SUPPORTED_DRIVERS:
        raise ConfigError(
            [f"store.url: the {backend!r} database is not supported; expected {example}"]
        )
    if driver and driver not in SUPPORTED_DRIVERS[backend]:
        raise ConfigError(
            [
                f"store.url: the driver {driver!r} is not supported; expected "
                f"{backend}+{SUPPORTED_DRIVERS[backend][0]}://..."
            ]
        )
    if backend == "postgresql" and not driver:
        raise ConfigError(
            [
                "store.url: name the driver: postgresql+psycopg://... (psycopg 3 "
                "is the one installed)"
            ]
        )
    if backend == "sqlite":
        database = parsed.database or ""
        in_memory = (
            database in ("", ":memory:")
            or database.startswith("file::memory:")
            or parsed.query.get("mode") == "memory"
        )
        if in_memory:
            raise ConfigError(
                [
                    "store.url: names no database file, so SQLite would keep the ledger in "
                    "memory (lost at exit, unseen by every other command); expected a file such "
                    "as sqlite:///waconsent.db"
                ]
            )
    return parsed


def _query_seconds(parsed: URL, name: str, default: float) -> float:
    raw = parsed.query.get(name)
    if raw is None:
        return default
    try:
        return float(raw if isinstance(raw, str) else raw[-1])
    except ValueError:
        raise ConfigError([f"store.url: ?{name}= expects seconds, got {raw!r}"]) from None


def _ensure_sqlite_folder(parsed: URL) -> None:
    """Create the database file's folder; a path that runs through a file is a
    configuration error, not a traceback."""
    database = parsed.database or ""
    if database.startswith("file:"):
        return  # a SQLite URI names its own file
    path = Path(database).expanduser()
    if path.is_dir():
        raise ConfigError(
            [
                f"store.url: {path} is a folder; name a database file in it, "
                f"such as {path / 'waconsent.db'}"
            ]
        )
    for ancestor in path.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ConfigError(
                    [f"store.url: {path} lies under {ancestor}, which is a file, not a folder"]
                )
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            [
                f"store.url: cannot create the folder {path.parent}: "
                f"{exc.strerror or type(exc).__name__}"
            ]
        ) from None


# What a store error means for the caller, by code: SQLite's primary result codes,
# PostgreSQL's SQLSTATE (exact, then by class).
_SQLITE_MEANING = {
    5: "busy",
    6: "busy",
    8: "read-only",
    3: "unreachable",
    14: "unreachable",
    23: "unreachable",
    26: "unreachable",
    13: "full",
    10: "failing",
    11: "failing",
}
_POSTGRES_MEANING = {
    "55P03": "busy",
    "57014": "busy",
    "40P01": "busy",
    "40001": "busy",
    "25006": "read-only",
    "53100": "full",
    "53300": "unreachable",
    "3D000": "unreachable",
    "57P01": "unreachable",
    "57P02": "unreachable",
    "57P03": "unreachable",
}
_POSTGRES_CLASS_MEANING = {"08": "unreachable", "28": "unreachable", "58": "failing"}
_SENTENCES = {
    "busy": "the store is busy: another process held its lock longer than the store waits "
    "(on SQLite {timeout:g} s unless store.url sets ?timeout=SECONDS); try again "
    "when it is done",
    "read-only": "the store is read-only (the SQLite file or its folder is not writable, or "
    "the PostgreSQL session is read-only), so nothing could be written",
    "unreachable": "cannot open the store named by store.url (the file cannot be opened, or "
    "the server refused or did not answer)",
    "full": "the store's disk is full",
    "failing": "the store reported an I/O error or a damaged database",
}


def store_failure(exc: DBAPIError) -> FatalError | None:
    """A sentence for a store that cannot serve (busy, read-only, unreachable, full),
    chosen by the driver's error code; None for an error that is not about the store's
    state (a refused value, a bug), which the caller reports by type only."""
    original = exc.orig
    meaning: str | None = None
    sqlite_code = getattr(original, "sqlite_errorcode", None)
    sqlstate = getattr(original, "sqlstate", None)
    if isinstance(sqlite_code, int):
        meaning = _SQLITE_MEANING.get(sqlite_code & 0xFF)
    elif isinstance(sqlstate, str):
        meaning = _POSTGRES_MEANING.get(sqlstate) or _POSTGRES_CLASS_MEANING.get(sqlstate[:2])
    elif isinstance(exc, OperationalError):
        meaning = "unreachable"  # a connection that failed before the server said anything
    if meaning is None:
        return None
    code = sqlstate or getattr(original, "sqlite_errorname", None) or type(original).__name__
    sentence = _SENTENCES[meaning].format(timeout=BUSY_TIMEOUT_SECONDS)
    return ConnectionFailed(f"{sentence} [{code}]")


def among(
    connection: Connection, column: ColumnElement[Any], values: Sequence[str] | Sequence[int]
) -> ColumnElement[bool]:
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


def dialect_insert(connection: Connection, table: Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT in the connection's own dialect: only the dialects' inserts can say what to
    do on a conflict (`ON CONFLICT`), which the generic one cannot."""
    if connection.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def insert_ignoring(
    connection: Connection, table: Table, index_elements: Sequence[str]
) -> postgresql.Insert | sqlite.Insert:
    """An INSERT that skips a row whose `index_elements` are already stored: the way the
    ledger stays idempotent when the same delivery, link or trigger arrives twice."""
    return dialect_insert(connection, table).on_conflict_do_nothing(
        index_elements=list(index_elements)
    )

"""Alembic environment: always handed a live connection by waconsent.store.engine."""

from alembic import context

from waconsent.store.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only `alembic` on the command line gets here
    raise RuntimeError("run migrations through waconsent (they run on first use)")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()

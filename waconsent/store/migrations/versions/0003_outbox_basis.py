"""Outbox rows remember the consent values their decision was based on.

A queued write is only sent while the CRM still holds those values; a record someone
changed since is decided afresh instead of being overwritten with a stale decision.
On SQLite the table is rebuilt with AUTOINCREMENT, so a row id is never reused: a run
tells the rows it already tried apart from rows queued after them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    with op.batch_alter_table(
        "outbox",
        schema=None,
        recreate="always" if sqlite else "auto",
        table_kwargs={"sqlite_autoincrement": True},
    ) as batch_op:
        batch_op.add_column(sa.Column("basis", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_column("basis")

"""Runs keep the connector's own cursor (Dataverse's change-tracking delta link).

Saved with the watermarks after write-back, handed back to the connector by the next
run, so change tracking works across `waconsent sync` processes, not only within one.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("connector_state", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("connector_state")

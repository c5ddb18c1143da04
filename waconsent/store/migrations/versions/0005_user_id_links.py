"""Changed business-scoped user ids are followed.

Events keep the new user id a change announced (`new_user_id`), and `identity_links`
holds the keys a change joined (previous id and new id, and the number and the new id),
both ways round, so a later event that carries only the new id reaches the records of
the old one.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("new_user_id", sa.String(length=128), nullable=True))
    op.create_table(
        "identity_links",
        sa.Column("key", sa.String(length=140), nullable=False),
        sa.Column("linked_key", sa.String(length=140), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event_key", sa.String(length=300), nullable=False),
        sa.PrimaryKeyConstraint("key", "linked_key"),
    )


def downgrade() -> None:
    op.drop_table("identity_links")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_column("new_user_id")

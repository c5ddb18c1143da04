"""Contacts: one index on (modified_at, id) so changed-since reads page by keyset.

With only modified_at indexed, SQLite sorted every row sharing a timestamp (a bulk
import gives them all one) for each page: quadratic on large ledgers.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("contacts", schema=None) as batch_op:
        batch_op.drop_index("ix_contacts_modified_at")
        batch_op.create_index("ix_contacts_modified_id", ["modified_at", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("contacts", schema=None) as batch_op:
        batch_op.drop_index("ix_contacts_modified_id")
        batch_op.create_index("ix_contacts_modified_at", ["modified_at"], unique=False)

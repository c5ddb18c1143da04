"""The consent snapshot's digest: a full sync asks, for every record, whether what it would
keep differs from what is held. Reading one short digest per record answers that without
reading and parsing every held field (it was a fifth of an idle full sync). Rows written
before this revision have none, so the next sync rewrites them once.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("consent_snapshot", sa.Column("digest", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("consent_snapshot") as batch:
        batch.drop_column("digest")

"""The consent snapshot (issue 16): per record and match key, the consent fields the last
sync read or wrote, for the pre-send check (`audience check`, `/v1/consent`).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    moment = sa.DateTime(timezone=True)
    op.create_table(
        "consent_snapshot",
        sa.Column("crm", sa.String(length=300), primary_key=True),
        sa.Column("key", sa.String(length=140), primary_key=True),
        sa.Column("record_id", sa.String(length=100), primary_key=True),
        sa.Column("tail", sa.String(length=8), nullable=True),
        sa.Column("keys", sa.Text(), nullable=False),
        sa.Column("opt_in", sa.Boolean(), nullable=True),
        sa.Column("opt_in_date", moment, nullable=True),
        sa.Column("opt_out_date", moment, nullable=True),
        sa.Column("proof_complete", sa.Boolean(), nullable=False),
        sa.Column("session_expires", moment, nullable=True),
        sa.Column("synced_at", moment, nullable=False),
        sa.Column("run_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
    )
    op.create_index("ix_consent_snapshot_record", "consent_snapshot", ["crm", "record_id"])
    op.create_index("ix_consent_snapshot_tail", "consent_snapshot", ["crm", "tail"])


def downgrade() -> None:
    op.drop_table("consent_snapshot")

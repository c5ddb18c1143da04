"""The reply channel: confirmation replies to START and STOP, one row per trigger.

`trigger_id` (the message id of the user's START or STOP) is unique, so redeliveries,
restarts and several receivers on one store queue one reply at most. The states of a row
are drawn in `waconsent.replies.rules`.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    moment = sa.DateTime(timezone=True)
    op.create_table(
        "replies",
        sa.Column("id", _id(), primary_key=True, autoincrement=True),
        sa.Column("trigger_id", sa.String(length=200), nullable=False),
        sa.Column("trigger_key", sa.String(length=300), nullable=False),
        sa.Column("wa_id", sa.String(length=64), nullable=True),
        sa.Column("user_id", sa.String(length=128), nullable=True),
        sa.Column("phone_key", sa.String(length=32), nullable=True),
        sa.Column("uid_key", sa.String(length=140), nullable=True),
        sa.Column("signal", sa.String(length=20), nullable=False),
        sa.Column("keyword", sa.String(length=100), nullable=True),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("text_sha256", sa.String(length=64), nullable=False),
        sa.Column("triggered_at", moment, nullable=False),
        sa.Column("queued_at", moment, nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("next_attempt_at", moment, nullable=False),
        sa.Column("rounds", sa.Integer(), nullable=False),
        sa.Column("holder", sa.String(length=200), nullable=True),
        sa.Column("lease_until", moment, nullable=True),
        sa.Column("sending_since", moment, nullable=True),
        sa.Column("reply_id", sa.String(length=200), nullable=True),
        sa.Column("sent_at", moment, nullable=True),
        sa.Column("delivered_at", moment, nullable=True),
        sa.Column("read_at", moment, nullable=True),
        sa.Column("settled_at", moment, nullable=True),
        sa.Column("error_code", sa.String(length=32), nullable=True),
        sa.Column("error", sa.String(length=300), nullable=True),
        sa.UniqueConstraint("trigger_id", name="uq_replies_trigger_id"),
    )
    op.create_index("ix_replies_phone_key", "replies", ["phone_key"])
    op.create_index("ix_replies_uid_key", "replies", ["uid_key"])
    op.create_index("ix_replies_reply_id", "replies", ["reply_id"])
    op.create_index("ix_replies_due", "replies", ["state", "next_attempt_at"])


def downgrade() -> None:
    op.drop_table("replies")

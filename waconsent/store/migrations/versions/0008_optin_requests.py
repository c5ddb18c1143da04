"""Website opt-in requests (issue 15), and on `events` the website opt-in a message confirmed.

`optin_requests.token_hash` is the SHA-256 of the one-time token and unique; the token itself
is never stored. `events.opt_in_ip` / `events.opt_in_form` carry the form's IP and
`form:<form id>:token:<hash prefix>` into the rules with the confirming message.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    moment = sa.DateTime(timezone=True)
    op.create_table(
        "optin_requests",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", moment, nullable=False),
        sa.Column("expires_at", moment, nullable=False),
        sa.Column("client_ip", sa.String(length=64), nullable=True),
        sa.Column("user_agent", sa.String(length=300), nullable=True),
        sa.Column("page", sa.String(length=500), nullable=True),
        sa.Column("form_id", sa.String(length=64), nullable=False),
        sa.Column("wording", sa.Text(), nullable=False),
        sa.Column("wording_sha256", sa.String(length=64), nullable=False),
        sa.Column("business", sa.String(length=200), nullable=False),
        sa.Column("phone_key", sa.String(length=32), nullable=True),
        sa.Column("confirmed_at", moment, nullable=True),
        sa.Column("message_id", sa.String(length=200), nullable=True),
        sa.Column("confirmed_by", sa.String(length=64), nullable=True),
        sa.UniqueConstraint("token_hash", name="uq_optin_requests_token_hash"),
    )
    op.create_index("ix_optin_requests_expires_at", "optin_requests", ["expires_at"])
    op.create_index("ix_optin_requests_message_id", "optin_requests", ["message_id"])
    # plain ADD COLUMN (nullable, no default): instant on both databases, whatever the size
    op.add_column("events", sa.Column("opt_in_ip", sa.String(length=64), nullable=True))
    op.add_column("events", sa.Column("opt_in_form", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.drop_column("opt_in_form")
        batch.drop_column("opt_in_ip")
    op.drop_table("optin_requests")

"""Initial schema: events, evidence chain, phone index, ledger contacts, runs, outbox, locks.

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER only

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "contacts",
        sa.Column("id", sa.String(length=100), nullable=False),
        sa.Column("name", sa.String(length=300), nullable=True),
        sa.Column("mobile_phone", sa.String(length=100), nullable=True),
        sa.Column("phone", sa.String(length=100), nullable=True),
        sa.Column("opt_in", sa.Boolean(), nullable=True),
        sa.Column("opt_in_date", sa.DateTime(timezone=True), nullable=True),
        sa.Column("opt_in_ip", sa.String(length=100), nullable=True),
        sa.Column("opt_in_source", sa.String(length=500), nullable=True),
        sa.Column("opt_out_date", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_inbound", sa.DateTime(timezone=True), nullable=True),
        sa.Column("session_expires", sa.DateTime(timezone=True), nullable=True),
        sa.Column("proof_missing", sa.Boolean(), nullable=True),
        sa.Column("whatsapp_user_id", sa.String(length=140), nullable=True),
        sa.Column("modified_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("contacts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_contacts_modified_at"), ["modified_at"], unique=False)

    op.create_table(
        "events",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("key", sa.String(length=300), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("wa_id", sa.String(length=64), nullable=True),
        sa.Column("user_id", sa.String(length=128), nullable=True),
        sa.Column("phone_key", sa.String(length=32), nullable=True),
        sa.Column("uid_key", sa.String(length=140), nullable=True),
        sa.Column("message_id", sa.String(length=200), nullable=True),
        sa.Column("message_type", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=True),
        sa.Column("error_codes", sa.String(length=200), nullable=True),
        sa.Column("signal", sa.String(length=20), nullable=False),
        sa.Column("keyword", sa.String(length=100), nullable=True),
        sa.Column("opens_session", sa.Boolean(), nullable=False),
        sa.Column("window_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("referral_source_id", sa.String(length=200), nullable=True),
        sa.Column("new_wa_id", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.String(length=200), nullable=True),
        sa.Column("source", sa.String(length=300), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_events_phone_key"), ["phone_key"], unique=False)
        batch_op.create_index(batch_op.f("ix_events_uid_key"), ["uid_key"], unique=False)

    op.create_table(
        "evidence",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("phone_key", sa.String(length=32), nullable=True),
        sa.Column("uid_key", sa.String(length=140), nullable=True),
        sa.Column("record_id", sa.String(length=100), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("hash"),
    )
    with op.batch_alter_table("evidence", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_evidence_phone_key"), ["phone_key"], unique=False)
        batch_op.create_index(batch_op.f("ix_evidence_record_id"), ["record_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_evidence_uid_key"), ["uid_key"], unique=False)

    op.create_table(
        "evidence_head",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("last_id", ID, nullable=False),
        sa.Column("last_hash", sa.String(length=64), nullable=False),
        sa.Column("count", ID, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "locks",
        sa.Column("name", sa.String(length=300), nullable=False),
        sa.Column("holder", sa.String(length=200), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "outbox",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("crm", sa.String(length=300), nullable=False),
        sa.Column("record_id", sa.String(length=100), nullable=False),
        sa.Column("priority", sa.SmallInteger(), nullable=False),
        sa.Column("changes", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("run_id", ID, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("error_code", sa.String(length=100), nullable=True),
        sa.Column("permanent", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("crm", "record_id", name="uq_outbox_record"),
    )
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.create_index(
            "ix_outbox_send_order", ["crm", "permanent", "priority", "id"], unique=False
        )

    op.create_table(
        "phone_index",
        sa.Column("crm", sa.String(length=300), nullable=False),
        sa.Column("key", sa.String(length=140), nullable=False),
        sa.Column("record_id", sa.String(length=100), nullable=False),
        sa.Column("field", sa.String(length=100), nullable=False),
        sa.Column("raw", sa.String(length=200), nullable=True),
        sa.Column("seen_run", ID, nullable=True),
        sa.PrimaryKeyConstraint("crm", "key", "record_id", "field"),
    )
    with op.batch_alter_table("phone_index", schema=None) as batch_op:
        batch_op.create_index("ix_phone_index_record", ["crm", "record_id"], unique=False)

    op.create_table(
        "runs",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("crm", sa.String(length=300), nullable=False),
        sa.Column("mode", sa.String(length=20), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("node", sa.String(length=200), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("record_watermark", sa.DateTime(timezone=True), nullable=True),
        sa.Column("event_watermark", ID, nullable=True),
        sa.Column("counts", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_runs_crm"), ["crm"], unique=False)
    evidence_head = sa.table(
        "evidence_head",
        sa.column("id", sa.Integer),
        sa.column("last_id", ID),
        sa.column("last_hash", sa.String),
        sa.column("count", ID),
    )
    # The chain's head exists from the start, so concurrent first appends lock one row.
    op.bulk_insert(evidence_head, [{"id": 1, "last_id": 0, "last_hash": "0" * 64, "count": 0}])


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_runs_crm"))

    op.drop_table("runs")
    with op.batch_alter_table("phone_index", schema=None) as batch_op:
        batch_op.drop_index("ix_phone_index_record")

    op.drop_table("phone_index")
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_outbox_send_order")

    op.drop_table("outbox")
    op.drop_table("locks")
    op.drop_table("evidence_head")
    with op.batch_alter_table("evidence", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_evidence_uid_key"))
        batch_op.drop_index(batch_op.f("ix_evidence_record_id"))
        batch_op.drop_index(batch_op.f("ix_evidence_phone_key"))

    op.drop_table("evidence")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_events_uid_key"))
        batch_op.drop_index(batch_op.f("ix_events_phone_key"))

    op.drop_table("events")
    with op.batch_alter_table("contacts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_contacts_modified_at"))

    op.drop_table("contacts")

"""outbox tables: streams, lanes, events, deliveries, records

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

if TYPE_CHECKING:
    from collections.abc import Sequence

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOW = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "outbox_stream",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column(
            "key", sa.Text(), nullable=False, comment="canonical JSON of shared_stream_key()"
        ),
        sa.Column("trigger_class", sa.Text(), nullable=False),
        sa.Column("trigger_kwargs", postgresql.JSONB(), nullable=False),
        sa.Column("ack_timeout", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_stream")),
        sa.UniqueConstraint("key", name=op.f("uq_outbox_stream_key")),
    )
    op.create_table(
        "outbox_lane",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("stream_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "lane_key", sa.Text(), nullable=False, comment="canonical JSON of get_advance_lane()"
        ),
        sa.Column("next_position", sa.BigInteger(), server_default=sa.text("1"), nullable=False),
        sa.Column("advanced_through", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("lease_owner", sa.Text(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("fencing_token", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("stalled_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retry_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "advanced_through < next_position",
            name=op.f("ck_outbox_lane_cursor_behind_allocation"),
        ),
        sa.ForeignKeyConstraint(
            ["stream_id"],
            ["outbox_stream.id"],
            name=op.f("fk_outbox_lane_stream_id_outbox_stream"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_lane")),
        sa.UniqueConstraint(
            "stream_id", "lane_key", name=op.f("uq_outbox_lane_stream_id_lane_key")
        ),
    )
    op.create_table(
        "outbox_event",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("stream_id", sa.BigInteger(), nullable=False),
        sa.Column("lane_id", sa.BigInteger(), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("identity", sa.Text(), nullable=True),
        sa.Column("raw", postgresql.JSONB(), nullable=True),
        sa.Column("payload", postgresql.JSONB(), nullable=True),
        sa.Column(
            "snapshot",
            postgresql.JSONB(),
            nullable=False,
            comment="subscribers that must resolve it",
        ),
        sa.Column("pending", sa.Integer(), nullable=False),
        sa.Column("acked", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("failed", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("rejected", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("pending >= 0", name=op.f("ck_outbox_event_pending_not_negative")),
        sa.ForeignKeyConstraint(
            ["lane_id"],
            ["outbox_lane.id"],
            name=op.f("fk_outbox_event_lane_id_outbox_lane"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["stream_id"],
            ["outbox_stream.id"],
            name=op.f("fk_outbox_event_stream_id_outbox_stream"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_event")),
        sa.UniqueConstraint("lane_id", "position", name=op.f("uq_outbox_event_lane_id_position")),
    )
    op.create_index(
        "ix_outbox_event_identity",
        "outbox_event",
        ["stream_id", "identity"],
        postgresql_where=sa.text("identity IS NOT NULL"),
    )
    op.create_index(
        "ix_outbox_event_pending_age",
        "outbox_event",
        ["created_at"],
        postgresql_where=sa.text("pending > 0"),
    )
    op.create_table(
        "outbox_delivery",
        sa.Column("event_id", sa.BigInteger(), nullable=False),
        sa.Column("subscriber", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.CheckConstraint(
            "state IN ('acked', 'rejected', 'failed')", name=op.f("ck_outbox_delivery_state_known")
        ),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["outbox_event.id"],
            name=op.f("fk_outbox_delivery_event_id_outbox_event"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("event_id", "subscriber", name=op.f("pk_outbox_delivery")),
    )
    op.create_table(
        "outbox_record",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("stream_id", sa.BigInteger(), nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=True),
        sa.Column("subscriber", sa.Text(), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("payload", postgresql.JSONB(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["outbox_event.id"],
            name=op.f("fk_outbox_record_event_id_outbox_event"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["stream_id"],
            ["outbox_stream.id"],
            name=op.f("fk_outbox_record_stream_id_outbox_stream"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_record")),
        sa.UniqueConstraint(
            "event_id",
            "subscriber",
            "ordinal",
            name=op.f("uq_outbox_record_event_id_subscriber_ordinal"),
        ),
    )
    op.create_index(
        "ix_outbox_record_undispatched",
        "outbox_record",
        ["stream_id", "id"],
        postgresql_where=sa.text("dispatched_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_outbox_record_undispatched",
        table_name="outbox_record",
        postgresql_where=sa.text("dispatched_at IS NULL"),
    )
    op.drop_table("outbox_record")
    op.drop_table("outbox_delivery")
    op.drop_index(
        "ix_outbox_event_pending_age",
        table_name="outbox_event",
        postgresql_where=sa.text("pending > 0"),
    )
    op.drop_index(
        "ix_outbox_event_identity",
        table_name="outbox_event",
        postgresql_where=sa.text("identity IS NOT NULL"),
    )
    op.drop_table("outbox_event")
    op.drop_table("outbox_lane")
    op.drop_table("outbox_stream")

"""who owes an event is decided by Postgres: triggerer sessions and stream subscribers

A triggerer process (its manager) holds a session it renews; each subscriber of a stream, on
whichever triggerer, is registered with the session it runs in, and gets a new registration id
each time it joins. An event's ``snapshot`` becomes an object: each subscriber that must resolve
it, with the registration it is owed through (``null`` for events recorded before this revision).
A delivery owed through a registration that is no longer current, or whose session is no longer
live, is failed by the sweep at once. A stream records which session runs its producer
(``consumer_session``) and whether it may be advanced by any committer or only by that process
(``advance_in``).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

if TYPE_CHECKING:
    from collections.abc import Sequence

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "outbox_session",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("owner", sa.Text(), nullable=False, comment="host:pid:random of the process"),
        sa.Column(
            "started_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_session")),
    )
    op.create_table(
        "outbox_subscriber",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("stream_id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False, comment="str(trigger_id)"),
        sa.Column("session_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "excluded",
            sa.Boolean(),
            server_default=sa.text("false"),
            nullable=False,
            comment="failed or leaving: in no new snapshot",
        ),
        sa.Column(
            "joined_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["outbox_session.id"],
            name=op.f("fk_outbox_subscriber_session_id_outbox_session"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["stream_id"],
            ["outbox_stream.id"],
            name=op.f("fk_outbox_subscriber_stream_id_outbox_stream"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_subscriber")),
        sa.UniqueConstraint("stream_id", "name", name=op.f("uq_outbox_subscriber_stream_id_name")),
    )
    op.create_index(
        "ix_outbox_subscriber_session_id", "outbox_subscriber", ["session_id"], unique=False
    )
    op.add_column(
        "outbox_stream",
        sa.Column(
            "consumer_session",
            sa.BigInteger(),
            nullable=True,
            comment="the triggerer session whose manager runs the producer (reads the broker)",
        ),
    )
    op.create_foreign_key(
        op.f("fk_outbox_stream_consumer_session_outbox_session"),
        "outbox_stream",
        "outbox_session",
        ["consumer_session"],
        ["id"],
        ondelete="SET NULL",
    )
    op.add_column(
        "outbox_stream",
        sa.Column(
            "advance_in",
            sa.Text(),
            server_default=sa.text("'anywhere'"),
            nullable=False,
            comment="'consumer': only the process that reads the broker may advance it",
        ),
    )
    op.create_check_constraint(
        op.f("ck_outbox_stream_advance_in_known"),
        "outbox_stream",
        "advance_in IN ('anywhere', 'consumer')",
    )
    op.execute(
        """
        UPDATE outbox_event
        SET snapshot = (SELECT coalesce(jsonb_object_agg(name, 'null'::jsonb), '{}'::jsonb)
                        FROM jsonb_array_elements_text(snapshot) AS s(name))
        WHERE jsonb_typeof(snapshot) = 'array'
        """
    )
    op.alter_column(
        "outbox_event",
        "snapshot",
        comment="subscribers that must resolve it, each with the registration it is owed through",
        existing_comment="subscribers that must resolve it",
        existing_type=postgresql.JSONB(),
        existing_nullable=False,
    )


def downgrade() -> None:
    op.alter_column(
        "outbox_event",
        "snapshot",
        comment="subscribers that must resolve it",
        existing_comment=(
            "subscribers that must resolve it, each with the registration it is owed through"
        ),
        existing_type=postgresql.JSONB(),
        existing_nullable=False,
    )
    op.execute(
        """
        UPDATE outbox_event
        SET snapshot = (SELECT coalesce(jsonb_agg(name ORDER BY name), '[]'::jsonb)
                        FROM jsonb_object_keys(snapshot) AS s(name))
        WHERE jsonb_typeof(snapshot) = 'object'
        """
    )
    op.drop_constraint(op.f("ck_outbox_stream_advance_in_known"), "outbox_stream", type_="check")
    op.drop_column("outbox_stream", "advance_in")
    op.drop_constraint(
        op.f("fk_outbox_stream_consumer_session_outbox_session"),
        "outbox_stream",
        type_="foreignkey",
    )
    op.drop_column("outbox_stream", "consumer_session")
    op.drop_index("ix_outbox_subscriber_session_id", table_name="outbox_subscriber")
    op.drop_table("outbox_subscriber")
    op.drop_table("outbox_session")

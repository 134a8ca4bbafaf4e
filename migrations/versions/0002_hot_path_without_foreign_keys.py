"""drop the foreign keys of the two hot tables (deliveries and records)

Each resolution inserts deliveries and records; their foreign-key checks cost about a third of
it. Both are only ever written in the transaction that reads or writes their event, and pruning
deletes a pruned event's deliveries and detaches its records itself.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from alembic import op

if TYPE_CHECKING:
    from collections.abc import Sequence

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint(
        "fk_outbox_delivery_event_id_outbox_event", "outbox_delivery", type_="foreignkey"
    )
    op.drop_constraint(
        "fk_outbox_record_event_id_outbox_event", "outbox_record", type_="foreignkey"
    )
    op.drop_constraint(
        "fk_outbox_record_stream_id_outbox_stream", "outbox_record", type_="foreignkey"
    )
    op.alter_column(
        "outbox_record", "event_id", comment="NULL for fast-path records and once pruned"
    )


def downgrade() -> None:
    op.alter_column("outbox_record", "event_id", comment=None)
    op.create_foreign_key(
        "fk_outbox_record_stream_id_outbox_stream",
        "outbox_record",
        "outbox_stream",
        ["stream_id"],
        ["id"],
        ondelete="CASCADE",
    )
    op.create_foreign_key(
        "fk_outbox_record_event_id_outbox_event",
        "outbox_record",
        "outbox_event",
        ["event_id"],
        ["id"],
        ondelete="SET NULL",
    )
    op.create_foreign_key(
        "fk_outbox_delivery_event_id_outbox_event",
        "outbox_delivery",
        "outbox_event",
        ["event_id"],
        ["id"],
        ondelete="CASCADE",
    )

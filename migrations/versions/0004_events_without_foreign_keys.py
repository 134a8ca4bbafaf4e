"""drop the foreign keys of outbox_event

Each recorded event paid for two referential checks (its stream and its lane), about half of
what recording it costs the server. An event row is only ever written by the store, with a
stream and lane it has just read or created, and neither is ever deleted, so the checks guarded
nothing that happens.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from alembic import op

if TYPE_CHECKING:
    from collections.abc import Sequence

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint(
        "fk_outbox_event_stream_id_outbox_stream", "outbox_event", type_="foreignkey"
    )
    op.drop_constraint("fk_outbox_event_lane_id_outbox_lane", "outbox_event", type_="foreignkey")


def downgrade() -> None:
    op.create_foreign_key(
        "fk_outbox_event_stream_id_outbox_stream",
        "outbox_event",
        "outbox_stream",
        ["stream_id"],
        ["id"],
        ondelete="CASCADE",
    )
    op.create_foreign_key(
        "fk_outbox_event_lane_id_outbox_lane",
        "outbox_event",
        "outbox_lane",
        ["lane_id"],
        ["id"],
        ondelete="CASCADE",
    )

"""record where each lane's broker acknowledgement is held

A producer that cannot acknowledge past an event (Kafka: a held message stops the partition's
commit) says so after each advance (``describe_hold``); the committer records it on the lane with
the time it began, for ``outbox status`` and the metrics, and prune keeps the lane's events from
the held one on (they deduplicate its redelivery).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import op

if TYPE_CHECKING:
    from collections.abc import Sequence

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "outbox_lane",
        sa.Column(
            "held_identity",
            sa.Text(),
            comment="the event the lane's broker acknowledgement is held at, as its producer said",
        ),
    )
    op.add_column(
        "outbox_lane",
        sa.Column("held_since", sa.DateTime(timezone=True), comment="when that hold began"),
    )


def downgrade() -> None:
    op.drop_column("outbox_lane", "held_since")
    op.drop_column("outbox_lane", "held_identity")

"""which triggerer session recorded each event

A subscriber whose triggerer stops or dies stays owed the stream's events (its registration is
"away") for up to the stream's ack timeout, so that it misses nothing while it restarts or moves
to another triggerer: joining again moves what its earlier registration was owed to the new
one. An event without identity whose recording triggerer is gone is failed instead (the broker
delivers it again to whoever reads the stream next, as a new event): ``recorded_by`` says who
recorded it.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import op

if TYPE_CHECKING:
    from collections.abc import Sequence

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "outbox_event",
        sa.Column(
            "recorded_by",
            sa.BigInteger(),
            nullable=True,
            comment="the triggerer session that recorded it (or last re-recorded it)",
        ),
    )


def downgrade() -> None:
    op.drop_column("outbox_event", "recorded_by")

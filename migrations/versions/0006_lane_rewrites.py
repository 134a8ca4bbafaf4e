"""count, per lane, the redeliveries that changed one of its events

A committer moved a lane's cursor in a transaction of two statements (lock the lane, then compare
the version of every advanced event with the one it had read): four round trips, and a read of
every advanced event again. A redelivery that re-opens an event or refreshes its payload now counts
up its lane's ``rewrites`` (it holds the lane's row lock anyway), and the cursor moves, in one
statement, only if ``rewrites`` is still what the committer read with the events.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import op

if TYPE_CHECKING:
    from collections.abc import Sequence

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "outbox_lane",
        sa.Column(
            "rewrites",
            sa.BigInteger(),
            nullable=False,
            server_default=sa.text("0"),
            comment="redeliveries that changed one of the lane's events (a cursor move checks it)",
        ),
    )


def downgrade() -> None:
    op.drop_column("outbox_lane", "rewrites")

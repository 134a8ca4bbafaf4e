"""let resolution counter updates of events stay HOT

The partial index on unresolved events' age (``WHERE pending > 0``) made every resolution's
``pending`` update write all of the event's indexes. The ack-timeout sweep now scans each lane's
backlog after its cursor instead, and event pages keep free space for in-page (HOT) updates.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import op

if TYPE_CHECKING:
    from collections.abc import Sequence

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index(
        "ix_outbox_event_pending_age",
        table_name="outbox_event",
        postgresql_where=sa.text("pending > 0"),
    )
    op.execute("ALTER TABLE outbox_event SET (fillfactor = 80)")


def downgrade() -> None:
    op.execute("ALTER TABLE outbox_event RESET (fillfactor)")
    op.create_index(
        "ix_outbox_event_pending_age",
        "outbox_event",
        ["created_at"],
        postgresql_where=sa.text("pending > 0"),
    )

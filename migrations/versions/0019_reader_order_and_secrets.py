"""the reader's claim in event order

``ix_outbox_record_undispatched`` orders a stream's undispatched records by event (then id), the
order the reader hands them out in: record ids do not follow events when a large write batch is
split into transactions run concurrently.

Revision ID: 0019
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import op

if TYPE_CHECKING:
    from collections.abc import Sequence

revision: str = "0019"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_outbox_record_undispatched", table_name="outbox_record")
    op.create_index(
        "ix_outbox_record_undispatched",
        "outbox_record",
        ["stream_id", sa.text("event_id NULLS FIRST"), "id"],
        postgresql_where=sa.text("dispatched_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_record_undispatched", table_name="outbox_record")
    op.create_index(
        "ix_outbox_record_undispatched",
        "outbox_record",
        ["stream_id", "id"],
        postgresql_where=sa.text("dispatched_at IS NULL"),
    )

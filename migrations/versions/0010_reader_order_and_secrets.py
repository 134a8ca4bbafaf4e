"""the reader's claim in event order; trigger kwargs encrypted at rest

* ``ix_outbox_record_undispatched`` orders a stream's undispatched records by event (then id),
  the order the reader hands them out in: record ids do not follow events when a large write
  batch is split into transactions run concurrently.
* ``outbox_stream.trigger_kwargs_encrypted``: the kwargs as a Fernet token when a key is
  configured (``trigger_kwargs`` is then NULL); exactly one of the two is set.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import op

if TYPE_CHECKING:
    from collections.abc import Sequence

revision: str = "0010"
down_revision: str | None = "0009"
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
    op.add_column(
        "outbox_stream",
        sa.Column(
            "trigger_kwargs_encrypted",
            sa.Text(),
            nullable=True,
            comment="Fernet token of the kwargs' JSON, when a key is configured",
        ),
    )
    op.alter_column("outbox_stream", "trigger_kwargs", nullable=True)
    op.create_check_constraint(
        op.f("ck_outbox_stream_kwargs_stored_once"),
        "outbox_stream",
        "num_nonnulls(trigger_kwargs, trigger_kwargs_encrypted) = 1",
    )


def downgrade() -> None:
    # Encrypted kwargs cannot be decrypted here (no key): the downgrade refuses to lose them.
    op.execute(
        """
        DO $$ BEGIN
            IF EXISTS (SELECT 1 FROM outbox_stream WHERE trigger_kwargs IS NULL) THEN
                RAISE EXCEPTION 'outbox_stream holds encrypted trigger kwargs: run '
                    '`outbox rotate-fernet-key --decrypt` first';
            END IF;
        END $$
        """
    )
    op.drop_constraint(op.f("ck_outbox_stream_kwargs_stored_once"), "outbox_stream", type_="check")
    op.alter_column("outbox_stream", "trigger_kwargs", nullable=False)
    op.drop_column("outbox_stream", "trigger_kwargs_encrypted")
    op.drop_index("ix_outbox_record_undispatched", table_name="outbox_record")
    op.create_index(
        "ix_outbox_record_undispatched",
        "outbox_record",
        ["stream_id", "id"],
        postgresql_where=sa.text("dispatched_at IS NULL"),
    )

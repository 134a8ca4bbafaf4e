"""record an ``acked`` resolution in its event row, not as a row of its own

Resolving was inserting one ``outbox_delivery`` row (and its primary-key entry) per subscriber
and event, a third of what a resolution costs the server, although almost every resolution is an
``acked`` one with nothing to say. An event now lists the subscribers that resolved it in
``resolved`` (first resolution wins by the event's row lock), and only a ``rejected`` or
``failed`` resolution keeps a row, with its reason, in ``outbox_unacked`` (the old table,
renamed). ``outbox_delivery`` stays as a view with every resolution, as it read before.

An event row now grows by its ``resolved`` list when it is resolved: event pages keep 60% free
(fillfactor 40, was 80) so that the resolutions of all the events on a page, usually committed
together, stay in-page (HOT) updates that write no index entries.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

if TYPE_CHECKING:
    from collections.abc import Sequence

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Every resolution as a row, as the outbox_delivery table held them: for reading (operators,
# tests); nothing on the hot path reads it.
DELIVERY_VIEW = """
CREATE VIEW outbox_delivery AS
SELECT e.id AS event_id, r.subscriber, coalesce(u.state, 'acked') AS state, u.reason,
       coalesce(u.resolved_at, e.resolved_at) AS resolved_at
FROM outbox_event AS e
CROSS JOIN LATERAL unnest(e.resolved) AS r(subscriber)
LEFT JOIN outbox_unacked AS u ON u.event_id = e.id AND u.subscriber = r.subscriber
"""


def upgrade() -> None:
    op.add_column(
        "outbox_event",
        sa.Column(
            "resolved",
            postgresql.ARRAY(sa.Text()),
            server_default=sa.text("'{}'"),
            nullable=False,
            comment="subscribers that resolved it, in any state",
        ),
    )
    op.execute(
        """
        UPDATE outbox_event AS e SET resolved = d.subscribers
        FROM (SELECT event_id, array_agg(subscriber ORDER BY resolved_at) AS subscribers
              FROM outbox_delivery GROUP BY event_id) AS d
        WHERE e.id = d.event_id
        """
    )
    op.execute("DELETE FROM outbox_delivery WHERE state = 'acked'")
    op.rename_table("outbox_delivery", "outbox_unacked")
    op.execute(
        "ALTER TABLE outbox_unacked RENAME CONSTRAINT pk_outbox_delivery TO pk_outbox_unacked"
    )
    op.drop_constraint(op.f("ck_outbox_delivery_state_known"), "outbox_unacked", type_="check")
    op.create_check_constraint(
        op.f("ck_outbox_unacked_state_known"), "outbox_unacked", "state IN ('rejected', 'failed')"
    )
    op.execute(DELIVERY_VIEW)
    op.execute("ALTER TABLE outbox_event SET (fillfactor = 40)")


def downgrade() -> None:
    op.execute("ALTER TABLE outbox_event SET (fillfactor = 80)")
    op.execute("DROP VIEW outbox_delivery")
    op.drop_constraint(op.f("ck_outbox_unacked_state_known"), "outbox_unacked", type_="check")
    op.create_check_constraint(
        op.f("ck_outbox_delivery_state_known"),
        "outbox_unacked",
        "state IN ('acked', 'rejected', 'failed')",
    )
    op.execute(
        "ALTER TABLE outbox_unacked RENAME CONSTRAINT pk_outbox_unacked TO pk_outbox_delivery"
    )
    op.rename_table("outbox_unacked", "outbox_delivery")
    op.execute(
        """
        INSERT INTO outbox_delivery (event_id, subscriber, state, resolved_at)
        SELECT e.id, r.subscriber, 'acked', coalesce(e.resolved_at, now())
        FROM outbox_event AS e CROSS JOIN LATERAL unnest(e.resolved) AS r(subscriber)
        ON CONFLICT (event_id, subscriber) DO NOTHING
        """
    )
    op.drop_column("outbox_event", "resolved")

"""What the end-to-end and fault tests read back from the outbox to check their invariants."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

if TYPE_CHECKING:
    from outbox import OutboxStore


@dataclass(frozen=True)
class OutboxTally:
    records: list[tuple[Any, ...]]
    """``(event identity, subscriber, payload's n, how many)`` for every stored record group."""
    failed: int
    """Deliveries resolved ``failed``."""
    occurrences: int
    """Event rows (a message recorded again after a restart counts twice)."""
    owed: int
    """Events some subscriber still owes."""

    def assert_each_stored_once(self) -> set[tuple[int, str]]:
        """No record stored twice; returns the ``(n, subscriber)`` pairs stored."""
        doubles = [row for row in self.records if row[3] != 1]
        assert not doubles, doubles[:10]
        return {(n, subscriber) for _, subscriber, n, _ in self.records}


async def tally(store: OutboxStore) -> OutboxTally:
    async with store.engine.connect() as conn:
        records = (
            await conn.execute(
                sa.text(
                    """
                    SELECT e.identity, r.subscriber, (r.payload->>'n')::int, count(*)
                    FROM outbox_record AS r LEFT JOIN outbox_event AS e ON e.id = r.event_id
                    GROUP BY 1, 2, 3
                    """
                )
            )
        ).all()
        failed = await conn.scalar(
            sa.text("SELECT count(*) FROM outbox_unacked WHERE state = 'failed'")
        )
        occurrences = await conn.scalar(sa.text("SELECT count(*) FROM outbox_event"))
        owed = await conn.scalar(sa.text("SELECT count(*) FROM outbox_event WHERE pending > 0"))
    return OutboxTally([tuple(r) for r in records], failed or 0, occurrences or 0, owed or 0)


async def settled(store: OutboxStore) -> bool:
    """No event owes a resolution and every lane is advanced through its last position."""
    async with store.engine.connect() as conn:
        row = (
            await conn.execute(
                sa.text(
                    """
                    SELECT (SELECT count(*) FROM outbox_event WHERE pending > 0),
                           (SELECT count(*) FROM outbox_lane
                            WHERE advanced_through <> next_position - 1)
                    """
                )
            )
        ).one()
    return bool(row[0] == 0 and row[1] == 0)

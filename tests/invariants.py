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


async def assert_status_true(store: OutboxStore, *, sweep_margin: float) -> list[Any]:
    """What ``outbox status`` says of each lane is what the tables hold: its cursor and last
    position (read before the status: the status may only have moved on since), and a lane
    whose oldest pending event is past its ack timeout shown stalled. Also, in every
    configuration, no delivery stays pending past its ack timeout plus ``sweep_margin``.
    Returns the lanes' status."""
    async with store.engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.text(
                    """
                    SELECT s.key, l.lane_key, l.advanced_through, l.next_position - 1,
                           s.ack_timeout,
                           extract(epoch FROM now() - min(e.created_at)
                                   FILTER (WHERE e.pending > 0))
                    FROM outbox_lane AS l JOIN outbox_stream AS s ON s.id = l.stream_id
                    LEFT JOIN outbox_event AS e
                      ON e.lane_id = l.id AND e.position > l.advanced_through
                    GROUP BY s.key, l.lane_key, l.advanced_through, l.next_position, s.ack_timeout
                    """
                )
            )
        ).all()
    status = await store.lane_status()
    lanes = {(lane.stream, lane.lane): lane for lane in status}
    assert {(r[0], r[1]) for r in rows} == set(lanes)
    for key, lane_key, cursor, last, ack_timeout, oldest in rows:
        shown = lanes[key, lane_key]
        assert shown.advanced_through >= cursor and shown.last_position >= last, shown
        assert shown.advanced_through <= shown.last_position, shown
        if oldest is not None:
            assert float(oldest) <= float(ack_timeout) + sweep_margin, (
                f"lane {lane_key}: a delivery pending {float(oldest):.1f}s, past its ack "
                f"timeout ({float(ack_timeout):g}s)"
            )
        if shown.pending_past_ack_timeout:
            assert shown.stalled, shown
        elif shown.stalled_seconds is None:
            assert not shown.stalled, shown
    return status

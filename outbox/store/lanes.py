"""The committer's side: ready prefixes, leases, cursor moves and advance failures."""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa

from outbox.core import (
    LaneEvent,
)
from outbox.store.base import StoreBase
from outbox.store.rows import AdvancedBatch, LaneLease, ReadyLane
from outbox.store.sqlparts import from_jsonb

if TYPE_CHECKING:
    from collections.abc import Sequence

# The lanes whose next event is resolved and that this owner may lease now, each with its
# resolved prefix: the events up to the first pending one (looked for within the next ``batch``
# positions), so that a lane's unresolved backlog is not read on every pass. One statement, one
# snapshot, for every ready lane; ``max_rows`` bounds a pass (a lane cut short goes on next time).
# A row per lane: its events' columns as arrays, which asyncpg decodes in C (a row per event cost
# more Python than the statement costs Postgres). The arrays share one order, not necessarily
# the positions': ``contiguous_resolved_prefix`` sorts them.
_READY_PREFIXES = sa.text(
    """
    WITH ready AS (
        SELECT l.id, l.advanced_through AS after, l.rewrites FROM outbox_lane AS l
        JOIN outbox_event AS h ON h.lane_id = l.id AND h.position = l.advanced_through + 1
        WHERE h.pending = 0
          AND (CAST(:stream_ids AS bigint[]) IS NULL
               OR l.stream_id = ANY(CAST(:stream_ids AS bigint[])))
          -- A stream advanced through its consuming connection goes to the triggerer that
          -- reads it (a committer given the stream ids it holds the producers of).
          AND (CAST(:stream_ids AS bigint[]) IS NOT NULL
               OR (SELECT st.advance_in FROM outbox_stream AS st WHERE st.id = l.stream_id)
                  = 'anywhere')
          AND (l.lease_owner IS NULL OR l.lease_owner = :owner OR l.lease_expires_at < now())
          AND (l.retry_at IS NULL OR l.retry_at <= now())
        ORDER BY l.id
        LIMIT :max_lanes
    )
    SELECT id, after, rewrites, array_agg(event_id), array_agg(position), array_agg(pending),
           array_agg(acked), array_agg(failed), array_agg(rejected), array_agg(superseded),
           '[' || string_agg(coalesce(payload::text, 'null'), ',') || ']'
    FROM (
        SELECT r.id, r.after, r.rewrites, p.id AS event_id, p.position, p.pending, p.acked,
               p.failed, p.rejected, p.payload,
               -- Read without identity by a triggerer that is gone: the broker delivers the
               -- message again from what was committed (a new event, later in the lane); this
               -- one is passed over, not advanced (advancing it would commit past the new one).
               (p.identity IS NULL AND p.recorded_by IS NOT NULL
                AND NOT EXISTS (SELECT 1 FROM outbox_session AS s
                                WHERE s.id = p.recorded_by AND s.ended_at IS NULL
                                  AND s.expires_at > now())) AS superseded
        FROM ready AS r
        CROSS JOIN LATERAL (
            SELECT e.id, e.position, e.pending, e.acked, e.failed, e.rejected, e.payload,
                   e.identity, e.recorded_by
            FROM outbox_event AS e
            WHERE e.lane_id = r.id AND e.position > r.after
              AND e.position < coalesce(
                (SELECT q.position FROM outbox_event AS q
                 WHERE q.lane_id = r.id AND q.position > r.after
                   AND q.position <= r.after + :batch AND q.pending > 0
                 ORDER BY q.position LIMIT 1),
                r.after + :batch + 1)
            ORDER BY e.position
            LIMIT :batch
        ) AS p
        ORDER BY r.id, p.position
        LIMIT :max_rows
    ) AS prefix
    GROUP BY id, after, rewrites
    ORDER BY id
    """
)

_TAKE_LEASE = sa.text(
    """
    UPDATE outbox_lane
    SET lease_owner = :owner, lease_expires_at = now() + make_interval(secs => :lease_seconds),
        fencing_token = fencing_token + 1
    WHERE id = :lane_id
      AND (lease_owner IS NULL OR lease_owner = :owner OR lease_expires_at < now())
    RETURNING id, stream_id, lane_key, advanced_through, fencing_token, attempts
    """
)

# The cursor moves only while the lease is ours and over exactly what was advanced: the lane
# still where it was read, and no redelivery changed one of its events since (``rewrites``, which
# such a redelivery counts up while it holds the lane's row lock). One statement, run on its own
# (no BEGIN, no COMMIT): a redelivery holding the row makes it wait, and the lane's conditions are
# then checked again on the row that redelivery left. The lanes are locked in id order first, as
# a recording locks them: an update alone locks them in whatever order its plan scans them, and
# deadlocked with recordings of several lanes (a second's stall until Postgres broke it).
# The move also records where the producer said the lane's broker acknowledgement is held (the
# hold keeps its start while it stays on the same event).
_MOVE_CURSORS = sa.text(
    """
    WITH locked AS (
        SELECT id FROM outbox_lane WHERE id = ANY(CAST(:lane_ids AS bigint[]))
        ORDER BY id FOR NO KEY UPDATE
    )
    UPDATE outbox_lane AS l
    SET advanced_through = m.through, attempts = 0, last_error = NULL, stalled_since = NULL,
        retry_at = NULL, held_identity = m.held,
        held_since = CASE WHEN m.held IS NULL THEN NULL
                          WHEN l.held_identity = m.held THEN l.held_since ELSE now() END
    FROM unnest(CAST(:lane_ids AS bigint[]), CAST(:tokens AS bigint[]),
                CAST(:afters AS bigint[]), CAST(:rewrites AS bigint[]),
                CAST(:throughs AS bigint[]), CAST(:helds AS text[]))
         AS m(lane_id, token, after, rewrites, through, held)
    WHERE l.id = m.lane_id AND l.id IN (SELECT id FROM locked)
      AND l.fencing_token = m.token AND l.lease_owner = :owner
      AND l.lease_expires_at > now() AND l.advanced_through = m.after
      AND l.rewrites = m.rewrites
    RETURNING l.id
    """
)

_RECORD_ADVANCE_FAILURE = sa.text(
    """
    UPDATE outbox_lane
    SET attempts = attempts + 1, last_error = :error,
        stalled_since = coalesce(stalled_since, now()),
        retry_at = now() + make_interval(secs => :retry_in)
    WHERE id = :lane_id AND fencing_token = :token AND lease_owner = :owner
    """
)

_RELEASE_LEASES = sa.text(
    """
    UPDATE outbox_lane SET lease_owner = NULL, lease_expires_at = NULL
    WHERE lease_owner = :owner
    """
)


class Lanes(StoreBase):
    async def ready_prefixes(
        self,
        owner: str,
        *,
        stream_ids: Sequence[int] | None,
        batch: int,
        max_lanes: int = 1000,
        max_rows: int = 10_000,
    ) -> list[ReadyLane]:
        """The lanes whose next event is resolved and that this owner may lease now, in lane
        order, each with its cursor and the resolved events after it (at most ``batch``)."""
        async with self._autocommit.connect() as conn:
            rows = await conn.execute(
                _READY_PREFIXES,
                {
                    "owner": owner,
                    "stream_ids": list(stream_ids) if stream_ids is not None else None,
                    "batch": batch,
                    "max_lanes": max_lanes,
                    "max_rows": max_rows,
                },
            )
            return [
                ReadyLane(
                    lane_id,
                    after,
                    list(map(LaneEvent, *columns, from_jsonb(payloads), superseded)),
                    rewrites,
                )
                for lane_id, after, rewrites, *columns, superseded, payloads in rows
            ]

    async def take_lease(self, lane_id: int, owner: str, lease_seconds: float) -> LaneLease | None:
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    _TAKE_LEASE,
                    {"lane_id": lane_id, "owner": owner, "lease_seconds": lease_seconds},
                )
            ).first()
        if row is None:
            return None
        return LaneLease(*row)

    async def move_cursors(self, owner: str, moves: Sequence[AdvancedBatch]) -> set[int]:
        """Move each lane's cursor over its advanced events, in one statement; returns the lanes
        moved. A lane moves only while its lease is still ours (fencing token, owner, expiry),
        its cursor where it was read and none of its events changed by a redelivery since."""
        if not moves:
            return set()
        async with self._autocommit.connect() as conn:
            rows = await conn.execute(
                _MOVE_CURSORS,
                {
                    "owner": owner,
                    "lane_ids": [m.lease.lane_id for m in moves],
                    "tokens": [m.lease.fencing_token for m in moves],
                    "afters": [m.lease.advanced_through for m in moves],
                    "rewrites": [m.rewrites for m in moves],
                    "throughs": [m.events[-1].position for m in moves],
                    "helds": [m.held for m in moves],
                },
            )
            return {row[0] for row in rows}

    async def record_advance_failure(
        self, lease: LaneLease, owner: str, error: str, retry_in: float
    ) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                _RECORD_ADVANCE_FAILURE,
                {
                    "lane_id": lease.lane_id,
                    "token": lease.fencing_token,
                    "owner": owner,
                    "error": error[:2000],
                    "retry_in": retry_in,
                },
            )

    async def release_leases(self, owner: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(_RELEASE_LEASES, {"owner": owner})

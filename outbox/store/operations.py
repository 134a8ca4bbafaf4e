"""Operations: lane status, holds, undispatched counts and pruning."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from outbox.store.base import StoreBase

# Status and metrics read no history: an unresolved event is always after its lane's cursor, so
# each lane's counts come from its backlog alone (by the (lane_id, position) index), and the
# undispatched records of each stream from the partial index that holds only them.
_LANE_STATUS = sa.text(
    """
    SELECT s.key, l.lane_key, l.advanced_through, l.next_position - 1,
           b.resolved_unadvanced, b.unresolved,
           extract(epoch FROM now() - b.oldest_pending),
           l.lease_owner, l.attempts, l.last_error,
           extract(epoch FROM now() - l.stalled_since), s.ack_timeout,
           l.held_identity, extract(epoch FROM now() - l.held_since),
           s.advance_in, (SELECT r.owner FROM outbox_session AS r
                          WHERE r.id = s.consumer_session
                            AND r.ended_at IS NULL AND r.expires_at > now())
    FROM outbox_lane AS l JOIN outbox_stream AS s ON s.id = l.stream_id
    CROSS JOIN LATERAL (
        SELECT count(*) FILTER (WHERE e.pending = 0) AS resolved_unadvanced,
               count(*) FILTER (WHERE e.pending > 0) AS unresolved,
               min(e.created_at) FILTER (WHERE e.pending > 0) AS oldest_pending
        FROM outbox_event AS e
        WHERE e.lane_id = l.id AND e.position > l.advanced_through
          AND e.position < l.next_position
    ) AS b
    ORDER BY s.key, l.lane_key
    """
)

_LANE_HOLDS = sa.text(
    """
    SELECT held_identity, extract(epoch FROM now() - held_since) FROM outbox_lane
    WHERE stream_id = :stream_id AND held_identity IS NOT NULL
    """
)

_UNDISPATCHED = sa.text(
    """
    SELECT s.key, (SELECT count(*) FROM outbox_record AS r
                   WHERE r.stream_id = s.id AND r.dispatched_at IS NULL)
    FROM outbox_stream AS s
    ORDER BY s.key
    """
)

_PRUNABLE_RECORD = "dispatched_at < now() - make_interval(secs => :retention)"

_PRUNE_RECORDS = sa.text(
    f"""
    DELETE FROM outbox_record WHERE id IN (
        SELECT id FROM outbox_record
        WHERE {_PRUNABLE_RECORD}
        ORDER BY id LIMIT :batch FOR UPDATE SKIP LOCKED)
    """
)

# Advanced: at or behind its lane's cursor. Unacked rows go with the event; records stay (the
# dispatched ones are pruned by age above), the dispatched ones detached from it. An undispatched
# record keeps its event id: the reader hands records out in event order. A lane whose broker
# acknowledgement is held keeps its events from the held one's first occurrence on (all of them
# if it has none): the broker delivers those again, and they deduplicate the redelivery.
_PRUNABLE_EVENTS = """
        SELECT e.id FROM outbox_event AS e JOIN outbox_lane AS l ON l.id = e.lane_id
        WHERE e.position <= l.advanced_through
          AND e.created_at < now() - make_interval(secs => :retention)
          AND (l.held_identity IS NULL
               OR e.position < coalesce(
                   (SELECT min(h.position) FROM outbox_event AS h
                    WHERE h.stream_id = l.stream_id AND h.identity = l.held_identity
                      AND h.lane_id = l.id), 0))
"""

_PRUNE_EVENTS = sa.text(
    f"""
    WITH doomed AS (
        {_PRUNABLE_EVENTS}
        ORDER BY e.id LIMIT :batch FOR UPDATE OF e SKIP LOCKED
    ),
    unacked AS (
        DELETE FROM outbox_unacked WHERE event_id IN (SELECT id FROM doomed)
    ),
    detached AS (
        UPDATE outbox_record SET event_id = NULL
        WHERE event_id IN (SELECT id FROM doomed) AND dispatched_at IS NOT NULL
    )
    DELETE FROM outbox_event WHERE id IN (SELECT id FROM doomed)
    """
)

# What prune would delete now (``outbox prune --dry-run``): the same conditions, counted.
_PRUNABLE_COUNTS = sa.text(
    f"""
    SELECT (SELECT count(*) FROM outbox_record WHERE {_PRUNABLE_RECORD}),
           (SELECT count(*) FROM ({_PRUNABLE_EVENTS}) AS prunable)
    """
)


@dataclass(frozen=True, slots=True)
class LaneStatus:
    """One lane as ``outbox status`` shows it."""

    stream: str
    lane: str
    advanced_through: int
    last_position: int
    resolved_unadvanced: int
    unresolved: int
    oldest_pending_seconds: float | None
    lease_owner: str | None
    attempts: int
    last_error: str | None
    stalled_seconds: float | None  # since its advances started failing
    ack_timeout: float  # its stream's
    # The event the lane's broker acknowledgement is held at (as its producer reported), and
    # for how long.
    held_identity: str | None = None
    held_seconds: float | None = None
    # Who advances it: any committer ("anywhere"), or only the triggerer reading it
    # ("consumer"); and that triggerer (host:pid), while one runs.
    advance_in: str = "anywhere"
    reader: str | None = None

    @property
    def pending_past_ack_timeout(self) -> bool:
        """Its oldest pending event is older than the ack timeout: whoever owes it is gone (or
        the timeout sweep is not running), and the lane cannot advance past it."""
        return (
            self.oldest_pending_seconds is not None
            and self.oldest_pending_seconds > self.ack_timeout
        )

    @property
    def stalled(self) -> bool:
        return self.stalled_seconds is not None or self.pending_past_ack_timeout

    def stall_reasons(self) -> list[str]:
        """Why the lane is stalled, for people: empty when it is not."""
        reasons = []
        if self.stalled_seconds is not None:
            reasons.append(
                f"advance failing for {self.stalled_seconds:.1f}s ({self.attempts} attempts): "
                f"{self.last_error}"
            )
        if self.pending_past_ack_timeout:
            reasons.append(f"pending past ack timeout ({self.ack_timeout:g}s)")
        return reasons


class Operations(StoreBase):
    async def lane_status(self) -> list[LaneStatus]:
        async with self.engine.connect() as conn:
            # The planner cannot know how short a lane's backlog is: estimating a part of its
            # whole history, it compiled the statement (JIT), 1.9 s at 2,000,000 events.
            await conn.execute(sa.text("SET LOCAL jit = off"))
            rows = await conn.execute(_LANE_STATUS)
            return [
                LaneStatus(
                    stream=r[0],
                    lane=r[1],
                    advanced_through=r[2],
                    last_position=r[3],
                    resolved_unadvanced=r[4],
                    unresolved=r[5],
                    oldest_pending_seconds=None if r[6] is None else float(r[6]),
                    lease_owner=r[7],
                    attempts=r[8],
                    last_error=r[9],
                    stalled_seconds=None if r[10] is None else float(r[10]),
                    ack_timeout=float(r[11]),
                    held_identity=r[12],
                    held_seconds=None if r[13] is None else float(r[13]),
                    advance_in=r[14],
                    reader=r[15],
                )
                for r in rows
            ]

    async def lane_holds(self, stream_id: int) -> list[tuple[str, float]]:
        """The stream's lanes whose broker acknowledgement the committer recorded as held: the
        event each is held at, and for how many seconds."""
        async with self._autocommit.connect() as conn:
            rows = await conn.execute(_LANE_HOLDS, {"stream_id": stream_id})
            return [(r[0], float(r[1])) for r in rows]

    async def undispatched(self) -> dict[str, int]:
        """Undispatched outbox records per stream key."""
        async with self.engine.connect() as conn:
            return {r[0]: r[1] for r in await conn.execute(_UNDISPATCHED)}

    async def prune(self, retention: float, *, batch: int = 1000) -> tuple[int, int]:
        """Delete one batch of dispatched records and one of advanced events older than
        ``retention`` seconds (each in its own short transaction); returns how many of each."""
        params = {"retention": retention, "batch": batch}
        async with self.engine.begin() as conn:
            records = (await conn.execute(_PRUNE_RECORDS, params)).rowcount
        async with self.engine.begin() as conn:
            events = (await conn.execute(_PRUNE_EVENTS, params)).rowcount
        return records, events

    async def prunable(self, retention: float) -> tuple[int, int]:
        """How many dispatched records and advanced events ``prune(retention)`` would delete
        now, in all its batches."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(_PRUNABLE_COUNTS, {"retention": retention})).one()
        return int(row[0]), int(row[1])

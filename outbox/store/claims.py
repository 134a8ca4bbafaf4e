"""The reader's claims: a stream's undispatched trigger events, in event order."""

from __future__ import annotations

import json
import json.scanner
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from outbox.store.base import StoreBase

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from sqlalchemy.ext.asyncio import AsyncConnection

READER_LOCK_CLASS = 0x0B0C


_STREAMS_WITH_UNDISPATCHED = sa.text(
    """
    SELECT s.id FROM outbox_stream AS s
    WHERE (CAST(:keys AS text[]) IS NULL OR s.key = ANY(CAST(:keys AS text[])))
      AND EXISTS (SELECT 1 FROM outbox_record AS r
                  WHERE r.stream_id = s.id AND r.dispatched_at IS NULL
                    AND (CAST(:subscribers AS text[]) IS NULL
                         OR r.subscriber = ANY(CAST(:subscribers AS text[]))))
    ORDER BY s.id
    """
)

# One reader per stream at a time keeps a stream's records in order across readers.
_TRY_READER_LOCK = sa.text("SELECT pg_try_advisory_xact_lock(:lock_class, CAST(:stream_id AS int))")

# In event order (``ix_outbox_record_undispatched``): record ids are not, the concurrent parts of
# a split write batch allocate them interleaved. A subscriber's records of one event get
# increasing ids in their ordinal order (one statement inserts them in that order). Records of
# no event (fast path, or yielded before the first event) come first, in id order.
# A stream's oldest undispatched records, in event order, without those a subscriber must not
# get yet: records of an event after one it still owes. (A large batch of resolutions commits as
# concurrent transactions, so a later event's records may commit before an earlier one's.) What a
# subscriber owes is in the stream's lane backlogs: every event at or before a lane's cursor is
# resolved, and within a lane ids grow with positions, so the owed events before the claimed ones
# lie between the first event after the oldest cursor and the last claimed event. ``settled``
# (``{subscriber: event id}``, from the reader's earlier claims) narrows that further: resolutions
# are never undone, so a subscriber once seen to owe nothing before an event never will again
# (but for an occurrence recorded again, which is outside any order), and behind a subscriber
# that resolves nothing each claim reads only the events since the last one. The reader lock
# keeps other readers off the stream; ``SKIP LOCKED`` only steps over records being pruned.
_CLAIM_RECORDS = sa.text(
    """
    WITH candidate AS (
        SELECT id, event_id, subscriber FROM outbox_record
        WHERE stream_id = :stream_id AND dispatched_at IS NULL
          AND (CAST(:subscribers AS text[]) IS NULL
               OR subscriber = ANY(CAST(:subscribers AS text[])))
        ORDER BY event_id NULLS FIRST, id
        LIMIT :limit
    ),
    span AS (
        SELECT (SELECT min(f.id) FROM outbox_lane AS l
                CROSS JOIN LATERAL (
                    SELECT e.id FROM outbox_event AS e
                    WHERE e.lane_id = l.id AND e.position > l.advanced_through
                    ORDER BY e.position LIMIT 1
                ) AS f
                WHERE l.stream_id = :stream_id) AS first_id,
               (SELECT min(coalesce((CAST(:settled AS jsonb) ->> c.subscriber)::bigint, 0))
                FROM candidate AS c WHERE c.event_id IS NOT NULL) AS settled_id,
               (SELECT max(event_id) FROM candidate) AS last_id,
               (SELECT array_agg(DISTINCT subscriber) FROM candidate
                WHERE event_id IS NOT NULL) AS names
    ),
    owed AS (
        SELECT m.name, min(e.id) AS first_owed
        FROM span AS s
        JOIN outbox_event AS e
          ON e.id >= s.first_id AND e.id >= s.settled_id AND e.id < s.last_id
        CROSS JOIN LATERAL unnest(s.names) AS m(name)
        WHERE e.stream_id = :stream_id AND e.pending > 0 AND NOT e.resolved @> s.names
          AND e.snapshot ? m.name AND m.name <> ALL(e.resolved)
        GROUP BY m.name
    )
    SELECT r.id, r.stream_id, r.event_id, r.subscriber, r.ordinal, r.payload
    FROM candidate AS c
    JOIN outbox_record AS r ON r.id = c.id
    LEFT JOIN owed AS o ON o.name = c.subscriber
    WHERE c.event_id IS NULL OR o.first_owed IS NULL OR c.event_id < o.first_owed
    ORDER BY c.event_id NULLS FIRST, c.id
    FOR UPDATE OF r SKIP LOCKED
    """
)

_MARK_DISPATCHED = sa.text(
    "UPDATE outbox_record SET dispatched_at = now() WHERE id = ANY(CAST(:ids AS bigint[]))"
)


class Claims(StoreBase):
    async def claim_records(
        self,
        conn: AsyncConnection,
        *,
        stream_keys: Sequence[str] | None,
        subscribers: Sequence[str] | None,
        limit: int,
        settled: Mapping[int, Mapping[str, int]] | None = None,
    ) -> list[tuple[int, int, int | None, str, int, Any]]:
        """In the caller's transaction: take the reader lock of the first stream with
        undispatched records that no other reader holds, and lock its oldest such records in
        event order, but for those of an event after one their subscriber still owes.
        ``settled``: by stream id, ``{subscriber: event id}`` before which the subscriber was
        seen to owe nothing (a claimed record's event: claims only read owed events after)."""
        candidates = await conn.execute(
            _STREAMS_WITH_UNDISPATCHED, {"keys": stream_keys, "subscribers": subscribers}
        )
        for (stream_id,) in candidates.all():
            if await conn.scalar(
                _TRY_READER_LOCK, {"lock_class": READER_LOCK_CLASS, "stream_id": stream_id}
            ):
                known = None if settled is None else settled.get(stream_id)
                rows = await conn.execute(
                    _CLAIM_RECORDS,
                    {
                        "stream_id": stream_id,
                        "subscribers": subscribers,
                        "limit": limit,
                        "settled": json.dumps(known) if known else "{}",
                    },
                )
                claimed = [(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]
                if claimed:
                    return claimed
        return []

    async def mark_dispatched(self, conn: AsyncConnection, record_ids: Sequence[int]) -> None:
        await conn.execute(_MARK_DISPATCHED, {"ids": list(record_ids)})

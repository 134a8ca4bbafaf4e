"""Triggerer sessions, subscriber registrations, the stream's consumer, and owed deliveries."""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa

from outbox.core import NO_FAILURE_LEFT
from outbox.schema import subscriber
from outbox.store.base import StoreBase
from outbox.store.sqlparts import CONSUMER_CHANNEL, OWNER_ID, SESSION_LIVE

if TYPE_CHECKING:
    from collections.abc import Sequence

_CONSUMER_ONLY_STREAMS = sa.text(
    """
    SELECT st.id, st.key, s.owner FROM outbox_stream AS st
    LEFT JOIN outbox_session AS s
           ON s.id = st.consumer_session AND s.ended_at IS NULL AND s.expires_at > now()
    WHERE st.advance_in = 'consumer'
    ORDER BY st.id
    """
)

_CREATE_SESSION = sa.text(
    """
    INSERT INTO outbox_session (owner, expires_at)
    VALUES (:owner, now() + make_interval(secs => :ttl))
    RETURNING id
    """
)

# Renewed while it is not ended: a session a sweeper found expired (and whose deliveries it
# failed) stays dead.
_RENEW_SESSION = sa.text(
    """
    UPDATE outbox_session SET expires_at = now() + make_interval(secs => :ttl)
    WHERE id = :session AND ended_at IS NULL
    RETURNING (SELECT coalesce(array_agg(st.id ORDER BY st.id), '{}') FROM outbox_stream AS st
               WHERE st.consumer_session = :session)
    """
)

_END_SESSION = sa.text(
    f"""
    WITH released AS (
        UPDATE outbox_stream SET consumer_session = NULL WHERE consumer_session = :session
        RETURNING id
    ),
    ended AS (
        UPDATE outbox_session SET ended_at = coalesce(ended_at, now()) WHERE id = :session
    )
    SELECT count(pg_notify('{CONSUMER_CHANNEL}', id::text)) FROM released
    """
)

# A subscriber joins: a new registration id each time, so that what an earlier one was owed is
# recognisably not owed through this one. What an earlier registration of it is still owed moves
# to the new one (its triggerer restarted, or it moved), unless the broker delivers it again
# anyway (an event without identity whose reader is gone: the sweep fails it).
_REGISTER = sa.text(
    f"""
    WITH previous AS (
        -- Not an excluded one (failed, or leaving): its own triggerer resolves what it owes.
        SELECT id, name FROM outbox_subscriber
        WHERE stream_id = :stream_id AND name = ANY(CAST(:names AS text[])) AND NOT excluded
    ),
    registered AS (
        INSERT INTO outbox_subscriber (stream_id, name, session_id)
        SELECT :stream_id, n, :session FROM unnest(CAST(:names AS text[])) AS n
        ON CONFLICT (stream_id, name) DO UPDATE
        SET id = nextval(pg_get_serial_sequence('outbox_subscriber', 'id')),
            session_id = excluded.session_id, excluded = false, joined_at = now()
        RETURNING name, id
    ),
    owed AS (
        SELECT e.id, jsonb_object_agg(n.name, n.id) AS owners
        FROM outbox_lane AS l
        JOIN outbox_event AS e
          ON e.lane_id = l.id AND e.position > l.advanced_through AND e.pending > 0
        JOIN previous AS p ON e.snapshot -> p.name = to_jsonb(p.id)
        JOIN registered AS n ON n.name = p.name
        WHERE l.stream_id = :stream_id AND p.name <> ALL(e.resolved)
          AND (e.identity IS NOT NULL OR e.recorded_by IS NULL
               OR EXISTS (SELECT 1 FROM outbox_session AS s
                          WHERE s.id = e.recorded_by AND {SESSION_LIVE}))
        GROUP BY e.id
    ),
    moved AS (
        UPDATE outbox_event AS e SET snapshot = e.snapshot || o.owners
        FROM owed AS o WHERE e.id = o.id
        RETURNING e.id
    )
    SELECT name, id, (SELECT count(*) FROM moved) FROM registered
    """
)

_EXCLUDE = sa.text(
    "UPDATE outbox_subscriber SET excluded = true WHERE id = ANY(CAST(:ids AS bigint[]))"
)

_UNREGISTER = sa.text("DELETE FROM outbox_subscriber WHERE id = ANY(CAST(:ids AS bigint[]))")

# The stream's producer runs in one triggerer at a time: the session holding it, while live.
_TAKE_CONSUMER = sa.text(
    """
    UPDATE outbox_stream AS st SET consumer_session = :session, advance_in = :advance_in
    WHERE st.id = :stream_id
      AND (st.consumer_session IS NULL OR st.consumer_session = :session
           OR NOT EXISTS (SELECT 1 FROM outbox_session AS s
                          WHERE s.id = st.consumer_session AND s.ended_at IS NULL
                            AND s.expires_at > now()))
    RETURNING st.id
    """
)

_RELEASE_CONSUMER = sa.text(
    f"""
    UPDATE outbox_stream SET consumer_session = NULL
    WHERE id = :stream_id AND consumer_session = :session
    RETURNING pg_notify('{CONSUMER_CHANNEL}', id::text)
    """
)

# What a triggerer's subscribers are owed on a stream that another triggerer reads: pending
# events after each lane's cursor (``after``: only those recorded since the last look) owed
# through one of the given registrations and not resolved by it yet.
_OWED_DELIVERIES = sa.text(
    f"""
    SELECT e.id, e.lane_id, e.raw::text, m.name, {OWNER_ID}
    FROM outbox_lane AS l
    CROSS JOIN LATERAL (
        SELECT e.id, e.lane_id, e.raw, e.snapshot, e.resolved FROM outbox_event AS e
        WHERE e.lane_id = l.id AND e.position > l.advanced_through AND e.pending > 0
          AND e.id > :after
          -- What this triggerer records itself it hands out as it records it: here, only up
          -- to what it has handed out so far.
          AND (CAST(:upto AS bigint) IS NULL OR e.id <= :upto
               OR e.recorded_by IS DISTINCT FROM CAST(:session AS bigint))
          AND (CAST(:event_ids AS bigint[]) IS NULL OR e.id = ANY(CAST(:event_ids AS bigint[])))
          -- Not an event without identity whose reader is gone: the broker delivers it again.
          AND (e.identity IS NOT NULL OR e.recorded_by IS NULL
               OR EXISTS (SELECT 1 FROM outbox_session AS s
                          WHERE s.id = e.recorded_by AND {SESSION_LIVE}))
        ORDER BY e.position
        LIMIT :limit
    ) AS e
    CROSS JOIN LATERAL jsonb_each(e.snapshot) AS m(name, owner)
    WHERE l.stream_id = :stream_id AND jsonb_typeof(m.owner) = 'number'
      AND {OWNER_ID} = ANY(CAST(:registrations AS bigint[]))
      AND m.name <> ALL(e.resolved)
    ORDER BY e.id, m.name
    """
)


class Sessions(StoreBase):
    async def consumer_only_streams(self) -> list[tuple[int, str, str | None]]:
        """``(id, key, owner of the live session reading it or None)`` of the streams only the
        triggerer reading them may advance."""
        async with self._autocommit.connect() as conn:
            rows = await conn.execute(_CONSUMER_ONLY_STREAMS)
            return [(r[0], r[1], r[2]) for r in rows]

    async def create_session(self, owner: str, ttl: float) -> int:
        """A new live session for a triggerer process, expiring ``ttl`` seconds from now unless
        renewed."""
        async with self._autocommit.connect() as conn:
            session_id = await conn.scalar(_CREATE_SESSION, {"owner": owner, "ttl": ttl})
        assert session_id is not None
        return int(session_id)

    async def renew_session(self, session_id: int, ttl: float) -> list[int] | None:
        """Extend the session by ``ttl`` seconds from now; the streams whose producer it still
        holds, or ``None`` if the session ended (a sweeper found it expired)."""
        async with self._autocommit.connect() as conn:
            rows = (await conn.execute(_RENEW_SESSION, {"session": session_id, "ttl": ttl})).all()
        return list(rows[0][0]) if rows else None

    async def end_session(self, session_id: int) -> None:
        """End the session (a graceful stop): the producers it ran are released for another
        triggerer; its subscribers stay owed the stream's events for its ack timeout, in case
        they join again elsewhere or after a restart."""
        async with self._autocommit.connect() as conn:
            await conn.execute(_END_SESSION, {"session": session_id})

    async def register(
        self, stream_id: int, names: Sequence[str], session_id: int
    ) -> tuple[dict[str, int], int]:
        """Register subscribers of a stream in a session: their new registration ids, and how
        many pending events an earlier registration of theirs was owed and now they are (those
        are theirs to hand out: the triggerer that reads the stream will not again)."""
        async with self._autocommit.connect() as conn:
            rows = (
                await conn.execute(
                    _REGISTER,
                    {"stream_id": stream_id, "names": list(names), "session": session_id},
                )
            ).all()
        return {row[0]: row[1] for row in rows}, (rows[0][2] if rows else 0)

    async def failure_of(
        self, event_id: int, name: str, registration: int | None
    ) -> tuple[str | None, bool]:
        """Why ``name``'s delivery of the event was failed (or rejected), if it was
        (``NO_FAILURE_LEFT`` when no failure or rejection of it is recorded any more: the winner
        was an acceptance, or a redelivery re-opened it since), and whether the event was
        recorded before ``registration`` joined (a delivery it took over from an earlier
        registration of the subscriber)."""
        async with self._autocommit.connect() as conn:
            row = (
                await conn.execute(
                    sa.text(
                        "SELECT CASE WHEN u.event_id IS NULL THEN :gone ELSE u.reason END, "
                        "coalesce(e.created_at < r.joined_at, false) "
                        "FROM outbox_event AS e "
                        "LEFT JOIN outbox_unacked AS u "
                        "  ON u.event_id = e.id AND u.subscriber = :name "
                        "LEFT JOIN outbox_subscriber AS r ON r.id = :registration "
                        "WHERE e.id = :event_id"
                    ),
                    {
                        "event_id": event_id,
                        "name": name,
                        "registration": registration,
                        "gone": NO_FAILURE_LEFT,
                    },
                )
            ).first()
        if row is None:
            return None, False
        return (None if row[0] is None else str(row[0])), bool(row[1])

    async def registration_of(self, stream_id: int, name: str) -> int | None:
        """The current registration of subscriber ``name`` of the stream, on any triggerer."""
        async with self._autocommit.connect() as conn:
            found = await conn.scalar(
                sa.select(subscriber.c.id).where(
                    subscriber.c.stream_id == stream_id, subscriber.c.name == name
                )
            )
        return None if found is None else int(found)

    async def exclude(self, registration_ids: Sequence[int]) -> None:
        """Keep these registrations out of new snapshots (failed or leaving subscribers); what
        they are owed already is still theirs to resolve."""
        if registration_ids:
            async with self._autocommit.connect() as conn:
                await conn.execute(_EXCLUDE, {"ids": list(registration_ids)})

    async def unregister(self, registration_ids: Sequence[int]) -> None:
        """Remove these registrations: what they are still owed is failed by the next sweep."""
        if registration_ids:
            async with self._autocommit.connect() as conn:
                await conn.execute(_UNREGISTER, {"ids": list(registration_ids)})

    async def take_consumer(self, stream_id: int, session_id: int, *, advance_in: str) -> bool:
        """Make this session the one that runs the stream's producer, unless another live
        session does; ``advance_in``: ``"consumer"`` when only that process may advance it."""
        async with self._autocommit.connect() as conn:
            taken = await conn.scalar(
                _TAKE_CONSUMER,
                {"stream_id": stream_id, "session": session_id, "advance_in": advance_in},
            )
        return taken is not None

    async def consumer_holder(self, stream_id: int) -> tuple[int, str] | None:
        """``(session id, owner)`` of the live session running the stream's producer."""
        async with self._autocommit.connect() as conn:
            row = (
                await conn.execute(
                    sa.text(
                        f"""
                        SELECT s.id, s.owner FROM outbox_stream AS st
                        JOIN outbox_session AS s ON s.id = st.consumer_session
                        WHERE st.id = :stream_id AND {SESSION_LIVE}
                        """
                    ),
                    {"stream_id": stream_id},
                )
            ).first()
        return None if row is None else (row[0], row[1])

    async def release_consumer(self, stream_id: int, session_id: int) -> None:
        """Give up running the stream's producer (another triggerer may take it at once)."""
        async with self._autocommit.connect() as conn:
            await conn.execute(_RELEASE_CONSUMER, {"stream_id": stream_id, "session": session_id})

    async def owed_deliveries(
        self,
        stream_id: int,
        registration_ids: Sequence[int],
        *,
        after: int = 0,
        upto: int | None = None,
        event_ids: Sequence[int] | None = None,
        session_id: int | None = None,
        limit: int = 1000,
    ) -> list[tuple[int, int, str | None, str, int]]:
        """``(event_id, lane_id, raw JSON, subscriber, registration)`` of the stream's pending
        deliveries owed through ``registration_ids``, of events with ids above ``after`` (and,
        of those session ``session_id`` recorded, up to ``upto``), or among ``event_ids``, in
        event order (at most ``limit`` events per lane)."""
        if not registration_ids:
            return []
        async with self._autocommit.connect() as conn:
            rows = await conn.execute(
                _OWED_DELIVERIES,
                {
                    "stream_id": stream_id,
                    "registrations": list(registration_ids),
                    "after": after,
                    "upto": upto,
                    "session": session_id,
                    "event_ids": list(event_ids) if event_ids is not None else None,
                    "limit": limit,
                },
            )
            return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]

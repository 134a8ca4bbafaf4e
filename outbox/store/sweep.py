"""The sweep: deliveries that can no longer be made are moved or failed; expired sessions end."""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa

from outbox.core import (
    BROKER_REDELIVERS,
    DATABASE_CLOCK_TIMEOUT,
    REGISTRATION_GONE,
)
from outbox.store.resolving import Resolving
from outbox.store.rows import ResolutionRow
from outbox.store.sqlparts import CONSUMER_CHANNEL, DIED_AT, MOVED_CHANNEL, OWNER_ID, SESSION_LIVE

if TYPE_CHECKING:
    from collections.abc import Sequence

# Why a pending delivery (``e``, ``m.name`` owed through registration ``m.owner``) can no longer
# be made, or NULL: its registration is gone (the subscriber left, or joined again and what
# could be moved was moved); the event has no identity and the triggerer that recorded it is gone
# (the broker delivers it again, as a new event, to the next reader); or its ack timeout passed
# by the database clock, counted from when it was recorded or from when the session it is owed
# through died, whichever came first. (Events recorded before outbox knew registrations have
# none: only the timeout ends them.)
_WHY_UNDELIVERABLE = f"""
    CASE
        WHEN jsonb_typeof(m.owner) = 'number' AND r.id IS NULL
            THEN '{REGISTRATION_GONE}'
        WHEN e.identity IS NULL AND e.recorded_by IS NOT NULL
             AND NOT EXISTS (SELECT 1 FROM outbox_session AS s
                             WHERE s.id = e.recorded_by AND {SESSION_LIVE})
            THEN '{BROKER_REDELIVERS}'
        WHEN least(e.created_at,
                   CASE WHEN rs.id IS NOT NULL AND NOT ({SESSION_LIVE.replace("s.", "rs.")})
                        THEN {DIED_AT.replace("s.", "rs.")} END)
             <= now() - make_interval(secs => st.ack_timeout + :grace)
            THEN '{DATABASE_CLOCK_TIMEOUT}'
    END
"""


_OWNER_JOINS = f"""
    LEFT JOIN outbox_subscriber AS r ON r.id = {OWNER_ID}
    LEFT JOIN outbox_session AS rs ON rs.id = r.session_id
"""

# A delivery owed through a registration that is gone, of a subscriber that has joined again
# since (a newer registration, its session live), moves to the newer one rather than failing:
# an event recorded on another triggerer while the subscriber joined again took the old
# registration into its snapshot after the join had moved what the old one was owed. Its
# triggerer is told (``outbox_moved``) and hands it out.
_MOVE_TO_REJOINED = sa.text(
    f"""
    WITH owed AS (
        SELECT e.id, e.stream_id, jsonb_object_agg(m.name, cur.id) AS owners
        FROM outbox_lane AS l
        CROSS JOIN LATERAL (
            -- By the lane's (lane_id, position) index, after its cursor: never its history.
            SELECT e.id, e.stream_id, e.snapshot, e.resolved, e.identity, e.recorded_by
            FROM outbox_event AS e
            WHERE e.lane_id = l.id AND e.position > l.advanced_through AND e.pending > 0
            ORDER BY e.position
            LIMIT :limit
        ) AS e
        CROSS JOIN LATERAL jsonb_each(e.snapshot) AS m(name, owner)
        JOIN outbox_subscriber AS cur
          ON cur.stream_id = e.stream_id AND cur.name = m.name AND NOT cur.excluded
        JOIN outbox_session AS s ON s.id = cur.session_id AND {SESSION_LIVE}
        WHERE jsonb_typeof(m.owner) = 'number' AND m.name <> ALL(e.resolved)
          AND cur.id > {OWNER_ID}
          AND NOT EXISTS (SELECT 1 FROM outbox_subscriber AS r WHERE r.id = {OWNER_ID})
          AND (e.identity IS NOT NULL OR e.recorded_by IS NULL
               OR EXISTS (SELECT 1 FROM outbox_session AS rs
                          WHERE rs.id = e.recorded_by AND rs.ended_at IS NULL
                            AND rs.expires_at > now()))
          AND (CAST(:stream_ids AS bigint[]) IS NULL
               OR l.stream_id = ANY(CAST(:stream_ids AS bigint[])))
          AND (l.lease_owner IS NULL OR l.lease_owner = :owner OR l.lease_expires_at < now())
        GROUP BY e.id, e.stream_id
    ),
    moved AS (
        UPDATE outbox_event AS e SET snapshot = e.snapshot || o.owners
        FROM owed AS o WHERE e.id = o.id
        RETURNING e.stream_id
    )
    SELECT pg_notify('{MOVED_CHANNEL}', string_agg(DISTINCT stream_id::text, ','))
    FROM moved HAVING count(*) > 0
    """
)

# Each lane's pending events are read after its cursor, by its (lane_id, position) index, never
# the history behind it; lanes another committer holds are left to it (one sweeper per lane).
_SWEEP_PENDING = sa.text(
    f"""
    SELECT e.stream_id, e.id, m.name, why
    FROM outbox_lane AS l
    JOIN outbox_stream AS st ON st.id = l.stream_id
    CROSS JOIN LATERAL (
        SELECT e.stream_id, e.id, e.snapshot, e.resolved, e.created_at, e.identity,
               e.recorded_by
        FROM outbox_event AS e
        WHERE e.lane_id = l.id AND e.position > l.advanced_through AND e.pending > 0
          AND EXISTS (SELECT 1 FROM jsonb_each(e.snapshot) AS m(name, owner) {_OWNER_JOINS}
                      WHERE m.name <> ALL(e.resolved) AND ({_WHY_UNDELIVERABLE}) IS NOT NULL)
        ORDER BY e.position
        LIMIT :limit
        -- Locked until the failures commit: a redelivery re-opening one of these meanwhile,
        -- or a subscriber joining again (which moves what it is owed), waits, and then sees
        -- them failed.
        FOR UPDATE OF e SKIP LOCKED
    ) AS e
    CROSS JOIN LATERAL jsonb_each(e.snapshot) AS m(name, owner)
    {_OWNER_JOINS}
    CROSS JOIN LATERAL (SELECT {_WHY_UNDELIVERABLE} AS why) AS w
    WHERE m.name <> ALL(e.resolved) AND why IS NOT NULL
      AND (CAST(:stream_ids AS bigint[]) IS NULL
           OR l.stream_id = ANY(CAST(:stream_ids AS bigint[])))
      AND (l.lease_owner IS NULL OR l.lease_owner = :owner OR l.lease_expires_at < now())
    ORDER BY e.id
    LIMIT :limit
    """
)

# Sessions found expired are ended (a late heartbeat cannot revive one whose deliveries were
# failed), and a day after they end they go, with their registrations.
_END_EXPIRED_SESSIONS = sa.text(
    f"""
    WITH ended AS (
        UPDATE outbox_session SET ended_at = expires_at
        WHERE ended_at IS NULL AND expires_at <= now()
        RETURNING id
    ),
    released AS (
        UPDATE outbox_stream SET consumer_session = NULL
        WHERE consumer_session IN (SELECT id FROM ended)
        RETURNING id
    ),
    forgotten AS (
        DELETE FROM outbox_session
        WHERE id IN (SELECT id FROM outbox_session
                     WHERE ended_at < now() - interval '1 day' LIMIT 1000)
    )
    SELECT (SELECT count(*) FROM ended),
           (SELECT count(pg_notify('{CONSUMER_CHANNEL}', id::text)) FROM released)
    """
)


class Sweep(Resolving):
    async def fail_expired(
        self,
        *,
        grace: float = 0.0,
        limit: int = 1000,
        owner: str = "",
        stream_ids: Sequence[int] | None = None,
    ) -> int:
        """Resolve as ``failed`` the pending deliveries nobody can make any more (owed through a
        registration that is gone: a dead or stopped triggerer, a subscriber that left or joined
        again) and those whose ack timeout (plus ``grace``) passed by the database clock; returns
        how many. Ends sessions found expired. Lanes leased by a committer other than ``owner``
        are left to it; ``stream_ids`` limits the sweep to those streams."""
        async with self.engine.begin() as conn:
            await conn.execute(_END_EXPIRED_SESSIONS)
            await conn.execute(
                _MOVE_TO_REJOINED,
                {
                    "limit": limit,
                    "owner": owner,
                    "stream_ids": list(stream_ids) if stream_ids is not None else None,
                },
            )
            rows = (
                await conn.execute(
                    _SWEEP_PENDING,
                    {
                        "grace": grace,
                        "limit": limit,
                        "owner": owner,
                        "stream_ids": list(stream_ids) if stream_ids is not None else None,
                    },
                )
            ).all()
            if not rows:
                return 0
            lost = await self.resolve(
                conn,
                [
                    ResolutionRow(
                        stream_id=r[0],
                        event_id=r[1],
                        subscriber=r[2],
                        state="failed",
                        reason=r[3],
                    )
                    for r in rows
                ],
            )
        return len(rows) - len(lost)

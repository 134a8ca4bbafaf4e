"""Recording staged events: who they are owed to, lane positions, redeliveries of an identity."""

from __future__ import annotations

import json
import json.scanner
from typing import TYPE_CHECKING

import sqlalchemy as sa

from outbox.core import (
    PriorOccurrence,
    plan_redelivery,
)
from outbox.store.base import StoreBase
from outbox.store.sqlparts import (
    DIED_AT,
    NOTIFY_CHANNEL,
    RECORDED_CHANNEL,
    SESSION_LIVE,
    count_state,
    int_array,
    ints,
    text_array,
    texts,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from sqlalchemy.ext.asyncio import AsyncConnection

    from outbox.store.rows import EventToRecord

# A recording locks the rows of its lanes, and of the lanes of earlier occurrences of its
# identities, before it reads or changes their events: positions are allocated under the lock, and
# the committer's cursor move (``_MOVE_CURSORS``) waits for a redelivery that changes an event.
_LOCK_LANES = sa.text(
    """
    SELECT id FROM outbox_lane
    WHERE id = ANY(CAST(:lane_ids AS bigint[]))
       OR id IN (SELECT e.lane_id FROM outbox_event AS e
                 WHERE e.stream_id = ANY(CAST(:stream_ids AS bigint[]))
                   AND e.identity = ANY(CAST(:identities AS text[])))
    ORDER BY id FOR UPDATE
    """
)

# A lane found only after the first lock (an occurrence committed meanwhile) is taken out of
# order: without waiting, so that it cannot deadlock; the writer retries the whole transaction,
# whose first lock then covers it.
_LOCK_MORE_LANES = sa.text(
    """
    SELECT id FROM outbox_lane WHERE id = ANY(CAST(:lane_ids AS bigint[]))
    ORDER BY id FOR UPDATE NOWAIT
    """
)


# The subscribers each stream's new events are owed to: every registration, on any triggerer,
# that is not excluded (failed, or leaving) and whose session is live, or died less than the
# stream's ack timeout ago; with its id.
_LIVE_OWNERS = f"""
    SELECT x.stream_id,
           coalesce(jsonb_object_agg(r.name, r.id) FILTER (WHERE r.id IS NOT NULL),
                    '{{}}'::jsonb) AS owners,
           count(r.id)::int AS size,
           coalesce(bool_or(r.session_id <> :session), false) AS remote
    FROM unnest(CAST(:owner_stream_ids AS bigint[])) AS x(stream_id)
    JOIN outbox_stream AS st ON st.id = x.stream_id
    LEFT JOIN (outbox_subscriber AS r JOIN outbox_session AS s ON s.id = r.session_id)
           ON r.stream_id = x.stream_id AND NOT r.excluded
              AND ({SESSION_LIVE}
                   OR {DIED_AT} > now() - make_interval(secs => st.ack_timeout))
    GROUP BY x.stream_id
"""

_READ_LIVE_OWNERS = sa.text(f"SELECT stream_id, owners::text FROM ({_LIVE_OWNERS}) AS o")

# One statement, so that a batch without identities is recorded in one round trip (no BEGIN,
# no COMMIT): read who each stream's events are owed to, lock the lanes in id order (two
# recordings of the same lanes cannot deadlock), move their allocation counters, insert the
# events at the positions allocated, in batch order, wake committers for lanes whose events were
# born resolved (nobody to deliver them to) and triggerers whose subscribers are owed events
# recorded here. An event staged without a snapshot (``NULL``, pending ``-1``) gets its stream's
# owners. The new ids come back as one array (in insertion order: ids grow with it), with the
# owners by stream.
_RECORD_EVENTS = sa.text(
    f"""
    WITH owners AS ({_LIVE_OWNERS}),
    locked AS (
        SELECT id FROM outbox_lane WHERE id = ANY(CAST(:lane_ids AS bigint[]))
        ORDER BY id FOR NO KEY UPDATE
    ),
    allocated AS (
        UPDATE outbox_lane AS l SET next_position = l.next_position + c.n
        FROM unnest(CAST(:lane_ids AS bigint[]), CAST(:counts AS bigint[])) AS c(lane_id, n)
        WHERE l.id = c.lane_id AND l.id IN (SELECT id FROM locked)
        RETURNING l.id, l.next_position - c.n AS first
    ),
    inserted AS (
        INSERT INTO outbox_event
            (stream_id, lane_id, position, identity, raw, payload, snapshot, resolved, pending,
             acked, rejected, resolved_at, recorded_by)
        SELECT x.stream_id, x.lane_id,
               a.first + row_number() OVER (PARTITION BY x.lane_id ORDER BY x.ord) - 1,
               x.identity, x.raw::jsonb, x.payload::jsonb,
               coalesce(x.snapshot::jsonb, o.owners),
               CASE WHEN x.resolved IS NULL THEN '{{}}'
                    ELSE ARRAY(SELECT jsonb_array_elements_text(x.resolved::jsonb)) END,
               p.pending, x.acked, x.rejected, CASE WHEN p.pending = 0 THEN now() END,
               nullif(:session, 0)
        FROM unnest({int_array("stream_ids")}, {int_array("event_lane_ids")},
                    {text_array("identities")}, CAST(:raws AS text[]),
                    CAST(:payloads AS text[]), CAST(:snapshots AS text[]),
                    {text_array("resolveds")}, {int_array("pendings", "int")},
                    {int_array("ackeds", "int")}, {int_array("rejecteds", "int")})
             WITH ORDINALITY AS x(stream_id, lane_id, identity, raw, payload, snapshot,
                                  resolved, pending, acked, rejected, ord)
        JOIN allocated AS a ON a.id = x.lane_id
        JOIN owners AS o ON o.stream_id = x.stream_id
        CROSS JOIN LATERAL (
            SELECT CASE WHEN x.pending < 0 THEN o.size ELSE x.pending END AS pending
        ) AS p
        ORDER BY x.ord
        RETURNING id, lane_id, stream_id, pending
    ),
    lanes_notified AS (
        SELECT pg_notify('{NOTIFY_CHANNEL}', string_agg(DISTINCT lane_id::text, ','))
        FROM inserted WHERE pending = 0 HAVING count(*) > 0
    ),
    triggerers_notified AS (
        SELECT pg_notify('{RECORDED_CHANNEL}', string_agg(DISTINCT i.stream_id::text, ','))
        FROM inserted AS i JOIN owners AS o ON o.stream_id = i.stream_id
        WHERE o.remote HAVING count(*) > 0
    )
    SELECT coalesce(array_agg(id ORDER BY id), '{{}}'),
           (SELECT count(*) FROM lanes_notified) + (SELECT count(*) FROM triggerers_notified),
           (SELECT jsonb_object_agg(stream_id, owners)::text FROM owners)
    FROM inserted
    """
)

_LOCK_PRIOR_OCCURRENCES = sa.text(
    """
    SELECT e.id FROM outbox_event AS e
    WHERE e.stream_id = :stream_id AND e.identity = ANY(CAST(:identities AS text[]))
    ORDER BY e.id FOR UPDATE
    """
)

_READ_PRIOR_OCCURRENCES = sa.text(
    """
    SELECT e.id, e.identity, e.position <= l.advanced_through AS advanced, e.pending,
           e.snapshot::text, e.lane_id,
           coalesce((SELECT json_object_agg(r.subscriber, coalesce(u.state, 'acked'))
                     FROM unnest(e.resolved) AS r(subscriber)
                     LEFT JOIN outbox_unacked AS u
                            ON u.event_id = e.id AND u.subscriber = r.subscriber), '{}')::text
    FROM outbox_event AS e JOIN outbox_lane AS l ON l.id = e.lane_id
    WHERE e.stream_id = :stream_id AND e.identity = ANY(CAST(:identities AS text[]))
    ORDER BY e.id
    """
)

# A redelivery that changes a stored event (re-opens it, or refreshes its payload) counts in its
# lane's ``rewrites``: a committer that read the lane before may have advanced the old version,
# and must not move the cursor over it (``_MOVE_CURSORS``). Both statements carry this CTE.
_COUNT_REWRITE = """
    counted AS (
        UPDATE outbox_lane SET rewrites = rewrites + 1
        WHERE id = (SELECT lane_id FROM outbox_event WHERE id = :event_id)
    )"""

_REOPEN_OCCURRENCE = sa.text(
    f"""
    WITH reopened AS (
        DELETE FROM outbox_unacked
        WHERE event_id = :event_id AND subscriber = ANY(CAST(:reopen AS text[]))
          AND state = 'failed'
        RETURNING subscriber
    ),{_COUNT_REWRITE}
    UPDATE outbox_event
    SET payload = CAST(:payload AS jsonb), created_at = now(), resolved_at = NULL,
        recorded_by = nullif(:session, 0), snapshot = snapshot || CAST(:owners AS jsonb),
        resolved = ARRAY(SELECT r FROM unnest(resolved) AS r
                         WHERE r NOT IN (SELECT subscriber FROM reopened)),
        pending = pending + :added + (SELECT count(*) FROM reopened),
        failed = failed - (SELECT count(*) FROM reopened)
    WHERE id = :event_id
    RETURNING pg_notify('{RECORDED_CHANNEL}', stream_id::text)
    """
)

_REFRESH_PAYLOAD = sa.text(
    f"""
    WITH{_COUNT_REWRITE}
    UPDATE outbox_event SET payload = CAST(:payload AS jsonb) WHERE id = :event_id
    """
)

# A new occurrence's subscribers that rejected an earlier one (those that acked it are only
# listed in its ``resolved``).
_INSERT_CARRIED_UNACKED = sa.text(
    """
    INSERT INTO outbox_unacked (event_id, subscriber, state, reason)
    SELECT * FROM unnest(CAST(:event_ids AS bigint[]), CAST(:subscribers AS text[]),
                         CAST(:states AS text[]), CAST(:reasons AS text[]))
    ON CONFLICT DO NOTHING
    """
)


class Recording(StoreBase):
    async def record_events(
        self, conn: AsyncConnection, events: Sequence[EventToRecord], *, session_id: int = 0
    ) -> bool:
        """Record staged events: deduplicate by identity, allocate gap-free lane positions in
        this transaction, insert. Fills each event's ``event_id``, ``deliver_to`` and
        ``owners``. Returns whether an event was recorded already resolved (nobody to deliver it
        to), which may make its lane ready to advance. ``session_id``: the recording triggerer's
        session (triggerers with other sessions owed these events are notified).

        Events without identities are recorded by one statement, which needs no transaction
        around it (``autocommit()``); deduplicating identities takes several, in one."""
        new_events: list[tuple[EventToRecord, dict[str, str]]] = []
        by_stream: dict[int, list[EventToRecord]] = {}
        for item in events:
            if item.identity is None:
                new_events.append((item, {}))
            else:
                by_stream.setdefault(item.stream_id, []).append(item)
        locked: set[int] = set()
        owners_by_stream: dict[int, dict[str, int]] = {}
        if by_stream:
            # Redeliveries may change earlier occurrences: lock their lanes (and the batch's)
            # before reading them. Without identities the allocation below locks the lanes.
            locked = await self._lock_lanes(
                conn,
                {item.lane_id for item in events},
                stream_ids=list(by_stream),
                identities=sorted({e.identity for e in events if e.identity is not None}),
            )
            owners_by_stream = await self._live_owners(conn, list(by_stream), session_id)
        aliases: list[tuple[EventToRecord, EventToRecord]] = []
        for stream_id, identified in by_stream.items():
            identities = sorted({e.identity for e in identified if e.identity is not None})
            await conn.execute(
                _LOCK_PRIOR_OCCURRENCES, {"stream_id": stream_id, "identities": identities}
            )
            prior = await self._prior_occurrences(conn, stream_id, identities, locked)
            owners = owners_by_stream.get(stream_id, {})
            new_in_batch: dict[str, EventToRecord] = {}
            for item in identified:
                assert item.identity is not None
                item.owners = owners
                first_copy = new_in_batch.get(item.identity)
                if first_copy is not None:
                    # Delivered twice in one batch: the first copy reaches everyone already.
                    item.deliver_to = []
                    aliases.append((item, first_copy))
                    continue
                names = list(owners) if item.snapshot is None else list(item.snapshot)
                plan = plan_redelivery(names, prior.get(item.identity, ()))
                item.deliver_to = plan.deliver_to
                if plan.reuse_event_id is not None:
                    item.event_id = plan.reuse_event_id
                    item.reused = True
                    refresh = {"event_id": plan.reuse_event_id, "payload": item.payload_json}
                    if plan.deliver_to:
                        await conn.execute(
                            _REOPEN_OCCURRENCE,
                            {
                                **refresh,
                                "reopen": plan.reopen_failed,
                                "added": len(plan.add_to_snapshot),
                                # Each subscriber it goes to now is owed it through its
                                # current registration (a dead triggerer's no longer holds it).
                                "owners": json.dumps({n: owners.get(n) for n in plan.deliver_to}),
                                "session": session_id,
                            },
                        )
                    else:
                        await conn.execute(_REFRESH_PAYLOAD, refresh)
                    continue
                item.snapshot = plan.snapshot
                new_events.append((item, plan.carried))
                new_in_batch[item.identity] = item
        if not new_events:
            return False
        items = [item for item, _ in new_events]
        carried = [c for _, c in new_events]
        counts: dict[int, int] = {}
        for item in items:
            counts[item.lane_id] = counts.get(item.lane_id, 0) + 1
        lane_ids = sorted(counts)
        # Snapshots given as names are serialised once each (a batch's events mostly share one).
        snapshot_texts: list[str | None] = []
        pendings: list[int] = []
        last: Sequence[str] | None = None
        text = ""
        for item in items:
            if item.snapshot is None:
                snapshot_texts.append(None)
                pendings.append(-1)  # the stream's owners, as Postgres knows them
                continue
            if item.snapshot is not last:
                last = item.snapshot
                owners = owners_by_stream.get(item.stream_id, {})
                text = json.dumps({n: owners.get(n) for n in last})
            snapshot_texts.append(text)
            pendings.append(len(item.deliver_to) if item.identity is not None else len(last))
        n = len(items)
        any_carried = any(carried)
        stream_ids = [e.stream_id for e in items]
        rows = await conn.execute(
            _RECORD_EVENTS,
            {
                "session": session_id,
                "owner_stream_ids": sorted(set(stream_ids)),
                "lane_ids": lane_ids,
                "counts": [counts[i] for i in lane_ids],
                "stream_ids": ints(stream_ids),
                "event_lane_ids": ints([e.lane_id for e in items]),
                "identities": texts([e.identity for e in items]),
                "raws": [e.raw_json for e in items],
                "payloads": [e.payload_json for e in items],
                "snapshots": snapshot_texts,
                "resolveds": texts(
                    [json.dumps(list(c)) if c else None for c in carried]
                    if any_carried
                    else [None] * n
                ),
                "pendings": ints(pendings),
                "ackeds": ints(
                    [count_state(c, "acked") for c in carried] if any_carried else [0] * n
                ),
                "rejecteds": ints(
                    [count_state(c, "rejected") for c in carried] if any_carried else [0] * n
                ),
            },
        )
        ids, _, owners_text = rows.one()
        recorded_owners: dict[str, dict[str, int]] = json.loads(owners_text) if owners_text else {}
        for item, event_id in zip(items, ids, strict=True):
            item.event_id = event_id
            if item.snapshot is None:
                owners = recorded_owners.get(str(item.stream_id), {})
                item.owners = owners
                item.deliver_to = list(owners)
            elif item.identity is None:
                item.deliver_to = list(item.snapshot)
        carried_rows = [
            (item.event_id, s, state)
            for item, c in zip(items, carried, strict=True)
            for s, state in c.items()
            if state != "acked"
        ]
        born_resolved = any(not item.deliver_to for item in items)
        for duplicate, original in aliases:
            duplicate.event_id = original.event_id
        if carried_rows:
            await conn.execute(
                _INSERT_CARRIED_UNACKED,
                {
                    "event_ids": [r[0] for r in carried_rows],
                    "subscribers": [r[1] for r in carried_rows],
                    "states": [r[2] for r in carried_rows],
                    "reasons": ["resolved by an earlier delivery"] * len(carried_rows),
                },
            )
        return born_resolved

    @staticmethod
    async def _live_owners(
        conn: AsyncConnection, stream_ids: Sequence[int], session_id: int
    ) -> dict[int, dict[str, int]]:
        rows = await conn.execute(
            _READ_LIVE_OWNERS, {"owner_stream_ids": sorted(stream_ids), "session": session_id}
        )
        return {row[0]: json.loads(row[1]) for row in rows}

    @staticmethod
    async def _lock_lanes(
        conn: AsyncConnection,
        lane_ids: Iterable[int],
        *,
        stream_ids: Sequence[int] = (),
        identities: Sequence[str] = (),
    ) -> set[int]:
        rows = await conn.execute(
            _LOCK_LANES,
            {
                "lane_ids": sorted(lane_ids),
                "stream_ids": list(stream_ids),
                "identities": list(identities),
            },
        )
        return {row[0] for row in rows}

    async def _prior_occurrences(
        self, conn: AsyncConnection, stream_id: int, identities: list[str], locked: set[int]
    ) -> dict[str, list[PriorOccurrence]]:
        """The stored occurrences of ``identities``, read while their lanes are locked (an
        occurrence committed meanwhile on a lane not yet locked gets its lane locked first)."""
        params = {"stream_id": stream_id, "identities": identities}
        while True:
            rows = (await conn.execute(_READ_PRIOR_OCCURRENCES, params)).all()
            unlocked = {row[5] for row in rows} - locked
            if not unlocked:
                break
            more = await conn.execute(_LOCK_MORE_LANES, {"lane_ids": sorted(unlocked)})
            locked |= {row[0] for row in more}
        prior: dict[str, list[PriorOccurrence]] = {}
        for row in rows:
            prior.setdefault(row[1], []).append(
                PriorOccurrence(
                    event_id=row[0],
                    advanced=row[2],
                    pending=row[3],
                    snapshot=list(json.loads(row[4])),
                    states=json.loads(row[6]),
                )
            )
        return prior

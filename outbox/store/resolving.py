"""Resolving events for subscribers: first resolution wins; the trigger events they derived."""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING

import sqlalchemy as sa

from outbox.store.base import StoreBase
from outbox.store.rows import EVENT_ID, REASON, RECORDS, STATE, SUBSCRIBER, Resolution
from outbox.store.sqlparts import (
    EVENT_SEPARATOR,
    NAME_SEPARATOR,
    NOTIFY_CHANNEL,
    RECORDS_CHANNEL,
    holds_separator,
    int_array,
    ints,
    json_array,
    separated,
    text_array,
    texts,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy.ext.asyncio import AsyncConnection

# First resolution wins, by the event's row: a batch's resolutions of one event are applied
# together, and only if none of their subscribers is in the event's ``resolved`` list yet (a
# concurrent resolver's update is waited for and the condition checked again on its result).
# Trigger events are stored for the events updated (``_resolve`` passes those of ``acked``
# resolutions only); a ``rejected`` or ``failed`` resolution also leaves its reason. Returns the
# events not updated, normally none: ``OutboxStore.resolve`` applies their resolutions again one
# subscriber at a time, to tell which of them won.
#
# The batch comes grouped by event (``_resolve``): each event's subscribers as one text, names
# each preceded by ``NAME_SEPARATOR``, the events' texts joined by ``EVENT_SEPARATOR``. Splitting
# texts costs Postgres less than grouping a row per resolution, and a name may be empty.
_RESOLVE = sa.text(
    f"""
    WITH per_event AS (
        SELECT p.event_id, (string_to_array(p.names, E'\\x1f'))[2:] AS subscribers,
               p.acked, p.failed, p.rejected
        FROM unnest({int_array("event_ids")}, string_to_array(:names, E'\\x1e'),
                    {int_array("ackeds", "int")}, {int_array("faileds", "int")},
                    {int_array("rejecteds", "int")})
             AS p(event_id, names, acked, failed, rejected)
    ),
    updated AS (
        UPDATE outbox_event AS e
        SET resolved = e.resolved || p.subscribers, acked = e.acked + p.acked,
            failed = e.failed + p.failed, rejected = e.rejected + p.rejected,
            pending = e.pending - cardinality(p.subscribers),
            resolved_at = CASE WHEN e.pending = cardinality(p.subscribers) THEN now() END
        FROM per_event AS p
        WHERE e.id = p.event_id AND NOT e.resolved && p.subscribers
        RETURNING e.id, e.pending, e.lane_id, e.stream_id
    ),
    unacked AS (
        INSERT INTO outbox_unacked (event_id, subscriber, state, reason)
        SELECT x.event_id, x.subscriber, x.state, x.reason
        FROM unnest(CAST(:unacked_event_ids AS bigint[]), CAST(:unacked_subscribers AS text[]),
                    CAST(:unacked_states AS text[]), CAST(:unacked_reasons AS text[]))
             AS x(event_id, subscriber, state, reason)
        JOIN updated AS u ON u.id = x.event_id
    ),
    stored AS (
        INSERT INTO outbox_record (stream_id, event_id, subscriber, ordinal, payload)
        SELECT u.stream_id, x.event_id, x.subscriber, x.ordinal, x.payload
        FROM unnest({int_array("rec_event_ids")},
                    (string_to_array(:rec_subscribers, E'\\x1f'))[2:],
                    {int_array("rec_ordinals", "int")},
                    ARRAY(SELECT p FROM jsonb_array_elements(CAST(:rec_payloads AS jsonb))
                          WITH ORDINALITY AS a(p, i) ORDER BY i))
             WITH ORDINALITY AS x(event_id, subscriber, ordinal, payload, i)
        JOIN updated AS u ON u.id = x.event_id
        ORDER BY x.i
        RETURNING stream_id
    ),
    lanes_notified AS (
        SELECT pg_notify('{NOTIFY_CHANNEL}', string_agg(DISTINCT lane_id::text, ','))
        FROM updated WHERE pending = 0 HAVING count(*) > 0
    ),
    records_notified AS (
        SELECT pg_notify('{RECORDS_CHANNEL}', string_agg(DISTINCT stream_id::text, ','))
        FROM stored HAVING count(*) > 0
    )
    SELECT p.event_id FROM per_event AS p WHERE p.event_id NOT IN (SELECT id FROM updated)
    UNION ALL SELECT NULL FROM lanes_notified
    UNION ALL SELECT NULL FROM records_notified
    """
)


def _without_records(statement: str) -> str:
    """``_RESOLVE`` for resolutions that store no trigger events (the committer's timeout
    sweep fails deliveries): without the CTEs that insert records, so that it needs no INSERT
    on outbox_record (see outbox/roles.py)."""
    stored = re.compile(r"\n    stored AS \(.*?\n    \),(?=\n    lanes_notified AS)", re.DOTALL)
    notified = re.compile(r",\n    records_notified AS \(.*?\n    \)(?=\n    SELECT)", re.DOTALL)
    selected = "\n    UNION ALL SELECT NULL FROM records_notified"
    result, found = stored.subn("", statement)
    result, more = notified.subn("", result)
    if found != 1 or more != 1 or result.count(selected) != 1:
        raise RuntimeError("_RESOLVE changed: update _without_records to match it")
    return result.replace(selected, "")


_RESOLVE_WITHOUT_RECORDS = sa.text(_without_records(_RESOLVE.text))

_RESOLVED_AS = sa.text(
    f"""
    SELECT r.event_id, r.subscriber, r.state
    FROM unnest({int_array("event_ids")}, {text_array("subscribers")}, {text_array("states")})
         AS r(event_id, subscriber, state)
    JOIN outbox_event AS e ON e.id = r.event_id AND r.subscriber = ANY(e.resolved)
    LEFT JOIN outbox_unacked AS u ON u.event_id = r.event_id AND u.subscriber = r.subscriber
    WHERE coalesce(u.state, 'acked') = r.state
    """
)

_INSERT_UNBOUND_RECORDS = sa.text(
    f"""
    WITH stored AS (
        INSERT INTO outbox_record (stream_id, event_id, subscriber, ordinal, payload)
        SELECT stream_id, NULL, subscriber, 0, payload::jsonb
        FROM unnest(CAST(:stream_ids AS bigint[]), CAST(:subscribers AS text[]),
                    CAST(:payloads AS text[])) AS x(stream_id, subscriber, payload)
        RETURNING stream_id
    )
    SELECT pg_notify('{RECORDS_CHANNEL}', string_agg(DISTINCT stream_id::text, ','))
    FROM stored HAVING count(*) > 0
    """
)


class Resolving(StoreBase):
    async def resolve(self, conn: AsyncConnection, resolutions: Sequence[Resolution]) -> set[int]:
        """Store resolutions, first one wins; return the indexes (in ``resolutions``) of those
        that lost to an earlier one (stored before, or earlier in ``resolutions``). Trigger
        events are stored only with an ``acked`` resolution that won."""
        if not resolutions:
            return set()
        conflicted = await self._resolve(conn, resolutions)
        if not conflicted:
            return set()
        # Some resolution of these events lost (or raced a concurrent resolver): apply each of
        # them alone, so that the event's row tells which won. Rare: a redelivery, a timeout.
        lost: set[int] = set()
        rounds: list[list[int]] = []
        seen: dict[int, int] = {}
        for i, r in enumerate(resolutions):
            if r[EVENT_ID] in conflicted:
                n = seen[r[EVENT_ID]] = seen.get(r[EVENT_ID], -1) + 1
                if n == len(rounds):
                    rounds.append([])
                rounds[n].append(i)
        for one_per_event in rounds:
            refused = await self._resolve(conn, [resolutions[i] for i in one_per_event])
            lost.update(i for i in one_per_event if resolutions[i][EVENT_ID] in refused)
        return lost

    @staticmethod
    async def _resolve(conn: AsyncConnection, resolutions: Sequence[Resolution]) -> set[int]:
        """Apply ``resolutions``; return the events whose resolutions were not applied, none of
        them: one of their subscribers had resolved that event already, or is there twice."""
        by_event: dict[int, list[Resolution]] = {}
        for r in resolutions:
            group = by_event.get(r[EVENT_ID])
            if group is None:
                by_event[r[EVENT_ID]] = [r]
            else:
                group.append(r)
        refused: set[int] = set()
        event_ids: list[int] = []
        names: list[str] = []
        sizes: list[int] = []
        # In id order, the order the update then locks the rows in (a redelivery locks earlier
        # occurrences in id order too): two writers of the same events cannot deadlock.
        for event_id, group in sorted(by_event.items()):
            subscribers = [r[SUBSCRIBER] for r in group]
            if len(group) > 1 and len(set(subscribers)) < len(group):
                refused.add(event_id)  # one subscriber twice: apply them one at a time
                continue
            event_ids.append(event_id)
            names.append(separated(subscribers))
            sizes.append(len(group))
        if not event_ids:
            return refused
        unacked = [r for r in resolutions if r[STATE] != "acked" and r[EVENT_ID] not in refused]
        if unacked:
            failed = Counter(r[EVENT_ID] for r in unacked if r[STATE] == "failed")
            rejected = Counter(r[EVENT_ID] for r in unacked if r[STATE] == "rejected")
            faileds = [failed[event_id] for event_id in event_ids]
            rejecteds = [rejected[event_id] for event_id in event_ids]
            ackeds = [n - f - j for n, f, j in zip(sizes, faileds, rejecteds, strict=True)]
        else:
            ackeds, faileds, rejecteds = sizes, [0] * len(sizes), [0] * len(sizes)
        # Trigger events are stored with an acked resolution only, in batch order.
        stored = [
            r
            for r in resolutions
            if r[RECORDS] and r[STATE] == "acked" and (not refused or r[EVENT_ID] not in refused)
        ]
        rec_payloads = [payload for r in stored for payload in r[RECORDS]]
        if len(rec_payloads) == len(stored):
            # One trigger event each, the common case: without the inner loops, the parameters
            # cost a third less (1.5 us per event at S = 4).
            rec_event_ids = [r[EVENT_ID] for r in stored]
            rec_subscribers = [r[SUBSCRIBER] for r in stored]
            rec_ordinals = [0] * len(stored)
        else:
            rec_event_ids = [r[EVENT_ID] for r in stored for _ in r[RECORDS]]
            rec_subscribers = [r[SUBSCRIBER] for r in stored for _ in r[RECORDS]]
            rec_ordinals = [i for r in stored for i in range(len(r[RECORDS]))]
        names_text = EVENT_SEPARATOR.join(names)
        # One separator per resolution, one between events: else a name holds one.
        if names_text.count(NAME_SEPARATOR) != sum(sizes) or (
            names_text.count(EVENT_SEPARATOR) != len(names) - 1
        ):
            name = next(r[SUBSCRIBER] for r in resolutions if holds_separator(r[SUBSCRIBER]))
            raise ValueError(
                f"subscriber {name!r} contains a control character (\\x1e or \\x1f) that "
                "outbox uses as a separator; use a trigger id without one"
            )
        rows = await conn.execute(
            _RESOLVE if rec_payloads else _RESOLVE_WITHOUT_RECORDS,
            {
                "event_ids": ints(event_ids),
                "names": names_text,
                "ackeds": ints(ackeds),
                "faileds": ints(faileds),
                "rejecteds": ints(rejecteds),
                "unacked_event_ids": [r[EVENT_ID] for r in unacked],
                "unacked_subscribers": [r[SUBSCRIBER] for r in unacked],
                "unacked_states": [r[STATE] for r in unacked],
                "unacked_reasons": [r[REASON] for r in unacked],
                "rec_event_ids": ints(rec_event_ids),
                "rec_subscribers": separated(rec_subscribers),
                "rec_ordinals": ints(rec_ordinals),
                "rec_payloads": json_array(rec_payloads),
            },
        )
        return refused | {row[0] for row in rows if row[0] is not None}

    async def resolved_as(
        self, conn: AsyncConnection, resolutions: Sequence[Resolution]
    ) -> set[tuple[int, str, str]]:
        """The ``(event_id, subscriber, state)`` of ``resolutions`` whose delivery is stored in
        that state: after a commit whose outcome was lost with the connection, these are the
        resolutions that earlier attempt stored."""
        if not resolutions:
            return set()
        rows = await conn.execute(
            _RESOLVED_AS,
            {
                "event_ids": ints(r[EVENT_ID] for r in resolutions),
                "subscribers": texts([r[SUBSCRIBER] for r in resolutions]),
                "states": texts([r[STATE] for r in resolutions]),
            },
        )
        return {(row[0], row[1], row[2]) for row in rows}

    async def insert_unbound_records(
        self, conn: AsyncConnection, records: Sequence[tuple[int, str, str]]
    ) -> None:
        """Store fast-path trigger events ``(stream_id, subscriber, payload JSON)``."""
        if records:
            await conn.execute(
                _INSERT_UNBOUND_RECORDS,
                {
                    "stream_ids": [r[0] for r in records],
                    "subscribers": [r[1] for r in records],
                    "payloads": [r[2] for r in records],
                },
            )

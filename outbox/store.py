"""``OutboxStore``: the engine and every SQL statement outbox runs.

Statements that run per batch are written as SQL text over ``unnest`` arrays so that one round
trip carries a whole batch; the rest use the Core tables of ``outbox.schema``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import json.scanner
import re
from collections import Counter
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Self, TypeAlias

import sqlalchemy as sa
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from outbox.core import (
    BROKER_REDELIVERS,
    REGISTRATION_GONE,
    LaneEvent,
    PriorOccurrence,
    plan_redelivery,
)
from outbox.dburl import asyncpg_url, describe_connection_error, redact_url, scrub
from outbox.errors import (
    AccessDenied,
    ConfigurationError,
    DatabaseUnavailable,
    SchemaNotMigrated,
)
from outbox.fernet import ENV as FERNET_ENV
from outbox.fernet import InvalidToken, KwargsCipher, warn_unencrypted_once
from outbox.schema import lane, stream, subscriber

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
    from types import TracebackType

__all__ = (
    "HEAD_REVISION",
    "LaneStatus",
    "VERSION_TABLE",
    "EventToRecord",
    "LaneLease",
    "OutboxStore",
    "ResolutionRow",
    "asyncpg_url",
    "redact_url",
)

VERSION_TABLE = "outbox_alembic_version"
HEAD_REVISION = "0010"
NOTIFY_CHANNEL = "outbox_resolved"
RECORDS_CHANNEL = "outbox_records"
RECORDED_CHANNEL = "outbox_recorded"
# A delivery moved to a subscriber's newer registration (payload: stream ids).
MOVED_CHANNEL = "outbox_moved"
CONSUMER_CHANNEL = "outbox_consumer"
READER_LOCK_CLASS = 0x0B0C
_INSUFFICIENT_PRIVILEGE = "42501"


@dataclass(slots=True)
class EventToRecord:
    """One event as the manager stages it, before its lane position is allocated.

    ``snapshot``: who must resolve it. ``None`` (what the manager stages): the stream's
    subscribers registered at the moment Postgres records it, on whichever triggerer. A list of
    names (tests, tools) records them owed through no known registration: such deliveries end by
    the ack timeout alone.
    """

    stream_id: int
    lane_id: int
    identity: str | None
    raw_json: str | None
    payload_json: str
    snapshot: Sequence[str] | None = None
    # Filled by ``record_events``:
    event_id: int = 0
    deliver_to: Sequence[str] = ()
    # The registrations in force when it was recorded, by subscriber name (shared by the events
    # of a stream in one batch): a subscriber here is handed the event only through its own.
    owners: Mapping[str, int] = field(default_factory=dict)
    # A redelivery of an occurrence still pending: it is handed to those who still owe it.
    reused: bool = False


class ResolutionRow(NamedTuple):
    """One subscriber's resolution of one event, with the trigger events it derived."""

    stream_id: int
    event_id: int
    subscriber: str
    state: str
    reason: str | None
    records: Sequence[str] = ()
    # Never stored: whose trigger events these are, for the writer's ``on_resolved``.
    owner: int | None = None


# A resolution as the store and the writer take it: a ``ResolutionRow``, or a plain tuple of the
# same seven fields, which is what the manager queues. The cyclic garbage collector stops tracking
# a plain tuple once it has seen that it holds only numbers, strings and such tuples (never a
# ``NamedTuple``): the thousands of resolutions waiting for their commit at any time are then not
# visited again by each collection, and do not push the oldest generation into full collections
# (they were two fifths of what reached it).
Resolution: TypeAlias = "tuple[int, int, str, str, str | None, Sequence[str], int | None]"
# Its fields by position (the first is the stream's id).
EVENT_ID: Final = 1
SUBSCRIBER: Final = 2
STATE: Final = 3
REASON: Final = 4
RECORDS: Final = 5
OWNER: Final = 6


@dataclass(frozen=True, slots=True)
class LaneLease:
    lane_id: int
    stream_id: int
    lane_key: str
    advanced_through: int
    fencing_token: int
    attempts: int


@dataclass(slots=True)
class ReadyLane:
    """A lane whose next event is resolved: its cursor and the resolved events after it."""

    lane_id: int
    advanced_through: int
    events: list[LaneEvent]
    # How many times a redelivery had changed one of the lane's events when it was read.
    rewrites: int = 0


class AdvancedBatch(NamedTuple):
    """What a committer advanced on one lane, for its cursor move."""

    lease: LaneLease
    rewrites: int  # the lane's ``rewrites`` read with the events
    events: Sequence[LaneEvent]
    held: str | None = None  # the identity the lane's broker acknowledgement is held at


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


# The hot statements take their integer and short-text columns as one text parameter each (see
# ``_ints`` and ``_texts``): asyncpg encodes a list parameter element by element, which costs more
# Python time than the statement costs the server. Raw events and payloads stay text arrays.
def _int_array(param: str, sql_type: str = "bigint") -> str:
    return f"CAST(string_to_array(:{param}, ',') AS {sql_type}[])"


def _text_array(param: str) -> str:
    return (
        f"ARRAY(SELECT t FROM jsonb_array_elements_text(CAST(:{param} AS jsonb))"
        " WITH ORDINALITY AS a(t, i) ORDER BY i)"
    )


def _ints(values: Iterable[int]) -> str:
    """An integer column for ``_int_array``."""
    items = values if isinstance(values, list) else list(values)
    if items and items.count(items[0]) == len(items):
        # A constant column (a batch's stream, counts, ordinals): one conversion, a tenth of
        # the time.
        return ",".join([str(items[0])] * len(items))
    return ",".join(map(str, items))


def _texts(values: Sequence[str | None]) -> str:
    """A text column (``None`` for NULL) for ``_text_array``."""
    return json.dumps(values, separators=(",", ":"))


def _json_array(items: Sequence[str]) -> str:
    """JSON values (already JSON text) as one JSON array, for ``jsonb_array_elements``."""
    return "[" + ",".join(items) + "]"


# Postgres prints a jsonb value as exactly one JSON value with nothing around it: the C scanner
# decodes it without ``json.loads``' Python wrapper (two regular-expression matches a call), in a
# third of the time. The committer decodes one broker payload per event it advances.
# (typeshed types make_scanner's argument as the scanner class itself: it is the decoder.)
_scan_json: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(
    json.JSONDecoder()  # type: ignore[arg-type]
)


def _from_jsonb(text: str) -> Any:
    return _scan_json(text, 0)[0]


def holds_separator(name: str) -> bool:
    """Whether a subscriber name holds a character ``_RESOLVE`` splits its names on (a trigger
    id that does cannot subscribe)."""
    return NAME_SEPARATOR in name or EVENT_SEPARATOR in name


def _separated(names: Sequence[str]) -> str:
    """``names`` as one text for ``string_to_array(..., E'\\x1f')[2:]``: each name preceded by
    the separator, so that an empty name survives the split."""
    return NAME_SEPARATOR + NAME_SEPARATOR.join(names) if names else ""


def _count(states: dict[str, str], state: str) -> int:
    return sum(1 for s in states.values() if s == state) if states else 0


# A session is live while it is renewed; once it is not, it died at ``ended_at`` (a graceful stop,
# or the expiry a sweeper found, which it records there). What a registration is owed while its
# session is dead stays owed, for the stream's ack timeout from that death, in case the subscriber
# joins again (its triggerer restarting, or it moving to another): then it is moved over.
_SESSION_LIVE = "s.ended_at IS NULL AND s.expires_at > now()"
_DIED_AT = "coalesce(s.ended_at, s.expires_at)"

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
              AND ({_SESSION_LIVE}
                   OR {_DIED_AT} > now() - make_interval(secs => st.ack_timeout))
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
        FROM unnest({_int_array("stream_ids")}, {_int_array("event_lane_ids")},
                    {_text_array("identities")}, CAST(:raws AS text[]),
                    CAST(:payloads AS text[]), CAST(:snapshots AS text[]),
                    {_text_array("resolveds")}, {_int_array("pendings", "int")},
                    {_int_array("ackeds", "int")}, {_int_array("rejecteds", "int")})
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
NAME_SEPARATOR: Final = "\x1f"
EVENT_SEPARATOR: Final = "\x1e"
_RESOLVE = sa.text(
    f"""
    WITH per_event AS (
        SELECT p.event_id, (string_to_array(p.names, E'\\x1f'))[2:] AS subscribers,
               p.acked, p.failed, p.rejected
        FROM unnest({_int_array("event_ids")}, string_to_array(:names, E'\\x1e'),
                    {_int_array("ackeds", "int")}, {_int_array("faileds", "int")},
                    {_int_array("rejecteds", "int")})
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
        FROM unnest({_int_array("rec_event_ids")},
                    (string_to_array(:rec_subscribers, E'\\x1f'))[2:],
                    {_int_array("rec_ordinals", "int")},
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
    FROM unnest({_int_array("event_ids")}, {_text_array("subscribers")}, {_text_array("states")})
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
                             WHERE s.id = e.recorded_by AND {_SESSION_LIVE})
            THEN '{BROKER_REDELIVERS}'
        WHEN least(e.created_at,
                   CASE WHEN rs.id IS NOT NULL AND NOT ({_SESSION_LIVE.replace("s.", "rs.")})
                        THEN {_DIED_AT.replace("s.", "rs.")} END)
             <= now() - make_interval(secs => st.ack_timeout + :grace)
            THEN 'ack timeout (database clock)'
    END
"""

# The registration id in a snapshot entry (``null`` for events recorded before registrations).
_OWNER_ID = "(CASE WHEN jsonb_typeof(m.owner) = 'number' THEN (m.owner)::text::bigint END)"

_OWNER_JOINS = f"""
    LEFT JOIN outbox_subscriber AS r ON r.id = {_OWNER_ID}
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
        JOIN outbox_session AS s ON s.id = cur.session_id AND {_SESSION_LIVE}
        WHERE jsonb_typeof(m.owner) = 'number' AND m.name <> ALL(e.resolved)
          AND cur.id > {_OWNER_ID}
          AND NOT EXISTS (SELECT 1 FROM outbox_subscriber AS r WHERE r.id = {_OWNER_ID})
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
                          WHERE s.id = e.recorded_by AND {_SESSION_LIVE}))
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
    SELECT e.id, e.lane_id, e.raw::text, m.name, {_OWNER_ID}
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
                          WHERE s.id = e.recorded_by AND {_SESSION_LIVE}))
        ORDER BY e.position
        LIMIT :limit
    ) AS e
    CROSS JOIN LATERAL jsonb_each(e.snapshot) AS m(name, owner)
    WHERE l.stream_id = :stream_id AND jsonb_typeof(m.owner) = 'number'
      AND {_OWNER_ID} = ANY(CAST(:registrations AS bigint[]))
      AND m.name <> ALL(e.resolved)
    ORDER BY e.id, m.name
    """
)


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


class OutboxStore:
    """The database side of outbox: an ``AsyncEngine`` on asyncpg and all of outbox's SQL.

    Build it with ``OutboxStore.from_url(url)`` (it owns the engine it creates) or hand it an
    engine (which stays yours). Use it as ``async with`` or call ``aclose()``.
    """

    def __init__(
        self, engine: AsyncEngine, *, owns_engine: bool = False, fernet_key: str | None = None
    ) -> None:
        self.engine = engine
        self._owns_engine = owns_engine
        # Encrypts trigger kwargs at rest: ``fernet_key``, else $OUTBOX_FERNET_KEY, else
        # Airflow's $AIRFLOW__CORE__FERNET_KEY (comma-separated keys; the first encrypts).
        self._cipher = KwargsCipher.configured(fernet_key)
        # Work done in one statement runs outside a transaction block: no BEGIN and COMMIT (or
        # ROLLBACK) round trips around it.
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")

    @classmethod
    def from_url(
        cls, url: str, *, fernet_key: str | None = None, **engine_options: Any
    ) -> OutboxStore:
        """A store on a new engine for ``url`` (``postgresql://`` or ``postgresql+asyncpg://``);
        ``fernet_key`` as for the constructor."""
        cipher = KwargsCipher.configured(fernet_key)  # a bad key fails before any engine
        engine_options.setdefault("pool_size", 5)
        # No ping on every checkout (a round trip per transaction): after a database restart
        # the first statement on a stale connection fails as a disconnect, SQLAlchemy discards
        # the pool's connections, and every caller retries such errors (``is_transient``).
        engine_options.setdefault("pool_pre_ping", False)
        try:
            engine = create_async_engine(asyncpg_url(url), **engine_options)
        except ConfigurationError:
            raise
        except Exception as exc:  # an engine option that does not fit
            reason = scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else "", url)
            raise ConfigurationError(
                f"database URL {redact_url(url)!r}: {type(exc).__name__}: {reason}; "
                "check the engine options"
            ) from None
        store = cls(engine, owns_engine=True)
        store._cipher = cipher
        return store

    async def aclose(self) -> None:
        if self._owns_engine:
            await self.engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- schema -------------------------------------------------------------------------

    async def check_schema(self) -> None:
        """Raise ``SchemaNotMigrated`` unless the database is at outbox's head revision,
        ``AccessDenied`` if this role may not read outbox's tables, or ``DatabaseUnavailable``
        if it cannot be reached."""
        version = await self.schema_revision()
        if version is None:
            raise SchemaNotMigrated("the database has no outbox tables; run `outbox migrate`")
        if version < HEAD_REVISION:
            raise SchemaNotMigrated(
                f"the outbox schema is at revision {version!r}, this version needs "
                f"{HEAD_REVISION!r}; run `outbox migrate`"
            )
        if version != HEAD_REVISION:
            raise SchemaNotMigrated(
                f"the outbox schema is at revision {version!r}, newer than this version of "
                f"outbox knows (it needs {HEAD_REVISION!r}); upgrade outbox where this runs"
            )

    async def schema_revision(self) -> str | None:
        """The database's outbox revision, ``None`` if it has no outbox tables; raises
        ``AccessDenied`` or ``DatabaseUnavailable``."""
        try:
            async with self.engine.connect() as conn:
                version = await conn.scalar(sa.text(f"SELECT version_num FROM {VERSION_TABLE}"))
        except ProgrammingError as exc:
            if getattr(exc.orig, "sqlstate", None) == _INSUFFICIENT_PRIVILEGE:
                role = self.engine.url.username or "this role"
                raise AccessDenied(
                    f"role {role} may not read outbox's tables; as their owner, run `outbox "
                    f"grant --job triggerer|committer|reader --role {role}` for its job"
                ) from None
            return None
        except Exception as exc:  # cannot connect: refused, authentication, a bad option ...
            raise DatabaseUnavailable(describe_connection_error(self.engine, exc)) from None
        return None if version is None else str(version)

    # -- streams and lanes --------------------------------------------------------------

    async def ensure_stream(
        self, key_json: str, trigger_class: str, kwargs_json: str, ack_timeout: float
    ) -> int:
        """The id of the stream with this key, created or updated with the given builder (its
        kwargs encrypted when a Fernet key is configured)."""
        statement = sa.text(
            """
            INSERT INTO outbox_stream
                (key, trigger_class, trigger_kwargs, trigger_kwargs_encrypted, ack_timeout)
            VALUES (:key, :trigger_class, CAST(:kwargs AS jsonb), :encrypted, :ack_timeout)
            ON CONFLICT (key) DO UPDATE
            SET trigger_class = excluded.trigger_class, trigger_kwargs = excluded.trigger_kwargs,
                trigger_kwargs_encrypted = excluded.trigger_kwargs_encrypted,
                ack_timeout = excluded.ack_timeout
            RETURNING id
            """
        )
        plain, encrypted = self._kwargs_at_rest(kwargs_json)
        async with self.engine.begin() as conn:
            stream_id = await conn.scalar(
                statement,
                {
                    "key": key_json,
                    "trigger_class": trigger_class,
                    "kwargs": plain,
                    "encrypted": encrypted,
                    "ack_timeout": ack_timeout,
                },
            )
        assert stream_id is not None
        return int(stream_id)

    def _kwargs_at_rest(self, kwargs_json: str) -> tuple[str | None, str | None]:
        """``(plain, encrypted)`` kwargs to store: one of them."""
        if self._cipher is None:
            warn_unencrypted_once()
            return kwargs_json, None
        return None, self._cipher.encrypt(kwargs_json)

    def _kwargs_from_rest(self, key_json: str, plain: str | None, encrypted: str | None) -> str:
        """The kwargs' JSON of the stream ``key_json`` as stored."""
        if encrypted is None:
            if self._cipher is None:
                warn_unencrypted_once()
            return plain or "{}"
        if self._cipher is None:
            raise ConfigurationError(
                f"stream {key_json}: its trigger kwargs are encrypted and no Fernet key is "
                f"configured; set {FERNET_ENV} to the key they were encrypted with"
            )
        try:
            return self._cipher.decrypt(encrypted)
        except InvalidToken:
            raise ConfigurationError(
                f"stream {key_json}: its trigger kwargs do not decrypt with the Fernet keys in "
                f"{self._cipher.source}; add the key they were encrypted with (keys are "
                "comma-separated, the first encrypts)"
            ) from None

    async def rotate_fernet_key(self, *, decrypt: bool = False) -> int:
        """Encrypt every stream's trigger kwargs again with the first Fernet key (plain ones
        too), or with ``decrypt`` store them all plain; returns how many streams. One
        transaction: a stream that does not decrypt changes nothing."""
        if self._cipher is None and not decrypt:
            raise ConfigurationError(
                f"no Fernet key to encrypt with; set {FERNET_ENV} to the new key first, "
                "followed by the old ones, comma-separated"
            )
        async with self.engine.begin() as conn:
            rows = (
                await conn.execute(
                    sa.text(
                        "SELECT id, key, trigger_kwargs::text, trigger_kwargs_encrypted "
                        "FROM outbox_stream ORDER BY id FOR UPDATE"
                    )
                )
            ).all()
            updates = []
            for stream_id, key_json, plain, encrypted in rows:
                if decrypt:
                    kwargs_json = self._kwargs_from_rest(key_json, plain, encrypted)
                    updates.append({"id": stream_id, "plain": kwargs_json, "encrypted": None})
                    continue
                assert self._cipher is not None
                if encrypted is not None:
                    self._kwargs_from_rest(key_json, plain, encrypted)  # names the stream
                    token = self._cipher.rotate(encrypted)
                else:
                    token = self._cipher.encrypt(plain or "{}")
                updates.append({"id": stream_id, "plain": None, "encrypted": token})
            if updates:
                await conn.execute(
                    sa.text(
                        "UPDATE outbox_stream SET trigger_kwargs = CAST(:plain AS jsonb), "
                        "trigger_kwargs_encrypted = :encrypted WHERE id = :id"
                    ),
                    updates,
                )
        return len(rows)

    async def ensure_lanes(self, stream_id: int, lane_keys: Iterable[str]) -> dict[str, int]:
        """Lane ids by lane key for ``stream_id``, creating the lanes that do not exist."""
        keys = sorted(set(lane_keys))
        async with self.engine.begin() as conn:
            await conn.execute(
                sa.text(
                    """
                    INSERT INTO outbox_lane (stream_id, lane_key)
                    SELECT :stream_id, k FROM unnest(CAST(:keys AS text[])) AS k
                    ON CONFLICT (stream_id, lane_key) DO NOTHING
                    """
                ),
                {"stream_id": stream_id, "keys": keys},
            )
            rows = await conn.execute(
                sa.select(lane.c.lane_key, lane.c.id).where(
                    lane.c.stream_id == stream_id, lane.c.lane_key.in_(keys)
                )
            )
            return {row[0]: row[1] for row in rows}

    async def stream_builder(self, stream_id: int) -> tuple[str, str, dict[str, Any]]:
        """``(key, trigger class path, kwargs)`` of a stream, for rebuilding its producer.
        Raises a one-line ``ConfigurationError`` naming the stream if its kwargs are encrypted
        and no configured key decrypts them."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(
                        stream.c.key,
                        stream.c.trigger_class,
                        sa.cast(stream.c.trigger_kwargs, sa.Text),
                        stream.c.trigger_kwargs_encrypted,
                    ).where(stream.c.id == stream_id)
                )
            ).one()
        kwargs = json.loads(self._kwargs_from_rest(row[0], row[2], row[3]))
        return row[0], row[1], dict(kwargs)

    # -- the write path (the caller holds the connection: a transaction, or ``autocommit()``
    #    where each write is one statement) -----------------------------------------------

    def autocommit(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A connection whose statements each commit on their own: no BEGIN and COMMIT round
        trips, for work that is one statement (or atomic statement by statement)."""
        return self._autocommit.connect()

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
                "stream_ids": _ints(stream_ids),
                "event_lane_ids": _ints([e.lane_id for e in items]),
                "identities": _texts([e.identity for e in items]),
                "raws": [e.raw_json for e in items],
                "payloads": [e.payload_json for e in items],
                "snapshots": snapshot_texts,
                "resolveds": _texts(
                    [json.dumps(list(c)) if c else None for c in carried]
                    if any_carried
                    else [None] * n
                ),
                "pendings": _ints(pendings),
                "ackeds": _ints([_count(c, "acked") for c in carried] if any_carried else [0] * n),
                "rejecteds": _ints(
                    [_count(c, "rejected") for c in carried] if any_carried else [0] * n
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
            names.append(_separated(subscribers))
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
                "event_ids": _ints(event_ids),
                "names": names_text,
                "ackeds": _ints(ackeds),
                "faileds": _ints(faileds),
                "rejecteds": _ints(rejecteds),
                "unacked_event_ids": [r[EVENT_ID] for r in unacked],
                "unacked_subscribers": [r[SUBSCRIBER] for r in unacked],
                "unacked_states": [r[STATE] for r in unacked],
                "unacked_reasons": [r[REASON] for r in unacked],
                "rec_event_ids": _ints(rec_event_ids),
                "rec_subscribers": _separated(rec_subscribers),
                "rec_ordinals": _ints(rec_ordinals),
                "rec_payloads": _json_array(rec_payloads),
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
                "event_ids": _ints(r[EVENT_ID] for r in resolutions),
                "subscribers": _texts([r[SUBSCRIBER] for r in resolutions]),
                "states": _texts([r[STATE] for r in resolutions]),
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

    # -- the committer ----------------------------------------------------------------------

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
                    list(map(LaneEvent, *columns, _from_jsonb(payloads), superseded)),
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

    @contextlib.asynccontextmanager
    async def _listen(
        self, channels: Sequence[str], callback: Callable[[str, str], None]
    ) -> AsyncIterator[asyncio.Event]:
        lost = asyncio.Event()
        async with self.engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None

            def on_notify(_connection: object, _pid: object, channel: str, payload: str) -> None:
                callback(channel, payload)

            def on_terminated(*_: object) -> None:
                # The server went away (restart, failover, a killed backend): notifications
                # stop. Wake the caller so that it polls and listens again.
                lost.set()
                callback("", "")

            raw.add_termination_listener(on_terminated)
            for channel in channels:
                await raw.add_listener(channel, on_notify)
            try:
                yield lost
            finally:
                if lost.is_set() or raw.is_closed():
                    # Nothing to roll back on a dead connection: drop it from the pool.
                    with contextlib.suppress(Exception):
                        await conn.invalidate()
                else:
                    with contextlib.suppress(Exception):
                        for channel in channels:
                            await raw.remove_listener(channel, on_notify)
                    raw.remove_termination_listener(on_terminated)

    def listen_triggerer(
        self, callback: Callable[[str, str], None]
    ) -> AbstractAsyncContextManager[asyncio.Event]:
        """Call ``callback(channel, ids)`` when a triggerer records events owed to another's
        subscribers (``outbox_recorded``, stream ids), releases a stream's producer
        (``outbox_consumer``, stream ids), moves a delivery to a subscriber's newer registration
        (``outbox_moved``, stream ids), or resolves the next event of a lane
        (``outbox_resolved``, lane ids: another triggerer's subscribers may finish what this one
        advances); the context's value as with ``listen_resolved``."""
        return self._listen(
            (RECORDED_CHANNEL, CONSUMER_CHANNEL, NOTIFY_CHANNEL, MOVED_CHANNEL), callback
        )

    def listen_resolved(
        self, callback: Callable[[], None]
    ) -> AbstractAsyncContextManager[asyncio.Event]:
        """Call ``callback()`` whenever a transaction resolves the next event of some lane,
        while the context is open (``LISTEN`` on a connection of its own). The context's value
        is an event set (and ``callback()`` called) when that connection is lost: listen again.
        """
        return self._listen((NOTIFY_CHANNEL,), lambda _channel, _payload: callback())

    def listen_records(
        self, callback: Callable[[], None]
    ) -> AbstractAsyncContextManager[asyncio.Event]:
        """Call ``callback()`` whenever a transaction stores trigger events (the context's
        value as with ``listen_resolved``)."""
        return self._listen((RECORDS_CHANNEL,), lambda _channel, _payload: callback())

    async def release_leases(self, owner: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(_RELEASE_LEASES, {"owner": owner})

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

    # -- triggerer sessions, subscribers and consumers ------------------------------------

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

    async def failure_reason(self, event_id: int, name: str) -> str | None:
        """Why ``name``'s delivery of the event was failed (or rejected), if it was."""
        async with self._autocommit.connect() as conn:
            found = await conn.scalar(
                sa.text(
                    "SELECT reason FROM outbox_unacked "
                    "WHERE event_id = :event_id AND subscriber = :name"
                ),
                {"event_id": event_id, "name": name},
            )
        return None if found is None else str(found)

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
                        WHERE st.id = :stream_id AND {_SESSION_LIVE}
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

    # -- the reader -------------------------------------------------------------------------

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

    # -- operations -------------------------------------------------------------------------

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

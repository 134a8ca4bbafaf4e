"""Nothing on the hot path scans history.

A database holding a long advanced history (events, deliveries, records) runs the write path and
the committer: recording with identities (and a redelivery), resolving with trigger events, the
timeout sweep, a committer pass. Every statement they sent is explained again with its own
parameters, and no plan may read a whole outbox table: the history must cost nothing per event
(bench/retention.py measures the same with 10,000,000 rows).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from outbox import LaneCommitter
from outbox.core import canonical_json
from outbox.store import EventToRecord, ResolutionRow
from tests.test_committer import KEY, Producer

if TYPE_CHECKING:
    from outbox import OutboxStore

LANES = 4
HISTORY_PER_LANE = 25_000

HISTORY = f"""
WITH lanes AS (SELECT id, stream_id FROM outbox_lane),
events AS (
    INSERT INTO outbox_event (stream_id, lane_id, position, identity, raw, payload, snapshot,
                              resolved, pending, acked, rejected, created_at, resolved_at)
    SELECT l.stream_id, l.id, p, 'old-' || l.id || '-' || p, '{{}}', '"old"', '["s1", "s2"]',
           '{{s1,s2}}', 0, 1, 1, now() - interval '30 days', now() - interval '30 days'
    FROM lanes AS l, generate_series(1, {HISTORY_PER_LANE}) AS p
    RETURNING id, stream_id
),
unacked AS (
    INSERT INTO outbox_unacked (event_id, subscriber, state)
    SELECT e.id, 's2', 'rejected' FROM events AS e
)
INSERT INTO outbox_record (stream_id, event_id, subscriber, ordinal, payload, dispatched_at)
SELECT e.stream_id, e.id, 's1', 0, '{{"old": true}}', now() - interval '29 days' FROM events AS e
"""


async def test_hot_statements_use_indexes_with_a_long_history(store: OutboxStore) -> None:
    stream_id = await store.ensure_stream(
        canonical_json(KEY, what="key"), "tests.NotATrigger", "{}", 300.0
    )
    lane_ids = list((await store.ensure_lanes(stream_id, [str(i) for i in range(LANES)])).values())
    async with store.engine.begin() as conn:
        await conn.execute(sa.text(HISTORY))
        await conn.execute(
            sa.text(
                "UPDATE outbox_lane SET advanced_through = :n, next_position = :n + 1"
            ).bindparams(n=HISTORY_PER_LANE)
        )
    async with store.engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(sa.text("ANALYZE"))

    sent: dict[str, Any] = {}

    def capture(_c: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "outbox_" in statement and not statement.lstrip().upper().startswith("EXPLAIN"):
            sent.setdefault(statement, parameters)

    sa.event.listen(store.engine.sync_engine, "before_cursor_execute", capture)
    try:
        await _workload(store, stream_id, lane_ids)
    finally:
        sa.event.remove(store.engine.sync_engine, "before_cursor_execute", capture)

    assert any("pg_notify" in s for s in sent) and any("FOR NO KEY UPDATE" in s for s in sent)
    whole_table_reads = {}
    async with store.engine.connect() as conn:
        for statement, parameters in sent.items():
            rows = await conn.exec_driver_sql("EXPLAIN " + statement, parameters)
            plan = "\n".join(row[0] for row in rows)
            if (
                "Seq Scan on outbox_event" in plan
                or "Seq Scan on outbox_unacked" in plan
                or ("Seq Scan on outbox_record" in plan)
            ):
                whole_table_reads[statement.strip()[:200]] = plan
        await conn.rollback()
    assert not whole_table_reads, json.dumps(whole_table_reads, indent=1)[:4000]


async def _workload(store: OutboxStore, stream_id: int, lane_ids: list[int]) -> None:
    def staged(n: int, identity: str) -> EventToRecord:
        return EventToRecord(
            stream_id, lane_ids[n % LANES], identity, "{}", json.dumps(n), ["s1", "s2"]
        )

    events = [staged(n, f"new-{n}") for n in range(40)]
    async with store.engine.begin() as conn:
        await store.record_events(conn, events)
    async with store.engine.begin() as conn:
        await store.resolve(
            conn,
            [
                ResolutionRow(stream_id, e.event_id, s, "acked", None, [json.dumps({"n": 1})])
                for e in events[:30]
                for s in ("s1", "s2")
            ],
        )
    # A redelivery of an open event and of a resolved one (identities already stored).
    async with store.engine.begin() as conn:
        await store.record_events(conn, [staged(35, "new-35"), staged(1, "new-1")])
    lanes = LaneCommitter(store, producers={KEY: Producer()}, sweep_timeouts=True)
    assert await lanes.run_once() > 0
    await lanes.release()

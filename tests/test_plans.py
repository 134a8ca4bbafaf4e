"""Nothing on the hot path, nor status and metrics, scans history.

A database holding a long advanced history (events, deliveries, records) runs the write path and
the committer: recording with identities (and a redelivery), resolving with trigger events, the
timeout sweep, a committer pass, a reader's claim, ``outbox status`` and the committer's metrics
refresh. Every statement they sent is explained again with its own parameters, and no plan may
read a whole outbox table: the history must cost nothing per event (bench/retention.py measures
the same with 10,000,000 rows, bench/status.py status with 2,000,000 events). Status and metrics
are also run (EXPLAIN ANALYZE) and may read only a few rows of the history.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from outbox import LaneCommitter, OutboxReader
from outbox.core import canonical_json
from outbox.metrics import CommitterMetrics
from outbox.status import collect_status
from outbox.store import EventToRecord, ResolutionRow
from tests.test_committer import KEY, Producer

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy.ext.asyncio import AsyncConnection

    from outbox import OutboxRecord, OutboxStore

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


async def _long_history(store: OutboxStore) -> tuple[int, list[int]]:
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
    return stream_id, lane_ids


async def _statements_sent(
    store: OutboxStore, work: Callable[[], Awaitable[None]]
) -> dict[str, Any]:
    """Each outbox statement ``work`` sent, with its first parameters."""
    sent: dict[str, Any] = {}

    def capture(_c: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "outbox_" in statement and not statement.lstrip().upper().startswith("EXPLAIN"):
            sent.setdefault(statement, parameters)

    sa.event.listen(store.engine.sync_engine, "before_cursor_execute", capture)
    try:
        await work()
    finally:
        sa.event.remove(store.engine.sync_engine, "before_cursor_execute", capture)
    return sent


async def test_hot_statements_use_indexes_with_a_long_history(store: OutboxStore) -> None:
    stream_id, lane_ids = await _long_history(store)
    sent = await _statements_sent(store, lambda: _workload(store, stream_id, lane_ids))

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
    await _claim_some(store)
    await _status_and_metrics(store)


async def _claim_some(store: OutboxStore) -> None:
    async def take(conn: AsyncConnection, records: list[OutboxRecord]) -> None:
        assert records

    assert await OutboxReader(store, batch_size=10).process(take) == 10


async def _status_and_metrics(store: OutboxStore) -> None:
    status = await collect_status(store)
    assert len(status["lanes"]) == LANES
    await CommitterMetrics().refresh(store)


# The rows of history a status statement may touch: the new events after the cursors (40) and
# their records, far below the 100,000 events and records behind them.
STATUS_ROWS_READ_LIMIT = 1000


async def test_status_and_metrics_read_only_the_backlog_of_a_long_history(
    store: OutboxStore,
) -> None:
    stream_id, lane_ids = await _long_history(store)
    await _workload(store, stream_id, lane_ids)
    sent = await _statements_sent(store, lambda: _status_and_metrics(store))
    assert any("outbox_event" in s for s in sent) and any("outbox_record" in s for s in sent)
    read: dict[str, int] = {}
    async with store.engine.connect() as conn:
        for statement, parameters in sent.items():
            rows = await conn.exec_driver_sql(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters
            )
            plan = rows.scalar_one()
            read[statement.strip()[:120]] = _history_rows_read(plan[0]["Plan"])
        await conn.rollback()
    assert all(n <= STATUS_ROWS_READ_LIMIT for n in read.values()), read


def _history_rows_read(node: dict[str, Any]) -> int:
    """Rows the plan's scans of outbox_event and outbox_record produced or filtered away."""
    total = 0
    if node.get("Relation Name") in ("outbox_event", "outbox_record"):
        loops = node.get("Actual Loops", 1)
        produced = node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)
        total += int(produced * loops) + int(node.get("Heap Fetches", 0))
    for child in node.get("Plans", []):
        total += _history_rows_read(child)
    return total

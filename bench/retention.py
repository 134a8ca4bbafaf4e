"""Throughput with a large retained history against an empty database (issue 6: within 10%).

Two databases on one server: one empty, one holding ``--retained`` old rows (advanced events,
their rejections, dispatched records, in the proportions a stream with two subscribers, one
accepting and one rejecting, leaves: one event, one ``outbox_unacked`` row, one record) as
retention keeps them until ``outbox prune``. On each,
the same write path runs: N events recorded over 4 lanes, resolved by S subscribers with one
trigger event each (group commits of 1,000 events), then advanced by a ``LaneCommitter`` pass.
Printed: events/s on each and the ratio; the runs alternate, medians of ``--repeat``.

    python bench/retention.py                 # 10,000,000 retained rows, N=20,000, S=4
    python bench/retention.py --tiny          # CI: 100,000 rows, N=2,000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pgsupport import bench_database

from outbox import AdvanceItem, LaneCommitter, OutboxStore, SharedStreamProducer
from outbox.core import canonical_json
from outbox.store import EventToRecord, ResolutionRow

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

KEY = ("bench", "retention")
LANES = 4

# Old, advanced history: lanes 1..4 of an old stream, events acked by one subscriber (with one
# dispatched record) and rejected by the other; created a week ago.
_FILL = """
WITH s AS (
    INSERT INTO outbox_stream (key, trigger_class, trigger_kwargs, ack_timeout)
    VALUES ('["history"]', 'bench.Old', '{}', 300) RETURNING id
),
l AS (
    INSERT INTO outbox_lane (stream_id, lane_key, next_position, advanced_through)
    SELECT s.id, g::text, :per_lane + 1, :per_lane FROM s, generate_series(1, 4) AS g
    RETURNING id, stream_id
),
e AS (
    INSERT INTO outbox_event (stream_id, lane_id, position, identity, raw, payload, snapshot,
                              resolved, pending, acked, rejected, created_at, resolved_at)
    SELECT l.stream_id, l.id, p, 'h:' || l.id || ':' || p, '{"n": 1}', '"receipt"',
           '["a", "b"]', '{a,b}', 0, 1, 1, now() - interval '7 days', now() - interval '7 days'
    FROM l, generate_series(1, :per_lane) AS p
    RETURNING id, stream_id
),
d AS (
    INSERT INTO outbox_unacked (event_id, subscriber, state, reason, resolved_at)
    SELECT e.id, 'b', 'rejected', 'not for b', now() - interval '7 days' FROM e
)
INSERT INTO outbox_record (stream_id, event_id, subscriber, ordinal, payload, created_at,
                           dispatched_at)
SELECT e.stream_id, e.id, 'a', 0, '{"n": 1}', now() - interval '7 days', now() - interval '6 days'
FROM e
"""


class CountingProducer(SharedStreamProducer):
    def __init__(self) -> None:
        self.advanced = 0

    async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:  # pragma: no cover
        raise NotImplementedError
        yield

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        self.advanced += len(batch)


async def fill(url: str, rows: int) -> None:
    per_lane = max(1, rows // 3 // LANES)  # an event brings a rejection and a record
    async with OutboxStore.from_url(url) as store, store.engine.begin() as conn:
        await conn.execute(sa.text(_FILL), {"per_lane": per_lane})
        await conn.execute(sa.text("ANALYZE"))


async def one_run(url: str, events: int, subscribers: int, run: int) -> float:
    async with OutboxStore.from_url(url) as store:
        key = (*KEY, run)
        stream_id = await store.ensure_stream(
            canonical_json(key, what="key"), "bench.X", "{}", 300.0
        )
        lanes = await store.ensure_lanes(stream_id, [str(i) for i in range(LANES)])
        lane_ids = [lanes[str(i)] for i in range(LANES)]
        names = [f"s{i}" for i in range(subscribers)]
        producer = CountingProducer()
        committer = LaneCommitter(store, producers={key: producer}, sweep_timeouts=False)
        started = time.perf_counter()
        for first in range(0, events, 1000):
            staged = [
                EventToRecord(
                    stream_id, lane_ids[n % LANES], f"{run}:{n}", '{"n": 1}', json.dumps(n), names
                )
                for n in range(first, min(events, first + 1000))
            ]
            async with store.engine.begin() as conn:
                await store.record_events(conn, staged)
            async with store.engine.begin() as conn:
                await store.resolve(
                    conn,
                    [
                        ResolutionRow(stream_id, e.event_id, name, "acked", None, ('{"t": 1}',))
                        for e in staged
                        for name in names
                    ],
                )
            while await committer.run_once(stream_ids=[stream_id]):
                pass
        elapsed = time.perf_counter() - started
        assert producer.advanced == events, (producer.advanced, events)
    return events / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--retained", type=int, default=10_000_000, help="rows kept from history")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--subscribers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a quick run for CI")
    args = parser.parse_args(argv)
    if args.tiny:
        args.retained, args.events, args.repeat = 100_000, 2_000, 1
    with bench_database(None) as empty, bench_database(None) as full:
        began = time.perf_counter()
        asyncio.run(fill(full, args.retained))
        print(f"filled {args.retained:,} retained rows in {time.perf_counter() - began:.1f} s")
        rates: dict[str, list[float]] = {"empty": [], "retained": []}
        for run in range(args.repeat):
            for name, url in (("empty", empty), ("retained", full)):
                rates[name].append(asyncio.run(one_run(url, args.events, args.subscribers, run)))
    empty_rate = statistics.median(rates["empty"])
    full_rate = statistics.median(rates["retained"])
    print(
        f"N={args.events:,} events x {args.subscribers} subscribers, median of {args.repeat}: "
        f"empty database {empty_rate:,.0f} events/s; with {args.retained:,} retained rows "
        f"{full_rate:,.0f} events/s = {full_rate / empty_rate:.2f} x (target >= 0.90)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The lane committer: how soon a resolved event is advanced, and how fast a backlog drains.

1. Latency: events are recorded and resolved at a steady rate (default 1,000 per second, in
   group commits every 10 ms, over 4 lanes) while a ``LaneCommitter.run()`` woken by
   ``LISTEN/NOTIFY`` advances them. For each event: from the commit of its last resolution to
   the start of the ``advance`` call that carries it. Target: p99 <= 50 ms at 1,000 events/s.
2. Throughput: a resolved backlog (default 20,000 events over 4 lanes, batch size 1,000) is
   drained by ``run_once`` passes; advances and events per second, and the ratio of that time to
   the same number of bare ``SELECT 1`` round trips as the passes made statements, measured in
   the same run on the same engine.

    python bench/committer_latency.py            # full: 20 s at 1,000 events/s, 20,000 backlog
    python bench/committer_latency.py --tiny     # CI: 2 s, 2,000 backlog

Postgres: ``--database-url`` names a migrated database the benchmark may empty and fill;
without it a fresh database is made on ``$PGHOST:$PGPORT`` when set, else on a throwaway
cluster.
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
from pgsupport import OUTBOX_TABLES, bench_database

from outbox import AdvanceItem, LaneCommitter, OutboxStore, SharedStreamProducer
from outbox.core import canonical_json
from outbox.store import EventToRecord, ResolutionRow

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

KEY = ("bench", "committer")
LANES = 4


class TimingProducer(SharedStreamProducer):
    """Notes when each payload's advance started."""

    def __init__(self, expect: int = 0) -> None:
        self.started: dict[int, float] = {}
        self.calls = 0
        self.expect = expect
        self.all_started = asyncio.Event()

    async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:  # pragma: no cover
        raise NotImplementedError
        yield

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        now = time.perf_counter()
        self.calls += 1
        for payload, _ in batch:
            self.started[payload] = now
        if self.expect and len(self.started) >= self.expect:
            self.all_started.set()


async def setup(store: OutboxStore) -> tuple[int, list[int]]:
    # Empty, so that a database used before holds no lease of an earlier run's committer (the
    # new one would wait out its expiry) and no backlog.
    async with store.engine.begin() as conn:
        await conn.execute(sa.text(f"TRUNCATE {OUTBOX_TABLES}"))
    stream_id = await store.ensure_stream(canonical_json(KEY, what="key"), "bench.X", "{}", 300.0)
    lanes = await store.ensure_lanes(stream_id, [str(i) for i in range(LANES)])
    return stream_id, [lanes[str(i)] for i in range(LANES)]


async def record_and_resolve(
    store: OutboxStore, stream_id: int, lane_ids: list[int], payloads: range
) -> None:
    events = [
        EventToRecord(stream_id, lane_ids[p % LANES], None, None, str(p), ["s"]) for p in payloads
    ]
    async with store.engine.begin() as conn:
        await store.record_events(conn, events)
        await store.resolve(
            conn, [ResolutionRow(stream_id, e.event_id, "s", "acked", None) for e in events]
        )


async def latency(store: OutboxStore, rate: int, seconds: float) -> dict[str, Any]:
    stream_id, lane_ids = await setup(store)
    total = int(rate * seconds)
    producer = TimingProducer(expect=total)
    committer = LaneCommitter(store, producers={KEY: producer}, poll_interval=1.0)
    runner = asyncio.create_task(committer.run())
    for _ in range(500):  # until it listens, so the first events wake it too
        if committer.listening:
            break
        await asyncio.sleep(0.01)
    committed_at: dict[int, float] = {}
    tick = 0.01
    per_tick = max(1, round(rate * tick))
    start = time.perf_counter()
    sent = 0
    while sent < total:
        due = start + (sent // per_tick) * tick
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        batch = range(sent, min(total, sent + per_tick))
        await record_and_resolve(store, stream_id, lane_ids, batch)
        now = time.perf_counter()
        for p in batch:
            committed_at[p] = now
        sent = batch.stop
    await asyncio.wait_for(producer.all_started.wait(), 30)
    committer.request_stop()
    await runner
    delays = sorted((producer.started[p] - committed_at[p]) * 1000 for p in committed_at)
    return {
        "events": total,
        "rate": rate,
        "advance_calls": producer.calls,
        "p50_ms": statistics.median(delays),
        "p99_ms": delays[int(0.99 * (len(delays) - 1))],
        "max_ms": delays[-1],
    }


async def throughput(store: OutboxStore, backlog: int, batch_size: int) -> dict[str, Any]:
    stream_id, lane_ids = await setup(store)
    for start in range(0, backlog, 5000):
        await record_and_resolve(
            store, stream_id, lane_ids, range(start, min(backlog, start + 5000))
        )
    producer = TimingProducer()
    committer = LaneCommitter(store, producers={KEY: producer}, batch_size=batch_size)
    statements = 0

    def count(*_: Any) -> None:
        nonlocal statements
        statements += 1

    # Every statement the passes send (BEGIN and COMMIT go by the driver, not counted).
    sa.event.listen(store.engine.sync_engine, "before_cursor_execute", count)
    began = time.perf_counter()
    while await committer.run_once():
        pass
    elapsed = time.perf_counter() - began
    sa.event.remove(store.engine.sync_engine, "before_cursor_execute", count)
    async with store.engine.connect() as conn:
        began = time.perf_counter()
        for _ in range(statements):
            await conn.execute(sa.text("SELECT 1"))
        select_one = time.perf_counter() - began
    return {
        "events": backlog,
        "advance_calls": producer.calls,
        "seconds": elapsed,
        "events_per_s": backlog / elapsed,
        "advances_per_s": producer.calls / elapsed,
        "statements": statements,
        "select1_seconds": select_one,
        "ratio_to_select1": elapsed / select_one,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    async with OutboxStore.from_url(args.database_url) as store:
        lat = await latency(store, args.rate, args.seconds)
        thr = await throughput(store, args.backlog, args.batch_size)
    return {"latency": lat, "throughput": thr}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url")
    parser.add_argument("--rate", type=int, default=1000, help="events per second resolved")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--backlog", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--tiny", action="store_true", help="a quick run for CI")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.tiny:
        args.seconds, args.backlog = 2.0, 2000
    with bench_database(args.database_url) as url:
        args.database_url = url
        result = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(result))
        return 0
    lat, thr = result["latency"], result["throughput"]
    print(
        f"latency at {lat['rate']} events/s over {lat['events']} events "
        f"({lat['advance_calls']} advances): p50 {lat['p50_ms']:.1f} ms, "
        f"p99 {lat['p99_ms']:.1f} ms, max {lat['max_ms']:.1f} ms (target p99 <= 50 ms)"
    )
    print(
        f"backlog of {thr['events']} events: {thr['events_per_s']:,.0f} events/s, "
        f"{thr['advances_per_s']:,.1f} advances/s; {thr['seconds']:.3f} s = "
        f"{thr['ratio_to_select1']:.2f} x the time of {thr['statements']} bare SELECT 1 "
        f"round trips ({thr['select1_seconds']:.3f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

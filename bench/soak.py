"""Soak: a steady stream through the manager for a long time; does anything drift?

One producer yields raw events at a steady rate (default 1,000 per second, over 4 lanes; if the
manager pauses it, the producer catches up as a broker backlog would). Four subscribers each
yield one ``TriggerEvent`` for a quarter of the events (so every event is resolved by all four
and 1,000 records per second are stored). The manager's in-process committer advances the
lanes; an ``OutboxReader`` marks records dispatched; advanced events and dispatched records
older than ``--retention`` seconds are pruned, so the database stays bounded as in production.

Printed per window (a minute by default; a quarter of the run when it is shorter):

* resident memory of this process (psutil), and as a ratio to the first window after warm-up;
* lane lag: events recorded but not yet advanced, summed over the lanes (sampled each second;
  median and max);
* advance latency: from the producer's yield of an event to the start of the ``advance`` call
  that carries it (p50, p99);
* throughput: events advanced per second, as a ratio to the offered rate; records dispatched.

The verdict compares the last window with the first window after warm-up: resident memory may
grow by at most max(10 %, 16 MB), the median lane lag may be at most max(2 x, 1 second of
events), and the advanced rate must be at least 95 % of the offered rate.

    python bench/soak.py                  # 30 minutes at 1,000 events/s
    python bench/soak.py --seconds 20     # CI
    python bench/soak.py --strict         # exit 1 unless the verdict is flat

Postgres: ``--database-url`` names a migrated database the soak may fill; without it a fresh
database is made on ``$PGHOST:$PGPORT`` when set, else on a throwaway cluster (durable defaults).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import psutil
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pgsupport import bench_database

from outbox import (
    BaseEventTrigger,
    OutboxReader,
    OutboxStore,
    SharedStreamManager,
    SharedStreamProducer,
    TriggerEvent,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Hashable, Sequence

    from sqlalchemy.ext.asyncio import AsyncConnection

    from outbox import AdvanceItem, OutboxRecord

SUBSCRIBERS = 4
TICK = 0.01  # the producer yields what is due every 10 ms


class SteadyProducer(SharedStreamProducer):
    """Yields event n at ``start + n / rate`` (or as soon after as the manager lets it);
    notes each event's yield time and measures the latency when it is advanced."""

    def __init__(self, rate: int, lanes: int) -> None:
        self.rate = rate
        self.lanes = lanes
        self.yielded = 0
        self.advanced = 0
        self.unclean = 0
        self.yield_times: dict[int, float] = {}
        self.latencies: list[float] = []

    async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
        start = time.perf_counter()
        while True:
            due = int((time.perf_counter() - start) * self.rate)
            while self.yielded < due:
                n = self.yielded
                self.yield_times[n] = time.perf_counter()
                self.yielded += 1
                yield {"n": n}, n
            await asyncio.sleep(TICK)

    def get_advance_lane(self, broker_payload: Any) -> Hashable:
        return int(broker_payload) % self.lanes

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        now = time.perf_counter()
        for payload, outcome in batch:
            started = self.yield_times.pop(payload, None)
            if started is not None:
                self.latencies.append(now - started)
            if not outcome.is_clean:
                self.unclean += 1
        self.advanced += len(batch)


class SoakTrigger(BaseEventTrigger):
    """Subscriber ``index`` yields a trigger event for the raw events with n % 4 == index."""

    PRODUCER: ClassVar[SteadyProducer | None] = None

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return "bench.soak.SoakTrigger", {"index": self.index}

    def shared_stream_key(self) -> Hashable:
        return ("soak", "stream")

    @classmethod
    def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> SharedStreamProducer:
        assert cls.PRODUCER is not None
        return cls.PRODUCER

    async def filter_shared_stream(
        self, shared_stream: AsyncIterator[Any]
    ) -> AsyncIterator[TriggerEvent]:
        async for raw in shared_stream:
            if raw["n"] % SUBSCRIBERS == self.index:
                yield TriggerEvent({"n": raw["n"], "by": self.index})

    async def run(self) -> AsyncIterator[TriggerEvent]:  # pragma: no cover - not run here
        yield TriggerEvent({})


@dataclass
class Window:
    index: int
    seconds: float
    rss_mb: float
    lag_samples: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    yielded: int = 0
    advanced: int = 0
    dispatched: int = 0
    db_mb: float = 0.0

    def summary(self, rate: int) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(q: float) -> float:
            return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")

        return {
            "window": self.index,
            "seconds": round(self.seconds, 1),
            "rss_mb": round(self.rss_mb, 1),
            "db_mb": round(self.db_mb, 1),
            "lag_median": statistics.median(self.lag_samples) if self.lag_samples else 0,
            "lag_max": max(self.lag_samples, default=0),
            "p50_ms": round(pct(0.50), 1),
            "p99_ms": round(pct(0.99), 1),
            "yielded_per_s": round(self.yielded / self.seconds, 1),
            "advanced_per_s": round(self.advanced / self.seconds, 1),
            "advanced_ratio": round(self.advanced / self.seconds / rate, 3),
            "dispatched_per_s": round(self.dispatched / self.seconds, 1),
        }


_LAG = sa.text("SELECT coalesce(sum(next_position - 1 - advanced_through), 0) FROM outbox_lane")
_DB_SIZE = sa.text("SELECT pg_database_size(current_database())")


async def soak(url: str, seconds: float, rate: int, lanes: int, retention: float) -> dict[str, Any]:
    window_s = 60.0 if seconds >= 240 else seconds / 4
    warmup_windows = 1
    process = psutil.Process(os.getpid())
    producer = SteadyProducer(rate, lanes)
    SoakTrigger.PRODUCER = producer
    dispatched = 0

    async def handler(conn: AsyncConnection, records: list[OutboxRecord]) -> None:
        nonlocal dispatched
        dispatched += len(records)

    windows: list[dict[str, Any]] = []
    async with OutboxStore.from_url(url) as store:
        await store.check_schema()
        reader = OutboxReader(store, batch_size=1000, poll_interval=0.5)
        async with SharedStreamManager(store) as manager:
            consumers = [
                asyncio.ensure_future(
                    _drain(manager.subscribe(trigger_id=i, trigger=SoakTrigger(i)))
                )
                for i in range(SUBSCRIBERS)
            ]
            reading = asyncio.ensure_future(reader.run(handler))
            pruning = asyncio.ensure_future(_prune(store, retention))
            began = time.perf_counter()
            index = 0
            unclean = 0
            last = (producer.yielded, producer.advanced, 0)
            try:
                while time.perf_counter() - began < seconds:
                    w_start = time.perf_counter()
                    window = Window(index=index, seconds=0.0, rss_mb=0.0)
                    while time.perf_counter() - w_start < window_s:
                        await asyncio.sleep(1.0)
                        async with store.engine.connect() as conn:
                            window.lag_samples.append(int(await conn.scalar(_LAG) or 0))
                    async with store.engine.connect() as conn:
                        window.db_mb = int(await conn.scalar(_DB_SIZE) or 0) / 2**20
                    window.seconds = time.perf_counter() - w_start
                    window.rss_mb = process.memory_info().rss / 2**20
                    window.latencies, producer.latencies = producer.latencies, []
                    now = (producer.yielded, producer.advanced, dispatched)
                    window.yielded = now[0] - last[0]
                    window.advanced = now[1] - last[1]
                    window.dispatched = now[2] - last[2]
                    last = now
                    s = window.summary(rate)
                    windows.append(s)
                    print(_format(s), flush=True)
                    index += 1
                # Stopping fails what was recorded but not yet handed out (the broker
                # redelivers it): only outcomes before the stop must be clean.
                unclean = producer.unclean
            finally:
                for task in [*consumers, reading, pruning]:
                    task.cancel()
                for task in [*consumers, reading, pruning]:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
        if unclean:
            raise SystemExit(f"{unclean} events advanced while running were not clean")
    return {
        "rate": rate,
        "lanes": lanes,
        "subscribers": SUBSCRIBERS,
        "seconds": seconds,
        "windows": windows,
        "verdict": verdict(windows[warmup_windows:] or windows, rate),
    }


async def _drain(stream: AsyncIterator[TriggerEvent]) -> None:
    async for _ in stream:
        pass


async def _prune(store: OutboxStore, retention: float) -> None:
    while True:
        await asyncio.sleep(min(30.0, retention))
        while any(await store.prune(retention, batch=5000)):
            pass


def _format(s: dict[str, Any]) -> str:
    return (
        f"window {s['window']:>2} ({s['seconds']:.0f} s): rss {s['rss_mb']:.1f} MB, "
        f"db {s['db_mb']:.0f} MB, lane lag median {s['lag_median']:.0f} max {s['lag_max']}, "
        f"advance latency p50 {s['p50_ms']:.1f} ms p99 {s['p99_ms']:.1f} ms, "
        f"advanced {s['advanced_per_s']:.0f}/s ({s['advanced_ratio']:.3f} x offered), "
        f"yielded {s['yielded_per_s']:.0f}/s, dispatched {s['dispatched_per_s']:.0f}/s"
    )


def verdict(windows: list[dict[str, Any]], rate: int) -> dict[str, Any]:
    first, last = windows[0], windows[-1]
    memory_allowed = max(first["rss_mb"] * 0.10, 16.0)
    lag_allowed = max(2 * first["lag_median"], rate)
    advanced = sum(w["advanced_per_s"] * w["seconds"] for w in windows)
    total_s = sum(w["seconds"] for w in windows)
    checks = {
        "memory": last["rss_mb"] - first["rss_mb"] <= memory_allowed,
        "lag": last["lag_median"] <= lag_allowed,
        "throughput": advanced / total_s >= 0.95 * rate,
    }
    return {
        "memory_growth_mb": round(last["rss_mb"] - first["rss_mb"], 1),
        "memory_allowed_mb": round(memory_allowed, 1),
        "memory_ratio": round(last["rss_mb"] / first["rss_mb"], 3),
        "lag_first": first["lag_median"],
        "lag_last": last["lag_median"],
        "lag_allowed": lag_allowed,
        "advanced_ratio": round(advanced / total_s / rate, 3),
        "checks": checks,
        "flat": all(checks.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--database-url")
    parser.add_argument("--seconds", type=float, default=1800.0, help="run length (1800)")
    parser.add_argument("--rate", type=int, default=1000, help="raw events per second (1000)")
    parser.add_argument("--lanes", type=int, default=4, help="lanes (4)")
    parser.add_argument(
        "--retention", type=float, default=60.0, help="prune what is older than this (60 s)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON to FILE")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the verdict is drift")
    args = parser.parse_args(argv)
    with bench_database(args.database_url) as url:
        result = asyncio.run(soak(url, args.seconds, args.rate, args.lanes, args.retention))
    v = result["verdict"]
    print(
        f"verdict over {len(result['windows'])} windows at {args.rate} events/s, "
        f"{SUBSCRIBERS} subscribers, {args.lanes} lanes: "
        f"memory {v['memory_growth_mb']:+.1f} MB ({v['memory_ratio']:.3f} x first window; "
        f"allowed +{v['memory_allowed_mb']:.1f} MB), lane lag median {v['lag_first']:.0f} -> "
        f"{v['lag_last']:.0f} (allowed {v['lag_allowed']:.0f}), advanced "
        f"{v['advanced_ratio']:.3f} x offered (allowed >= 0.95): "
        f"{'FLAT' if v['flat'] else 'DRIFT ' + str([k for k, ok in v['checks'].items() if not ok])}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 1 if args.strict and not v["flat"] else 0


if __name__ == "__main__":
    sys.exit(main())

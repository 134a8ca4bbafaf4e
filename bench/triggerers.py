"""Several triggerers on one stream (issue 17): throughput of 2 triggerers x 2 subscribers
against 1 triggerer x 4 subscribers, the same events, printed as a ratio.

One producer yields N raw events over 4 lanes (a flow-control window of 1000 produced but not
advanced events, like a broker's max-in-flight), and 4 pass-through subscribers each store a
trigger event per raw event. With one triggerer, its manager hands every event to its four
subscribers. With two, the triggerer that holds the stream's consumer (the reader) records each
event for all four and hands it to its two; the other reads what its two are owed from Postgres
as it is recorded. A run is timed, in the reader, from the producer's first yield until every
event is advanced with four clean acks (its in-process committer advances). Each triggerer is a
process of its own.

    python bench/triggerers.py            # N=20000, 3 repetitions, alternating
    python bench/triggerers.py --tiny     # CI: N=500, 1 repetition
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pgsupport import OUTBOX_TABLES, bench_database, plain_url

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Hashable, Sequence

    from outbox import AdvanceItem

HERE = Path(__file__).resolve().parent
WINDOW = 1000
LANES = 4


def _classes() -> tuple[type[Any], type[Any]]:
    from outbox import BaseEventTrigger, SharedStreamProducer, TriggerEvent

    class Producer(SharedStreamProducer):
        """Yields ``(i, i)`` for i < N (at most WINDOW not yet advanced), then blocks."""

        n: ClassVar[int] = 0
        advanced: ClassVar[int] = 0
        unclean: ClassVar[int] = 0
        subscribers: ClassVar[int] = 4
        first: ClassVar[float | None] = None
        done: ClassVar[asyncio.Event | None] = None
        space: ClassVar[asyncio.Event | None] = None

        async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
            cls = type(self)
            assert cls.space is not None
            cls.first = time.perf_counter()
            for i in range(cls.n):
                while i - cls.advanced >= WINDOW:
                    cls.space.clear()
                    await cls.space.wait()
                yield i, i
            await asyncio.Event().wait()

        def get_advance_lane(self, broker_payload: Any) -> Hashable:
            return int(broker_payload) % LANES

        async def advance(self, batch: Sequence[AdvanceItem]) -> None:
            cls = type(self)
            for _, outcome in batch:
                if outcome.acked != cls.subscribers or outcome.failed or outcome.rejected:
                    cls.unclean += 1
            cls.advanced += len(batch)
            assert cls.space is not None and cls.done is not None
            cls.space.set()
            if cls.advanced >= cls.n:
                cls.done.set()

    class Trigger(BaseEventTrigger):
        def __init__(self, *, stream: str) -> None:
            super().__init__()
            self.stream = stream

        def serialize(self) -> tuple[str, dict[str, Any]]:
            return f"{__name__}.Trigger", {"stream": self.stream}

        def shared_stream_key(self) -> Hashable:
            return ("bench-triggerers", self.stream)

        @classmethod
        def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> SharedStreamProducer:
            return Producer()

        async def filter_shared_stream(
            self, shared_stream: AsyncIterator[Any]
        ) -> AsyncIterator[TriggerEvent]:
            async for raw in shared_stream:
                yield TriggerEvent({"seq": raw})

        async def run(self) -> AsyncIterator[TriggerEvent]:
            raise NotImplementedError
            yield  # pragma: no cover

    return Producer, Trigger


async def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One triggerer: the reader (``lead``) or a follower (``follow``), its subscribers."""
    from outbox import OutboxStore, SharedStreamManager

    producer_class, trigger_class = _classes()
    producer_class.n = args.events
    producer_class.done = asyncio.Event()
    producer_class.space = asyncio.Event()
    names = args.subscribers.split(",")
    received = dict.fromkeys(names, 0)
    everyone = asyncio.Event()

    async def drain(events: AsyncIterator[Any], name: str) -> None:
        async for _ in events:
            received[name] += 1
            if all(count >= args.events for count in received.values()):
                everyone.set()

    async with OutboxStore.from_url(args.database_url) as store:
        manager = SharedStreamManager(
            store,
            cohort_grace_period=args.grace,
            run_committer=args.worker == "lead",
            follow_interval=0.2,
        )
        tasks = [
            asyncio.create_task(
                drain(manager.subscribe(trigger_id=n, trigger=trigger_class(stream=args.stream)), n)
            )
            for n in names
        ]
        print("ready", flush=True)
        if args.worker == "lead":
            await asyncio.wait_for(producer_class.done.wait(), args.timeout)
            assert producer_class.first is not None
            wall = time.perf_counter() - producer_class.first
        else:
            await asyncio.wait_for(everyone.wait(), args.timeout)
            wall = 0.0
        await manager.stop_all()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "worker": args.worker,
        "events": args.events,
        "wall": wall,
        "unclean": producer_class.unclean,
        "received": received,
    }


def run_config(layout: Sequence[str], args: argparse.Namespace, url: str, stream: str) -> float:
    """Events/s of one run: ``layout`` lists each triggerer's subscribers; the first reads."""
    common = [sys.executable, __file__, "--database-url", url, "--events", str(args.events)]
    common += ["--stream", stream, "--timeout", str(args.timeout)]
    followers = [
        subprocess.Popen(
            [*common, "--worker", "follow", "--subscribers", subs, "--grace", "0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for subs in layout[1:]
    ]
    for proc in followers:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
    lead = subprocess.run(
        [*common, "--worker", "lead", "--subscribers", layout[0], "--grace", str(args.grace)],
        capture_output=True,
        text=True,
        check=False,
    )
    for proc in followers:
        proc.wait(args.timeout)
    if lead.returncode != 0:
        raise RuntimeError(f"reader failed: {lead.stderr[-2000:]}")
    result = json.loads(lead.stdout.strip().splitlines()[-1])
    if result["unclean"]:
        raise RuntimeError(f"{result['unclean']} events advanced without four clean acks")
    return float(args.events / result["wall"])


def orchestrate(args: argparse.Namespace) -> int:
    with bench_database(args.database_url) as url:
        print(f"N = {args.events:,} raw events, 4 subscribers, {args.repeat} repetition(s)")
        single: list[float] = []
        paired: list[float] = []
        import psycopg

        for repetition in range(args.repeat):
            for layout, into in (
                (["a,b,c,d"], single),
                (["a,b", "c,d"], paired),
            ):
                with psycopg.connect(plain_url(url), autocommit=True) as conn:
                    conn.execute(f"TRUNCATE {OUTBOX_TABLES} CASCADE")
                stream = f"r{repetition}-{len(layout)}"
                rate = run_config(layout, args, url, stream)
                into.append(rate)
                print(f"  {len(layout)} triggerer(s) {layout}: {rate:,.0f} events/s", flush=True)
        one, two = statistics.median(single), statistics.median(paired)
        print(
            f"\n| triggerers x subscribers | events/s (median) |\n|---|---|\n"
            f"| 1 x 4 | {one:,.0f} |\n| 2 x 2 | {two:,.0f} |\n\n"
            f"2 x 2 / 1 x 4 = {two / one:.2f}"
        )
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CI size: N=500, 1 repetition")
    p.add_argument("--events", "-n", type=int, default=20_000)
    p.add_argument("--repeat", "-r", type=int, default=3)
    p.add_argument("--database-url", default=os.environ.get("OUTBOX_BENCH_DATABASE_URL"))
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--worker", choices=("lead", "follow"), help=argparse.SUPPRESS)
    p.add_argument("--subscribers", help=argparse.SUPPRESS)
    p.add_argument("--stream", default="s", help=argparse.SUPPRESS)
    p.add_argument("--grace", type=float, default=1.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tiny:
        args.events, args.repeat = 500, 1
    if args.worker:
        print(json.dumps(asyncio.run(worker(args))), flush=True)
        return 0
    with tempfile.TemporaryDirectory():
        return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())

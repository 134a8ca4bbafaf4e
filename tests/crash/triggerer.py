"""A triggerer process for the crash test: kill it with SIGKILL anywhere, start it again.

Run as ``python -m tests.crash.triggerer --database-url URL --events N``. It runs a
``SharedStreamManager`` (with its in-process ``LaneCommitter``) with three subscribers on one
stream, fed by a durable fake broker: a Kafka-like log of N messages over a few partitions whose
committed offsets live in ``crash_broker_offset`` in the same database, so they survive the
process. ``open_stream`` resumes from the committed offsets; ``advance`` commits cumulatively
(never backwards) and appends every call to ``crash_advance_log`` for the test's checks.

``--commit-through last`` (the default) commits ``offset + 1`` of the batch's last item, as the
seed's Kafka example does; ``max`` commits through the batch's highest offset instead, which
stays correct when a lane's positions are not in broker order (see the xfail test in
``tests/test_crash_triggerer.py``: with ``last``, a killed and restarted triggerer can end with
every lane advanced and a partition's last offsets never committed).

It prints ``ready`` once subscribed, ``exhausted`` once the broker handed out the rest of the
log, a ``progress`` line about every second, and ``done`` before exiting 0 once every partition
is committed to its end and every recorded event is advanced. Exit code 3 means a subscriber
failed, which the crash test never expects.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
import time
from typing import TYPE_CHECKING, Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from outbox import (
    AdvanceItem,
    BaseEventTrigger,
    OutboxStore,
    SharedStreamManager,
    SharedStreamProducer,
    TriggerEvent,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Hashable, Sequence

SUBSCRIBERS = ("pass", "double", "filter")
"""Trigger ids: ``pass`` yields one trigger event per message, ``double`` two, ``filter`` one
for the messages ``keeps`` selects and none for the others."""

STREAM_KEY = ("crash-broker",)

BROKER_TABLES = (
    """
    CREATE TABLE IF NOT EXISTS crash_broker_offset (
        partition integer PRIMARY KEY,
        size bigint NOT NULL,
        committed bigint NOT NULL DEFAULT 0
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS crash_advance_log (
        id bigserial PRIMARY KEY,
        pid integer NOT NULL,
        partition integer NOT NULL,
        partitions integer NOT NULL,
        items integer NOT NULL,
        first_offset bigint NOT NULL,
        last_offset bigint NOT NULL,
        max_offset bigint NOT NULL,
        committed_before bigint NOT NULL,
        committed_after bigint NOT NULL,
        pending_events integer NOT NULL,
        unclean integer NOT NULL,
        at timestamptz NOT NULL DEFAULT clock_timestamp()
    )
    """,
)


def partition_sizes(events: int, partitions: int) -> list[int]:
    """Message ``i`` of the log is in partition ``i % partitions`` at offset
    ``i // partitions``."""
    return [events // partitions + (1 if p < events % partitions else 0) for p in range(partitions)]


def event_key(partition: int, offset: int) -> str:
    return f"{partition}:{offset}"


def keeps(partition: int, offset: int) -> bool:
    """Which messages the ``filter`` subscriber turns into a trigger event."""
    return (7 * partition + offset) % 3 != 0


def expected_payloads(subscriber: str, partition: int, offset: int) -> list[dict[str, Any]]:
    """The trigger events ``subscriber`` derives from message ``(partition, offset)``, in order."""
    copies = {"pass": 1, "double": 2, "filter": 1 if keeps(partition, offset) else 0}[subscriber]
    return [{"p": partition, "o": offset, "by": subscriber, "n": n} for n in range(copies)]


def asyncpg_dsn(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme.startswith("postgres"):
        raise SystemExit(f"--database-url {url!r} is not a postgresql:// URL")
    return f"postgresql+asyncpg://{rest}"


class FakeBroker(SharedStreamProducer):
    """A Kafka-like log whose committed offsets live in the database.

    ``open_stream`` yields ``(raw, (partition, offset))`` round-robin over the partitions from
    each partition's committed offset, in fetches of ``fetch`` messages paced to ``rate``
    messages a second (0: unpaced), then waits forever. ``advance`` commits the batch's last
    (``commit_through="last"``) or highest (``"max"``) offset + 1 for its partition with
    ``GREATEST``, and logs the call.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        sizes: Sequence[int],
        *,
        rate: float,
        fetch: int,
        advance_delay: float,
        commit_through: str,
        rng: random.Random,
    ) -> None:
        self.engine = engine
        self.sizes = list(sizes)
        self.rate = rate
        self.fetch = fetch
        self.advance_delay = advance_delay
        self.commit_through = commit_through
        self.rng = rng
        self.exhausted = asyncio.Event()
        self.yielded = 0
        self.advances = 0

    async def setup(self) -> None:
        async with self.engine.begin() as conn:
            # Serialise concurrent first runs; one process at a time is the norm anyway.
            await conn.execute(sa.text("SELECT pg_advisory_xact_lock(20240603)"))
            for statement in BROKER_TABLES:
                await conn.execute(sa.text(statement))
            await conn.execute(
                sa.text(
                    """
                    INSERT INTO crash_broker_offset (partition, size)
                    SELECT p - 1, s FROM unnest(CAST(:sizes AS bigint[]))
                        WITH ORDINALITY AS x(s, p)
                    ON CONFLICT (partition) DO NOTHING
                    """
                ),
                {"sizes": self.sizes},
            )

    async def committed(self) -> dict[int, int]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.text("SELECT partition, committed FROM crash_broker_offset")
            )
            return {int(r[0]): int(r[1]) for r in rows}

    async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
        committed = await self.committed()
        cursors = [committed.get(p, 0) for p in range(len(self.sizes))]
        started = time.monotonic()
        sent = 0
        while any(c < s for c, s in zip(cursors, self.sizes, strict=True)):
            for _ in range(self.fetch):
                for p, size in enumerate(self.sizes):
                    if cursors[p] < size:
                        offset = cursors[p]
                        cursors[p] += 1
                        self.yielded += 1
                        sent += 1
                        yield {"p": p, "o": offset}, (p, offset)
            if self.rate > 0:
                ahead = started + sent / self.rate - time.monotonic()
                await asyncio.sleep(max(0.0, ahead))
        self.exhausted.set()
        emit(f"exhausted yielded={self.yielded}")
        await asyncio.Event().wait()

    def get_advance_lane(self, broker_payload: Any) -> Hashable:
        return int(broker_payload[0])

    def get_event_key(self, broker_payload: Any) -> str | None:
        return event_key(int(broker_payload[0]), int(broker_payload[1]))

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        items = [(int(payload[0]), int(payload[1])) for payload, _ in batch]
        partition, last = items[-1]
        top = max(o for _, o in items)
        target = (top if self.commit_through == "max" else last) + 1
        unclean = sum(
            1
            for _, outcome in batch
            if (outcome.acked, outcome.failed, outcome.rejected) != (len(SUBSCRIBERS), 0, 0)
        )
        if self.advance_delay:
            await asyncio.sleep(self.rng.uniform(0, self.advance_delay))
        async with self.engine.begin() as conn:
            before = await conn.scalar(
                sa.text(
                    "SELECT committed FROM crash_broker_offset WHERE partition = :p FOR UPDATE"
                ),
                {"p": partition},
            )
            after = await conn.scalar(
                sa.text(
                    """
                    UPDATE crash_broker_offset SET committed = GREATEST(committed, :target)
                    WHERE partition = :p RETURNING committed
                    """
                ),
                {"p": partition, "target": target},
            )
            # Which of the batch's events still owe a resolution, as the database says now.
            pending = await conn.scalar(
                sa.text(
                    """
                    SELECT count(*) FROM outbox_event
                    WHERE identity = ANY(CAST(:keys AS text[])) AND pending > 0
                    """
                ),
                {"keys": sorted({event_key(p, o) for p, o in items})},
            )
            await conn.execute(
                sa.text(
                    """
                    INSERT INTO crash_advance_log
                        (pid, partition, partitions, items, first_offset, last_offset,
                         max_offset, committed_before, committed_after, pending_events, unclean)
                    VALUES (:pid, :p, :partitions, :items, :first, :last, :top, :before, :after,
                            :pending, :unclean)
                    """
                ),
                {
                    "pid": os.getpid(),
                    "p": partition,
                    "partitions": len({p for p, _ in items}),
                    "items": len(items),
                    "first": items[0][1],
                    "last": last,
                    "top": top,
                    "before": before,
                    "after": after,
                    "pending": pending,
                    "unclean": unclean,
                },
            )
        self.advances += 1
        # Widen the window between the broker commit and the committer's cursor update.
        if self.advance_delay:
            await asyncio.sleep(self.rng.uniform(0, self.advance_delay))


class CrashTrigger(BaseEventTrigger):
    """An ack-mode trigger on the process's ``FakeBroker``; ``mode`` is a ``SUBSCRIBERS`` name."""

    BROKER: ClassVar[FakeBroker | None] = None
    DELAY: ClassVar[float] = 0.0
    """Mean seconds ``double`` spends on a message (``filter``: half, ``pass``: none), so the
    subscribers drift apart and events wait with some of their resolutions pending."""

    def __init__(self, *, mode: str) -> None:
        super().__init__()
        if mode not in SUBSCRIBERS:
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self.delay = {"pass": 0.0, "double": 2.0, "filter": 1.0}[mode] * self.DELAY
        self.rng = random.Random(mode)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return f"{type(self).__module__}.{type(self).__qualname__}", {"mode": self.mode}

    def shared_stream_key(self) -> Hashable:
        return STREAM_KEY

    @classmethod
    def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> SharedStreamProducer:
        if cls.BROKER is None:
            raise RuntimeError("CrashTrigger.BROKER is not set")
        return cls.BROKER

    async def filter_shared_stream(
        self, shared_stream: AsyncIterator[Any]
    ) -> AsyncIterator[TriggerEvent]:
        async for raw in shared_stream:
            if self.delay:
                await asyncio.sleep(self.rng.uniform(0, self.delay))
            for payload in expected_payloads(self.mode, int(raw["p"]), int(raw["o"])):
                yield TriggerEvent(payload)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        raise NotImplementedError("CrashTrigger only runs on a shared stream")
        yield  # pragma: no cover - makes this an async generator


def emit(line: str) -> None:
    print(line, flush=True)


async def finished(engine: AsyncEngine) -> bool:
    """Every partition committed to its end, every lane advanced through its last position,
    no event owing a resolution."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.text(
                    """
                    SELECT
                      (SELECT bool_and(committed = size) FROM crash_broker_offset),
                      (SELECT coalesce(bool_and(advanced_through = next_position - 1), true)
                       FROM outbox_lane),
                      (SELECT count(*) FROM outbox_event WHERE pending > 0)
                    """
                )
            )
        ).one()
    return bool(row[0]) and bool(row[1]) and row[2] == 0


async def consume(name: str, events: AsyncIterator[TriggerEvent], counts: dict[str, int]) -> None:
    async for _ in events:
        counts[name] += 1


async def report(broker: FakeBroker, counts: dict[str, int], total: int) -> None:
    while True:
        await asyncio.sleep(1.0)
        committed = await broker.committed()
        emit(
            f"progress committed={sum(committed.values())}/{total} yielded={broker.yielded} "
            f"advances={broker.advances} trigger_events={sum(counts.values())}"
        )


async def main(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed if args.seed is not None else os.getpid())
    broker_engine = create_async_engine(asyncpg_dsn(args.database_url), pool_size=2)
    broker = FakeBroker(
        broker_engine,
        partition_sizes(args.events, args.partitions),
        rate=args.rate,
        fetch=args.fetch,
        advance_delay=args.advance_delay,
        commit_through=args.commit_through,
        rng=rng,
    )
    await broker.setup()
    CrashTrigger.BROKER = broker
    CrashTrigger.DELAY = args.subscriber_delay
    try:
        async with OutboxStore.from_url(args.database_url) as store:
            await store.check_schema()
            manager = SharedStreamManager(
                store,
                ack_timeout=args.ack_timeout,
                committer_options={
                    "owner": args.owner or f"crash-triggerer-{os.getpid()}",
                    "lease_seconds": args.lease_seconds,
                    "poll_interval": 0.2,
                },
            )
            counts = dict.fromkeys(SUBSCRIBERS, 0)
            # Subscribed in one go: all three are in the first event's snapshot.
            streams = {
                name: manager.subscribe(trigger_id=name, trigger=CrashTrigger(mode=name))
                for name in SUBSCRIBERS
            }
            consumers = [
                asyncio.create_task(consume(name, events, counts), name=f"consume-{name}")
                for name, events in streams.items()
            ]
            progress = asyncio.create_task(report(broker, counts, args.events))
            emit(f"ready pid={os.getpid()}")
            while True:
                for task in consumers:
                    if task.done():
                        error = task.exception()
                        emit(f"subscriber failed: {task.get_name()}: {error!r}")
                        return 3
                if broker.exhausted.is_set() and await finished(broker_engine):
                    break
                await asyncio.sleep(0.1)
            await manager.stop_all()
            progress.cancel()
            await asyncio.gather(*consumers, progress, return_exceptions=True)
            if not await finished(broker_engine):
                emit("not finished after stop_all")
                return 4
            emit(f"done pid={os.getpid()} trigger_events={sum(counts.values())}")
            return 0
    finally:
        await broker_engine.dispose()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.crash.triggerer", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--database-url", required=True, help="a migrated outbox database")
    parser.add_argument("--events", type=int, default=4000, help="messages in the log")
    parser.add_argument("--partitions", type=int, default=3, help="partitions (lanes)")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="messages a second the broker hands out (0: max)"
    )
    parser.add_argument("--fetch", type=int, default=50, help="messages per partition per fetch")
    parser.add_argument(
        "--advance-delay", type=float, default=0.0, help="max random latency around a commit"
    )
    parser.add_argument(
        "--subscriber-delay", type=float, default=0.0, help="mean seconds a subscriber spends"
    )
    parser.add_argument(
        "--commit-through",
        choices=("last", "max"),
        default="last",
        help="commit a batch through its last item (the seed's Kafka example) or highest offset",
    )
    parser.add_argument("--ack-timeout", type=float, default=600.0)
    parser.add_argument("--owner", default=None, help="committer owner (default: one per process)")
    parser.add_argument("--lease-seconds", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=None, help="for the advance latencies")
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    sys.exit(asyncio.run(main(parse_args())))

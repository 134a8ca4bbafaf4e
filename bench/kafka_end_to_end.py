"""End-to-end throughput on a Kafka-protocol broker: messages per second from the topic through
``SharedStreamManager`` (record, fan out, resolve with the trigger events in one transaction),
the in-process ``LaneCommitter`` and the partition commit, as a ratio to the broker's own consume
rate measured in the same run (a plain aiokafka consumer reading the same topic).

One topic of P partitions holds N messages (``{"n": i}``). Each cell of S subscribers runs on a
fresh consumer group with S pass-through subscribers (one ``TriggerEvent`` per message each); it
is timed from the moment the stream opens its consumer until the last partition's offset commit
(as the producer's ``on_commit`` hook reports it), and checked: every partition committed to its
end, N x S records in the outbox, every event clean. The plain consumer is timed from its
creation until it has read N messages, before the first cell and after the last; the faster is
the reference.

Needs the broker and Postgres the CI provides (``.ci/run`` exports them through
``scripts/services.sh``): ``KAFKA_BOOTSTRAP`` and ``OUTBOX_TEST_PG_URL`` (a superuser URL; the
benchmark creates, migrates and drops a database of its own there). Without them it says so and
exits 0.

    python bench/kafka_end_to_end.py              # N=50000, P=4, S=1 and 3
    python bench/kafka_end_to_end.py --tiny       # CI: N=2000, S=1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from outbox import TriggerEvent

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kafkasupport import create_topic, produce  # noqa: E402 (the bench directory is on the path only now)
from pgsupport import OUTBOX_TABLES  # noqa: E402


def server_url(url: str, database: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{database}"


def _value_of(n: int) -> bytes:
    return json.dumps({"n": n}).encode()


async def broker_rate(bootstrap: str, topic: str, messages: int, partitions: int) -> float:
    """Messages a second a plain consumer reads the topic at (from its creation, as for the
    manager's consumer, to the last message)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    started = time.perf_counter()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        read = 0
        while read < messages:
            batches = await consumer.getmany(timeout_ms=1000, max_records=500)
            read += sum(len(records) for records in batches.values())
        return messages / (time.perf_counter() - started)
    finally:
        await consumer.stop()


@dataclass
class Probe:
    """One cell's observations: when the stream's consumer was opened, and the commits."""

    ends: dict[int, int]
    started: float | None = None
    committed: dict[int, int] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)


PROBE = Probe({})


def bench_trigger() -> type[Any]:
    """The cell's trigger class (imported late: the skip path does not import outbox)."""
    from outbox import TriggerEvent
    from outbox.kafka import KafkaSharedStreamProducer, KafkaSharedTrigger

    class TimedProducer(KafkaSharedStreamProducer):
        async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
            PROBE.started = time.perf_counter()
            async for item in super().open_stream():
                yield item

        async def on_commit(
            self, topic: str, partition: int, offset: int, previous: int | None
        ) -> None:
            PROBE.committed[partition] = offset
            if PROBE.committed == PROBE.ends:
                PROBE.done.set()

    class PassThrough(KafkaSharedTrigger):
        @classmethod
        def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> TimedProducer:
            return TimedProducer(
                kwargs["topics"],
                bootstrap_servers=kwargs["bootstrap_servers"],
                group_id=kwargs["group_id"],
            )

        async def filter_shared_stream(
            self, shared_stream: AsyncIterator[Any]
        ) -> AsyncIterator[TriggerEvent]:
            async for raw in shared_stream:
                yield TriggerEvent(raw)

    return PassThrough


async def end_to_end(
    url: str, bootstrap: str, topic: str, ends: dict[int, int], subscribers: int, limit: float
) -> dict[str, Any]:
    import sqlalchemy as sa

    from outbox import OutboxStore, SharedStreamManager

    global PROBE
    trigger_class = bench_trigger()
    PROBE = probe = Probe(dict(ends))
    messages = sum(ends.values())
    group = f"bench-{uuid.uuid4().hex[:8]}"
    async with OutboxStore.from_url(url) as store:
        async with store.engine.begin() as conn:
            await conn.execute(sa.text(f"TRUNCATE {OUTBOX_TABLES}"))
        manager = SharedStreamManager(store, ack_timeout=max(60.0, limit))

        async def drain(events: AsyncIterator[TriggerEvent]) -> None:
            async for _ in events:
                pass

        tasks = [
            asyncio.create_task(
                drain(
                    manager.subscribe(
                        trigger_id=f"s{i}",
                        trigger=trigger_class(
                            topics=[topic], bootstrap_servers=bootstrap, group_id=group
                        ),
                    )
                )
            )
            for i in range(subscribers)
        ]
        try:
            await asyncio.wait_for(probe.done.wait(), limit)
            finished = time.perf_counter()
        finally:
            await manager.stop_all()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        async with store.engine.connect() as conn:
            records = await conn.scalar(sa.text("SELECT count(*) FROM outbox_record"))
            unclean = await conn.scalar(
                sa.text(
                    "SELECT count(*) FROM outbox_event WHERE acked <> :s OR failed + rejected > 0"
                ),
                {"s": subscribers},
            )
    assert probe.started is not None
    if records != messages * subscribers or unclean:
        raise SystemExit(
            f"end-to-end run wrong: {records} records (expected {messages * subscribers}), "
            f"{unclean} unclean events"
        )
    seconds = finished - probe.started
    return {"subscribers": subscribers, "seconds": seconds, "rate": messages / seconds}


async def measure(args: argparse.Namespace) -> tuple[list[float], list[dict[str, Any]]] | None:
    import psycopg

    from outbox.migrate import migrate

    bootstrap = os.environ.get("KAFKA_BOOTSTRAP")
    pg_url = os.environ.get("OUTBOX_TEST_PG_URL")
    if not bootstrap or not pg_url:
        missing = [
            n for n, v in (("KAFKA_BOOTSTRAP", bootstrap), ("OUTBOX_TEST_PG_URL", pg_url)) if not v
        ]
        print(
            f"kafka_end_to_end: skipped: set {' and '.join(n for n in missing)} (a Kafka-protocol "
            "broker and a Postgres superuser URL; .ci/run starts both via scripts/services.sh)"
        )
        return None
    database = f"bench_kafka_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    url = server_url(pg_url, database)
    try:
        await migrate(url)
        topic = await create_topic(bootstrap, args.partitions)
        ends = await produce(
            bootstrap,
            topic,
            args.messages,
            args.partitions,
            lambda n: json.dumps({"n": n}).encode(),
        )
        broker = [await broker_rate(bootstrap, topic, args.messages, args.partitions)]
        cells = [
            await end_to_end(url, bootstrap, topic, ends, s, args.timeout) for s in args.subscribers
        ]
        broker.append(await broker_rate(bootstrap, topic, args.messages, args.partitions))
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    return broker, cells


def main(args: argparse.Namespace) -> int:
    measured = asyncio.run(measure(args))
    if measured is None:
        return 0
    broker, cells = measured
    reference = max(broker)
    print(
        f"kafka end to end: N={args.messages} P={args.partitions} on {platform.node()} "
        f"({os.cpu_count()} CPUs); broker consume {reference:,.0f} msg/s "
        f"(runs: {', '.join(f'{b:,.0f}' for b in broker)})"
    )
    for cell in cells:
        print(
            f"  S={cell['subscribers']}: {cell['rate']:,.0f} msg/s end to end "
            f"({cell['seconds']:.2f} s), {cell['rate'] / reference:.1%} of the broker's rate"
        )
    if args.json:
        with open(args.json, "a") as out:
            for cell in cells:
                out.write(
                    json.dumps(
                        {
                            "bench": "kafka_end_to_end",
                            "messages": args.messages,
                            "partitions": args.partitions,
                            **cell,
                            "broker_rate": reference,
                            "ratio": cell["rate"] / reference,
                        }
                    )
                    + "\n"
                )
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CI size: N=2000, S=1")
    p.add_argument("--messages", "-n", type=int, default=50_000, help="messages N (50000)")
    p.add_argument("--partitions", "-p", type=int, default=4, help="partitions P (4)")
    p.add_argument("--subscribers", "-s", default="1,3", help="comma-separated S (1,3)")
    p.add_argument("--timeout", type=float, default=300.0, help="give up a cell after this (s)")
    p.add_argument("--json", metavar="FILE", help="append one JSON line per cell to FILE")
    args = p.parse_args(argv)
    if args.tiny:
        args.messages, args.subscribers = 2000, "1"
    args.subscribers = [int(s) for s in str(args.subscribers).split(",") if s]
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args()))

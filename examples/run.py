"""Run the design's two examples end to end on outbox, against the in-memory fake brokers.

``OUTBOX_DATABASE_URL=postgresql://... python -m examples.run`` from a checkout, ``python -m
outbox.examples.run`` from an installed wheel (the database must be migrated:
``outbox migrate``). Prints what each subscriber stored and what the broker saw.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from outbox import OutboxStore, SharedStreamManager, TriggerEvent

from .fake_brokers import KAFKA, SQS
from .kafka_cumulative import KafkaSharedTrigger
from .sqs_like import SqsSharedTrigger

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

QUEUE_URL = "https://sqs.example/queue/orders"


async def _until(condition: Callable[[], bool], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the example did not finish in time")
        await asyncio.sleep(0.02)


async def _drain(stream: AsyncIterator[TriggerEvent], into: list[Any]) -> None:
    async for event in stream:
        into.append(event.payload)


async def _stored(store: OutboxStore) -> Counter[str]:
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            sa.text("SELECT subscriber, count(*) FROM outbox_record GROUP BY subscriber")
        )
        return Counter({r[0]: r[1] for r in rows})


async def run_sqs(store: OutboxStore, messages: int = 30) -> dict[str, Any]:
    """SQS-like: each message is deleted once every subscriber accepted it."""
    regions = ["us", "eu", "ap"]
    for i in range(messages):
        SQS.send(QUEUE_URL, {"order": i, "region": regions[i % 3]})
    received: dict[str, list[Any]] = {"us": [], "eu": [], "all": []}
    async with SharedStreamManager(store, ack_timeout=30.0) as manager:
        tasks = [
            asyncio.create_task(
                _drain(
                    manager.subscribe(
                        trigger_id=f"sqs-{name}",
                        trigger=SqsSharedTrigger(
                            queue_url=QUEUE_URL, region=None if name == "all" else name
                        ),
                    ),
                    into,
                )
            )
            for name, into in received.items()
        ]
        await _until(lambda: SQS.remaining(QUEUE_URL) == 0)
        for task in tasks:
            task.cancel()
    return {
        "deleted": len(SQS.deleted),
        "received": {name: len(events) for name, events in received.items()},
        "stored": dict(await _stored(store)),
    }


async def run_kafka(store: OutboxStore, messages: int = 60) -> dict[str, Any]:
    """Kafka: per-partition cumulative commits, in order, up to the last message."""
    for i in range(messages):
        KAFKA.produce("orders", i % 3, {"order": i, "kind": "a" if i % 2 else "b"})
    ends = {tp: len(log) for tp, log in KAFKA.logs.items()}
    async with SharedStreamManager(store, ack_timeout=30.0) as manager:
        tasks = [
            asyncio.create_task(
                _drain(
                    manager.subscribe(
                        trigger_id=f"kafka-{kind}",
                        trigger=KafkaSharedTrigger(topics=["orders"], kind=kind),
                    ),
                    [],
                )
            )
            for kind in ("a", "b")
        ]
        await _until(lambda: all(KAFKA.committed.get(tp, 0) == end for tp, end in ends.items()))
        for task in tasks:
            task.cancel()
    return {"committed": dict(KAFKA.committed), "produced": ends, "commits": len(KAFKA.commits)}


async def main(url: str) -> None:
    async with OutboxStore.from_url(url) as store:
        await store.check_schema()
        sqs = await run_sqs(store)
        print(
            f"sqs-like: {sqs['deleted']} messages deleted after every subscriber accepted them;"
            f" received per subscriber {sqs['received']}, stored {sqs['stored']}"
        )
        kafka = await run_kafka(store)
        print(
            f"kafka: committed offsets {kafka['committed']} of {kafka['produced']} produced,"
            f" in {kafka['commits']} commits"
        )


if __name__ == "__main__":
    url = os.environ.get("OUTBOX_DATABASE_URL")
    if not url:
        sys.exit("set OUTBOX_DATABASE_URL to a migrated database (outbox migrate)")
    asyncio.run(main(url))

"""A topic for a benchmark on a Kafka-protocol broker, and messages produced to it."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable


async def create_topic(bootstrap: str, partitions: int, *, prefix: str = "bench") -> str:
    """A new topic with a fresh name."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()
    return name


async def produce(
    bootstrap: str,
    topic: str,
    messages: int,
    partitions: int,
    value_of: Callable[[int], bytes],
) -> dict[int, int]:
    """Messages ``value_of(0..messages-1)`` round-robin over the partitions; the end offset of
    each partition."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for n in range(messages):
            await producer.send(topic, value_of(n), partition=n % partitions)
        await producer.flush()
    finally:
        await producer.stop()
    return {p: messages // partitions + (p < messages % partitions) for p in range(partitions)}

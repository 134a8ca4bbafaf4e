"""The demo's side of Kafka: creating the topics, producing the messages, reading committed
offsets and following the dead-letter topic."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from outbox.demo.trigger import message

if TYPE_CHECKING:
    from outbox.demo.progress import Progress


async def create_topics(bootstrap: str, topic: str, partitions: int, dlq: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1), NewTopic(dlq, 1, 1)])
    finally:
        await admin.close()


async def produce(
    bootstrap: str, topic: str, progress: Progress, pause_at: int, resume: asyncio.Event
) -> None:
    """``message(n)`` for each ``n``, to partition ``n % partitions``; once ``pause_at``
    messages are sent, the rest waits for ``resume`` (so the kill comes midway, however fast
    the triggerer is)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        chunk = max(1, min(500, progress.messages // 10))
        for first in range(0, progress.messages, chunk):
            if first >= pause_at:
                await resume.wait()
            sent = []
            for n in range(first, min(first + chunk, progress.messages)):
                partition = n % progress.partitions
                sent.append(
                    await producer.send(
                        topic,
                        json.dumps(message(n)).encode(),
                        key=f"customer-{n % 50}".encode(),
                        partition=partition,
                    )
                )
            await asyncio.gather(*sent)
            for n in range(first, min(first + chunk, progress.messages)):
                partition = n % progress.partitions
                progress.produced[partition] = progress.produced.get(partition, 0) + 1
    finally:
        await producer.stop()


async def read_committed(consumer: AIOKafkaConsumer, topic: str, progress: Progress) -> None:
    for partition in range(progress.partitions):
        value = await consumer.committed(TopicPartition(topic, partition))
        progress.committed[partition] = 0 if value is None else int(value)


async def follow_dead_letters(bootstrap: str, topic: str, dlq: str, progress: Progress) -> None:
    """Appends each ``n`` found on the dead-letter topic to ``progress.dead``, and counts in
    ``progress.dead_mislabelled`` those whose ``x-outbox-*`` headers do not name their origin
    (``topic``, partition ``n % partitions``, offset ``n // partitions``) and reason."""
    tp = TopicPartition(dlq, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        while True:
            batch = await consumer.getmany(tp, timeout_ms=300)
            for record in batch.get(tp, []):
                headers = {key: value.decode() for key, value in record.headers or ()}
                try:
                    n = int(json.loads(record.value)["n"])
                except (TypeError, ValueError, KeyError):
                    n = -1
                origin = (
                    headers.get("x-outbox-origin-topic"),
                    headers.get("x-outbox-origin-partition"),
                    headers.get("x-outbox-origin-offset"),
                    headers.get("x-outbox-reason"),
                )
                expected = (
                    topic,
                    str(n % progress.partitions),
                    str(n // progress.partitions),
                    "rejected",
                )
                progress.dead.append(n)
                progress.dead_mislabelled += origin != expected
    finally:
        await consumer.stop()

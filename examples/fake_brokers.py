"""In-memory stand-ins for the SQS and Kafka clients the examples call.

They behave like the real thing where the examples depend on it: SQS hands out a new receipt
handle on every receive and makes an undeleted message visible again after its visibility
timeout; the Kafka consumer yields messages in partition order and records commits.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = (
    "FakeKafkaConsumer",
    "FakeSqsClient",
    "KafkaMessage",
    "KAFKA",
    "SQS",
    "create_kafka_consumer",
    "create_sqs_client",
    "delete_sqs_message",
    "poll_sqs",
)


@dataclass
class _SqsMessage:
    message_id: str
    body: Any
    visible_at: float = 0.0
    receipt_handle: str | None = None
    receives: int = 0


@dataclass
class FakeSqs:
    """The queues of one fake SQS service, by URL."""

    visibility_timeout: float = 30.0
    queues: dict[str, list[_SqsMessage]] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def send(self, queue_url: str, body: Any) -> str:
        message_id = f"m-{next(self._ids)}"
        self.queues.setdefault(queue_url, []).append(_SqsMessage(message_id, body))
        return message_id

    def remaining(self, queue_url: str) -> int:
        return len(self.queues.get(queue_url, []))


SQS = FakeSqs()


class FakeSqsClient:
    def __init__(self, service: FakeSqs) -> None:
        self.service = service
        self.closed = False

    async def close(self) -> None:
        self.closed = True


async def create_sqs_client() -> Any:
    return FakeSqsClient(SQS)


async def poll_sqs(client: Any, queue_url: str, max_messages: int = 10) -> list[dict[str, Any]]:
    """Receive up to ``max_messages`` visible messages, waiting up to 1 s for one (long poll)."""
    deadline = time.monotonic() + 1.0
    while True:
        now = time.monotonic()
        batch: list[dict[str, Any]] = []
        for message in client.service.queues.get(queue_url, []):
            if message.visible_at <= now and len(batch) < max_messages:
                message.receives += 1
                message.receipt_handle = f"{message.message_id}#{message.receives}"
                message.visible_at = now + client.service.visibility_timeout
                batch.append(
                    {
                        "MessageId": message.message_id,
                        "Body": message.body,
                        "ReceiptHandle": message.receipt_handle,
                    }
                )
        if batch or now >= deadline:
            return batch
        await asyncio.sleep(0.02)


async def delete_sqs_message(client: Any, queue_url: str, receipt_handle: str) -> None:
    """Delete the message whose latest receipt handle is ``receipt_handle`` (stale: no-op)."""
    queue = client.service.queues.get(queue_url, [])
    for message in queue:
        if message.receipt_handle == receipt_handle:
            queue.remove(message)
            client.service.deleted.append(message.message_id)
            return


@dataclass(frozen=True)
class KafkaMessage:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: Any


@dataclass
class FakeKafka:
    """Topics of one fake Kafka cluster and the committed offsets of its consumers."""

    logs: dict[tuple[str, int], list[KafkaMessage]] = field(default_factory=dict)
    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    commits: list[tuple[str, int, int]] = field(default_factory=list)

    def produce(self, topic: str, partition: int, value: Any) -> None:
        log = self.logs.setdefault((topic, partition), [])
        log.append(KafkaMessage(topic, partition, len(log), None, value))


KAFKA = FakeKafka()


class FakeKafkaConsumer:
    def __init__(self, cluster: FakeKafka, topics: list[str], *, enable_auto_commit: bool) -> None:
        if enable_auto_commit:
            raise ValueError("enable_auto_commit must be False for the ack channel")
        self.cluster = cluster
        self.topics = topics

    def __aiter__(self) -> AsyncIterator[KafkaMessage]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[KafkaMessage]:
        positions = {
            tp: self.cluster.committed.get(tp, 0)
            for tp in self.cluster.logs
            if tp[0] in self.topics
        }
        while True:
            progressed = False
            for tp, position in sorted(positions.items()):
                log = self.cluster.logs[tp]
                if position < len(log):
                    yield log[position]
                    positions[tp] = position + 1
                    progressed = True
            if not progressed:
                await asyncio.sleep(0.05)

    async def commit(self, topic: str, partition: int, offset: int) -> None:
        tp = (topic, partition)
        self.cluster.committed[tp] = max(self.cluster.committed.get(tp, 0), offset)
        self.cluster.commits.append((topic, partition, offset))


async def create_kafka_consumer(topics: list[str], *, enable_auto_commit: bool) -> Any:
    return FakeKafkaConsumer(KAFKA, topics, enable_auto_commit=enable_auto_commit)

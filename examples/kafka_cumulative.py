"""Example — Kafka cumulative commit across partitions, as written in the ack-channel design,
on outbox. Only the import lines differ from the design's text; ``KafkaSharedTrigger`` is
ours, so that the producer can be run. Run it with
``OUTBOX_DATABASE_URL=postgresql://... python -m examples.run``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from outbox import BaseEventTrigger, SharedStreamProducer, TriggerEvent

from .fake_brokers import create_kafka_consumer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


class KafkaSharedStreamProducer(SharedStreamProducer):
    def __init__(self, topics: list[str]):
        self.topics = topics
        self.consumer = None

    async def open_stream(self):
        # Auto-commit must be off (the Kafka default is on), or the
        # consumer commits on its own schedule and the ack channel
        # no longer controls what the broker considers delivered.
        self.consumer = await create_kafka_consumer(self.topics, enable_auto_commit=False)
        async for message in self.consumer:
            yield message.value, (message.topic, message.partition, message.offset)

    def get_advance_lane(self, broker_payload):
        topic, partition, _offset = broker_payload
        return topic, partition

    async def advance(self, batch):
        # The batch is one lane's — here, one partition's — contiguous
        # resolved prefix, in event order, so committing the offset of
        # its last item covers the whole batch and can never skip past
        # an event that is still pending.
        topic, partition, offset = batch[-1].broker_payload
        await self.consumer.commit(topic, partition, offset + 1)


class KafkaSharedTrigger(BaseEventTrigger):
    """Fires for every message whose ``kind`` is the one it watches."""

    def __init__(self, *, topics: list[str], kind: str) -> None:
        super().__init__()
        self.topics = topics
        self.kind = kind

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"topics": self.topics, "kind": self.kind},
        )

    def shared_stream_key(self) -> tuple[str, ...]:
        return ("kafka", *sorted(self.topics))

    @classmethod
    def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> KafkaSharedStreamProducer:
        return KafkaSharedStreamProducer(kwargs["topics"])

    async def filter_shared_stream(
        self, shared_stream: AsyncIterator[Any]
    ) -> AsyncIterator[TriggerEvent]:
        async for raw in shared_stream:
            if raw.get("kind") == self.kind:
                yield TriggerEvent(raw)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        yield TriggerEvent({})

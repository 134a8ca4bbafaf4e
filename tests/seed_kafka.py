"""The ack-channel design's Kafka example as users write it: a producer with no event identity
(its broker payload is a plain ``(topic, partition, offset)`` tuple and it has no
``get_event_key``), raw events as the broker's ``bytes``, and a cumulative commit per partition
through the consumer it opened, on aiokafka. Only the imports differ from the design's text,
and ``create_kafka_consumer`` is spelled out.

``SeedTrigger`` subscribes to it in one of ``MODES``; messages are ``{"n": k}`` as JSON bytes.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from outbox import BaseEventTrigger, SharedStreamProducer, TriggerEvent

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from outbox import AdvanceItem

MODES = ("all", "even", "quiet", "unstorable", "huge", "slow")
"""``all`` fires for every message, ``even`` for even ``n`` only, ``quiet`` for none (each
resolution carries no trigger event); ``unstorable`` fires a payload that cannot be stored for
``n == BAD_N`` (and ``{"n": n}`` otherwise), ``huge`` one of 300 MiB for ``n == BAD_N``;
``slow`` fires for every message after ``delay`` seconds (or ``delays[n % len(delays)]``)."""
BAD_N = 7
HUGE_BYTES = 300 * 1024 * 1024
_huge: list[str] = []


def huge_text() -> str:
    """A 300 MiB text, made once per process (so that making it is not what a run measures;
    ``forget_huge_text`` frees it)."""
    if not _huge:
        _huge.append("x" * HUGE_BYTES)
    return _huge[0]


def forget_huge_text() -> None:
    _huge.clear()


def fires(mode: str, n: int) -> bool:
    """Whether a healthy subscriber in ``mode`` stores a trigger event for message ``n``."""
    if mode == "even":
        return n % 2 == 0
    if mode == "quiet":
        return False
    if mode in ("unstorable", "huge"):
        return n < BAD_N
    return True


async def create_kafka_consumer(
    topics: Sequence[str], *, bootstrap_servers: str, group_id: str, enable_auto_commit: bool
) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap_servers,
        group_id=group_id,
        enable_auto_commit=enable_auto_commit,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    await consumer.start()
    return consumer


class KafkaSharedStreamProducer(SharedStreamProducer):
    def __init__(self, topics: list[str], *, bootstrap_servers: str, group_id: str) -> None:
        self.topics = topics
        self.bootstrap_servers = bootstrap_servers
        self.group_id = group_id
        self.consumer: AIOKafkaConsumer | None = None

    async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
        # Auto-commit must be off (the Kafka default is on), or the
        # consumer commits on its own schedule and the ack channel
        # no longer controls what the broker considers delivered.
        self.consumer = await create_kafka_consumer(
            self.topics,
            bootstrap_servers=self.bootstrap_servers,
            group_id=self.group_id,
            enable_auto_commit=False,
        )
        async for message in self.consumer:
            yield message.value, (message.topic, message.partition, message.offset)

    def get_advance_lane(self, broker_payload: Any) -> Any:
        topic, partition, _offset = broker_payload
        return topic, partition

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        # The batch is one lane's — here, one partition's — contiguous
        # resolved prefix, in event order, so committing the offset of
        # its last item covers the whole batch and can never skip past
        # an event that is still pending.
        assert self.consumer is not None
        topic, partition, offset = batch[-1].broker_payload
        await self.consumer.commit({TopicPartition(topic, partition): offset + 1})

    async def aclose(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None


class SeedTrigger(BaseEventTrigger):
    def __init__(
        self,
        *,
        topics: list[str],
        bootstrap_servers: str,
        group_id: str,
        mode: str,
        delay: float = 0.0,
        delays: list[float] | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.topics = topics
        self.bootstrap_servers = bootstrap_servers
        self.group_id = group_id
        self.mode = mode
        self.delay = delay
        self.delays = delays or []

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "topics": self.topics,
                "bootstrap_servers": self.bootstrap_servers,
                "group_id": self.group_id,
                "mode": self.mode,
                "delay": self.delay,
                "delays": self.delays,
            },
        )

    def shared_stream_key(self) -> Any:
        return ("seed-kafka", self.bootstrap_servers, self.group_id, tuple(sorted(self.topics)))

    @classmethod
    def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> KafkaSharedStreamProducer:
        return KafkaSharedStreamProducer(
            kwargs["topics"],
            bootstrap_servers=kwargs["bootstrap_servers"],
            group_id=kwargs["group_id"],
        )

    async def filter_shared_stream(
        self, shared_stream: AsyncIterator[Any]
    ) -> AsyncIterator[TriggerEvent]:
        async for raw in shared_stream:
            n = int(json.loads(raw)["n"])
            delay = self.delays[n % len(self.delays)] if self.delays else self.delay
            if delay:
                await asyncio.sleep(delay)
            if self.mode == "unstorable" and n == BAD_N:
                yield TriggerEvent({"n": n, "handle": object()})
            elif self.mode == "huge" and n == BAD_N:
                yield TriggerEvent({"n": n, "blob": huge_text()})
            elif fires(self.mode, n) or self.mode in ("unstorable", "huge"):
                yield TriggerEvent({"n": n, "by": self.mode})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        yield TriggerEvent({})

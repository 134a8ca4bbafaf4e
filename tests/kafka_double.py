"""A broker double: the few ``AIOKafkaConsumer`` methods ``outbox.kafka`` uses, over partitions
held in memory, with a log start that retention can move (tansu, the test broker, cannot delete
records). Shared by every consumer of one ``BrokerDouble``, like a broker's committed offsets."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from outbox.kafka import KafkaSharedStreamProducer

if TYPE_CHECKING:
    from collections.abc import Iterable

    from aiokafka import TopicPartition


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass
class BrokerDouble:
    """Partitions as lists of values from ``log_start`` on; committed offsets by partition."""

    values: dict[TopicPartition, list[bytes]] = field(default_factory=dict)
    log_start: dict[TopicPartition, int] = field(default_factory=dict)
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    commits: list[tuple[TopicPartition, int]] = field(default_factory=list)

    def append(self, tp: TopicPartition, values: Iterable[bytes]) -> None:
        self.values.setdefault(tp, []).extend(values)
        self.log_start.setdefault(tp, 0)

    def delete_below(self, tp: TopicPartition, offset: int) -> None:
        """What retention does: the records below ``offset`` are gone."""
        self.log_start[tp] = offset

    def end(self, tp: TopicPartition) -> int:
        return len(self.values.get(tp, []))

    def consumer(self) -> ConsumerDouble:
        return ConsumerDouble(self)


class ConsumerDouble:
    def __init__(self, broker: BrokerDouble) -> None:
        self.broker = broker
        self.assigned: list[TopicPartition] = []
        self.positions: dict[TopicPartition, int] = {}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def topics(self) -> set[str]:
        return {tp.topic for tp in self.broker.values}

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {tp.partition for tp in self.broker.values if tp.topic == topic}

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned = list(partitions)

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    async def committed(self, tp: TopicPartition) -> int | None:
        return self.broker.committed.get(tp)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            self.broker.committed[tp] = offset
            self.broker.commits.append((tp, offset))

    async def beginning_offsets(
        self, partitions: list[TopicPartition]
    ) -> dict[TopicPartition, int]:
        return {tp: self.broker.log_start.get(tp, 0) for tp in partitions}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Message]]:
        out: dict[TopicPartition, list[Message]] = {}
        for tp in self.assigned:
            # Below the log start a real consumer gets OFFSET_OUT_OF_RANGE and, with
            # auto_offset_reset="earliest", resets to the log start.
            position = max(self.positions.get(tp, 0), self.broker.log_start.get(tp, 0))
            values = self.broker.values.get(tp, [])[position : position + (max_records or 500)]
            if values:
                out[tp] = [
                    Message(tp.topic, tp.partition, position + i, None, value)
                    for i, value in enumerate(values)
                ]
                self.positions[tp] = position + len(values)
        if not out:
            await asyncio.sleep(0)  # a real poll waits; nothing here will arrive meanwhile
        return out


class ProducerOnDouble(KafkaSharedStreamProducer):
    """``KafkaSharedStreamProducer`` whose consumers are ``ConsumerDouble``s of ``broker``."""

    def __init__(self, broker: BrokerDouble, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.broker = broker

    def _consumer(self) -> Any:
        return self.broker.consumer()

"""outbox.kafka against a real Kafka-protocol broker (tansu)."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from outbox import (
    AdvanceItem,
    AdvanceOutcome,
    OutboxStore,
    SharedStreamManager,
    TriggerEvent,
    reject_shared_stream_event,
)
from outbox.kafka import (
    DeadLetterFlood,
    KafkaSharedStreamProducer,
    KafkaSharedTrigger,
    RoutingPolicy,
)
from tests.polling import eventually
from tests.streams import wait_until

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Hashable


async def create_topic(bootstrap: str, partitions: int = 1) -> str:
    name = f"t-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()
    return name


async def produce(bootstrap: str, topic: str, values: list[Any], partitions: int) -> dict[int, int]:
    counts: dict[int, int] = {}
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for i, value in enumerate(values):
            partition = i % partitions
            await producer.send(
                topic,
                json.dumps(value).encode(),
                key=f"k{i}".encode(),
                partition=partition,
                headers=[("trace", f"t{i}".encode())],
            )
            counts[partition] = counts.get(partition, 0) + 1
        await producer.flush()
    finally:
        await producer.stop()
    return counts


async def committed(
    bootstrap: str, group: str, topic: str, partitions: int
) -> dict[int, int | None]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await consumer.stop()


async def read_all(bootstrap: str, topic: str, expected: int) -> list[Any]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    out: list[Any] = []
    try:
        async with asyncio.timeout(20):
            while len(out) < expected:
                for messages in (await consumer.getmany(timeout_ms=500)).values():
                    out.extend(messages)
    finally:
        await consumer.stop()
    return out


def test_auto_commit_is_refused() -> None:
    with pytest.raises(ValueError, match="enable_auto_commit=False"):
        KafkaSharedStreamProducer(
            ["t"],
            bootstrap_servers="x",
            group_id="g",
            consumer_options={"enable_auto_commit": True},
        )


def test_dead_letter_policy_needs_a_topic() -> None:
    with pytest.raises(ValueError, match="dead_letter_topic"):
        KafkaSharedStreamProducer(
            ["t"], bootstrap_servers="x", group_id="g", policy=RoutingPolicy(rejected="dead-letter")
        )


def items(*specs: tuple[int, AdvanceOutcome], topic: str) -> list[AdvanceItem]:
    """Advance items shaped as the producer stores them (value "m<offset>", base64)."""
    return [
        AdvanceItem(
            {
                "topic": topic,
                "partition": 0,
                "offset": o,
                "key": None,
                "value": base64.b64encode(f"m{o}".encode()).decode(),
                "headers": [],
            },
            out,
        )
        for o, out in specs
    ]


ACK = AdvanceOutcome(1, 0, 0)
REJECT = AdvanceOutcome(0, 0, 1)
FAIL = AdvanceOutcome(0, 1, 0)
NOBODY = AdvanceOutcome(0, 0, 0)
REJECTED_AND_FAILED = AdvanceOutcome(1, 1, 1)  # one subscriber of each kind


def test_a_failure_holds_a_message_another_subscriber_rejected() -> None:
    """One subscriber rejected a message and another failed it: the failure decides (held, to
    be read again for the one that failed it; or dead-lettered, if failures are), never a
    commit past it as a reject (the e2e run with three triggerers found that commit: the
    subscriber that failed it never got it again)."""
    assert RoutingPolicy().route(REJECTED_AND_FAILED) == "hold"
    assert RoutingPolicy(rejected="drop").route(REJECTED_AND_FAILED) == "hold"
    assert RoutingPolicy(failed="dead-letter").route(REJECTED_AND_FAILED) == "dead-letter"
    policy = RoutingPolicy(rejected="drop", failed="dead-letter")
    assert policy.route(REJECTED_AND_FAILED) == "dead-letter"
    assert RoutingPolicy().route(AdvanceOutcome(2, 0, 1)) == "dead-letter"  # a reject alone


@pytest.mark.parametrize(
    ("batch", "commit"),
    [
        ([(0, ACK), (1, ACK), (2, ACK)], 3),
        ([(0, ACK), (1, REJECT)], 2),
        ([(0, ACK), (1, FAIL), (2, ACK)], 1),
        ([(0, ACK), (1, NOBODY)], 1),
        ([(0, ACK), (1, REJECTED_AND_FAILED), (2, ACK)], 1),
        ([(0, FAIL), (1, ACK)], None),  # nothing to commit: the group starts at 0 again
    ],
)
async def test_commit_stops_at_the_first_held_message(
    kafka_bootstrap: str, batch: list[tuple[int, AdvanceOutcome]], commit: int | None
) -> None:
    topic = await create_topic(kafka_bootstrap)
    group = f"g-{uuid.uuid4().hex[:8]}"
    producer = KafkaSharedStreamProducer([topic], bootstrap_servers=kafka_bootstrap, group_id=group)
    try:
        await producer.advance(items(*batch, topic=topic))
    finally:
        await producer.aclose()
    assert await committed(kafka_bootstrap, group, topic, 1) == {0: commit}


async def test_hold_survives_later_batches_and_a_new_producer_until_read_again(
    kafka_bootstrap: str,
) -> None:
    topic = await create_topic(kafka_bootstrap)
    group = f"g-{uuid.uuid4().hex[:8]}"

    def make() -> KafkaSharedStreamProducer:
        return KafkaSharedStreamProducer([topic], bootstrap_servers=kafka_bootstrap, group_id=group)

    first = make()
    await first.advance(items((0, ACK), (1, FAIL), (2, ACK), topic=topic))
    await first.advance(items((3, ACK), (4, ACK), topic=topic))
    assert await committed(kafka_bootstrap, group, topic, 1) == {0: 1}
    await first.aclose()
    restarted = make()  # a committer restart: nothing held in memory
    await restarted.advance(items((5, ACK), topic=topic))
    assert await committed(kafka_bootstrap, group, topic, 1) == {0: 1}
    # The consumer read the partition again from offset 1; now everyone accepted it.
    await restarted.advance(items((1, ACK), (2, ACK), (3, ACK), topic=topic))
    assert await committed(kafka_bootstrap, group, topic, 1) == {0: 4}
    await restarted.advance(items((4, ACK), (5, ACK), topic=topic))
    assert await committed(kafka_bootstrap, group, topic, 1) == {0: 6}
    await restarted.advance(items((3, ACK), topic=topic))  # advanced again: never backwards
    assert await committed(kafka_bootstrap, group, topic, 1) == {0: 6}
    await restarted.aclose()


async def test_dead_letter_flood_stalls_instead_of_dead_lettering(kafka_bootstrap: str) -> None:
    topic = await create_topic(kafka_bootstrap)
    dlq = await create_topic(kafka_bootstrap)
    group = f"g-{uuid.uuid4().hex[:8]}"
    producer = KafkaSharedStreamProducer(
        [topic],
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        dead_letter_topic=dlq,
        policy=RoutingPolicy(flood_run=3),
    )
    try:
        await producer.advance(items((0, REJECT), (1, REJECT), (2, ACK), topic=topic))
        with pytest.raises(DeadLetterFlood, match=r"3 consecutive events would be dead-lettered"):
            await producer.advance(items((3, REJECT), (4, REJECT), (5, REJECT), topic=topic))
    finally:
        await producer.aclose()
    assert await committed(kafka_bootstrap, group, topic, 1) == {0: 3}


class KindTrigger(KafkaSharedTrigger):
    """Rejects messages marked bad; fires for those of its kind."""

    def __init__(self, *, kind: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kind = kind

    def serialize(self) -> tuple[str, dict[str, Any]]:
        path, kwargs = super().serialize()
        return path, {**kwargs, "kind": self.kind}

    @classmethod
    def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> KafkaSharedStreamProducer:
        return super().create_shared_stream_producer(
            {k: v for k, v in kwargs.items() if k != "kind"}
        )

    async def filter_shared_stream(
        self, shared_stream: AsyncIterator[Any]
    ) -> AsyncIterator[TriggerEvent]:
        async for raw in shared_stream:
            if raw.get("bad") and self.kind == "strict":
                reject_shared_stream_event()
                continue
            if self.kind in ("all", "strict") or raw.get("kind") == self.kind:
                yield TriggerEvent(raw)

    def shared_stream_key(self) -> Hashable:
        return ("kafka", self.bootstrap_servers, self.group_id, tuple(self.topics))


async def test_end_to_end_commits_each_partition_and_dead_letters_rejects(
    kafka_bootstrap: str, store: OutboxStore
) -> None:
    topic = await create_topic(kafka_bootstrap, partitions=3)
    dlq = await create_topic(kafka_bootstrap)
    group = f"g-{uuid.uuid4().hex[:8]}"
    values = [{"n": i, "kind": "a" if i % 2 else "b", "bad": i % 10 == 3} for i in range(90)]
    counts = await produce(kafka_bootstrap, topic, values, partitions=3)
    common = {
        "topics": [topic],
        "bootstrap_servers": kafka_bootstrap,
        "group_id": group,
        "dead_letter_topic": dlq,
    }
    got: dict[str, list[Any]] = {"strict": [], "a": []}

    async def drain(stream: AsyncIterator[TriggerEvent], into: list[Any]) -> None:
        async for event in stream:
            into.append(event.payload)

    async with SharedStreamManager(store) as manager:
        tasks = [
            asyncio.create_task(
                drain(
                    manager.subscribe(trigger_id=kind, trigger=KindTrigger(kind=kind, **common)),
                    into,
                )
            )
            for kind, into in got.items()
        ]
        await wait_until(lambda: len(got["strict"]) == 81 and len(got["a"]) == 45, within=30)

        async def all_committed() -> bool:
            return await committed(kafka_bootstrap, group, topic, 3) == counts

        await eventually(all_committed)
        for task in tasks:
            task.cancel()
    dead = await read_all(kafka_bootstrap, dlq, 9)
    assert sorted(json.loads(m.value)["n"] for m in dead) == [i for i in range(90) if i % 10 == 3]
    message = next(m for m in dead if json.loads(m.value)["n"] == 13)
    headers = dict(message.headers)
    assert message.key == b"k13"
    assert headers["trace"] == b"t13"
    assert headers["x-outbox-origin-topic"] == topic.encode()
    assert headers["x-outbox-origin-partition"] == b"1"
    assert headers["x-outbox-origin-offset"] == b"4"
    assert headers["x-outbox-reason"] == b"rejected"
    assert (headers["x-outbox-acked"], headers["x-outbox-rejected"]) == (b"1", b"1")


def test_public_classes_record_the_class_path_of_earlier_versions() -> None:
    """A trigger's class path is stored (by outbox and by Airflow) and imported by committers
    and triggerers of other versions: the classes keep ``outbox.kafka.<name>``, as before
    ``outbox.kafka`` was a package."""
    import importlib

    import outbox.kafka

    for name in outbox.kafka.__all__:
        cls = getattr(outbox.kafka, name)
        assert cls.__module__ == "outbox.kafka", name
        assert getattr(importlib.import_module(cls.__module__), cls.__qualname__) is cls

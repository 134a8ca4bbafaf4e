"""Payloads as brokers produce them (DESIGN 3.10): ``bytes`` raw events (NUL bytes, 0x00-framed
Avro/Protobuf values), ``str`` holding NUL, and Kafka-shaped NamedTuple broker payloads (ours and
Airflow's real ``KafkaBrokerPayload``) reach ``advance`` equal in type and value, from the
in-process committer and from a separate one that rebuilds the classes from its allow-list; the
reader hands the trigger events back exactly."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from airflow.providers.apache.kafka.triggers.shared_stream import KafkaBrokerPayload
from airflow.triggers.shared_stream import AdvanceItem as AirflowAdvanceItem
from airflow.triggers.shared_stream import SharedStreamProducer as AirflowSharedStreamProducer

from outbox import LaneCommitter, OutboxReader, OutboxStore, SharedStreamManager
from outbox.codec import Codec, forget_seen_classes
from outbox.interop import adapt_producer
from tests.streams import RecordingProducer, StreamTrigger, collect, lane_rows, wait_until
from tests.typezoo import Framed, same

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Hashable, Sequence

AVRO = b"\x00\x00\x00\x00\x01\x02\x06abc"  # Confluent framing: magic 0, schema id 1
PROTOBUF = b"\x00\x00\x00\x00\x02\x00\x08\x96\x01"
EVENTS: list[tuple[Any, Any]] = [
    (AVRO, Framed("orders", 0, 10, AVRO, b"k\x00")),
    (b"\x00", KafkaBrokerPayload("orders", 1, 20, PROTOBUF, None)),
    ("text\x00with NUL", Framed("orders", 0, 11, None, None)),
    (PROTOBUF, KafkaBrokerPayload("orders", 1, 21, b"", b"\x00key")),
    (b"", KafkaBrokerPayload("orders", 1, 22)),
]
PAYLOAD_MODULES = ["tests.typezoo", "airflow.providers.apache.kafka"]


def kafka_lane(payload: Any) -> Hashable:
    return (payload.topic, payload.partition)


def by_offset(payloads: Sequence[Any]) -> list[Any]:
    return sorted(payloads, key=lambda p: p.offset)


EXPECTED_PAYLOADS = by_offset([payload for _, payload in EVENTS])


async def record_and_resolve(
    store: OutboxStore, name: str, producer: Any, *, run_committer: bool
) -> SharedStreamManager:
    """A manager whose subscriber has taken every event of ``EVENTS`` (so each is resolved,
    with its trigger event, the raw event, in the outbox)."""
    StreamTrigger.PRODUCERS[name] = producer
    manager = SharedStreamManager(store, run_committer=run_committer)
    stream = manager.subscribe(trigger_id="sub", trigger=StreamTrigger(name=name))
    got = await collect(stream, len(EVENTS))
    assert all(map(same, [raw for raw, _ in EVENTS], got))
    return manager


async def test_the_in_process_committer_advances_what_the_producer_yielded(
    store: OutboxStore,
) -> None:
    producer = RecordingProducer(EVENTS, lane_for=kafka_lane)
    manager = await record_and_resolve(store, "kafka", producer, run_committer=True)
    try:
        await wait_until(lambda: len(producer.advanced) == len(EVENTS))
    finally:
        await manager.stop_all()
    assert all(map(same, EXPECTED_PAYLOADS, by_offset(producer.advanced))), producer.advanced
    # The raw events are stored as they were too.
    async with store.engine.connect() as conn:
        stored = (await conn.execute(sa.text("SELECT raw FROM outbox_event ORDER BY id"))).all()
    raws = [Codec().decode_parsed(row[0]) for row in stored]
    assert all(map(same, [raw for raw, _ in EVENTS], raws)), raws


async def test_a_separate_committer_rebuilds_the_classes_of_its_allowed_modules(
    store: OutboxStore,
) -> None:
    producer = RecordingProducer(EVENTS, lane_for=kafka_lane)
    manager = await record_and_resolve(store, "kafka", producer, run_committer=False)
    try:
        forget_seen_classes()  # as in a committer process that never encoded a payload
        committer = LaneCommitter(
            store,
            allowed_modules=PAYLOAD_MODULES,
            producers={("queue", "kafka"): producer},
        )
        assert await committer.run_once() == len(EVENTS)
    finally:
        await manager.stop_all()
    assert all(map(same, EXPECTED_PAYLOADS, by_offset(producer.advanced))), producer.advanced


async def test_a_payload_class_outside_the_allowed_modules_stalls_only_its_lane(
    store: OutboxStore,
) -> None:
    producer = RecordingProducer(EVENTS, lane_for=kafka_lane)
    manager = await record_and_resolve(store, "kafka", producer, run_committer=False)
    try:
        forget_seen_classes()
        narrow = LaneCommitter(
            store,
            allowed_modules=["tests.typezoo"],  # not Airflow's KafkaBrokerPayload
            producers={("queue", "kafka"): producer},
            retry_base=0.01,
            retry_cap=0.01,
        )
        assert await narrow.run_once() == 2  # partition 0: the Framed payloads
        assert [p.offset for p in producer.advanced] == [10, 11]
        lanes = {row["lane_key"]: row for row in await lane_rows(store)}
        error = lanes['["orders",1]']["last_error"]
        assert error.startswith("UndecodableValue: ") and "\n" not in error, error
        for named in (
            "airflow.providers.apache.kafka.triggers.shared_stream.KafkaBrokerPayload",
            "outside the allowed modules ['tests.typezoo']",
            "--allow-module airflow.providers.apache.kafka.triggers.shared_stream",
        ):
            assert named in error, error
        assert lanes['["orders",1]']["advanced_through"] == 0  # nothing lost, nothing skipped
        # Allowed, the lane goes on once its retry is due (and the lease is given up).
        await narrow.release()
        wide = LaneCommitter(
            store, allowed_modules=PAYLOAD_MODULES, producers={("queue", "kafka"): producer}
        )
        async with asyncio.timeout(10):
            while len(producer.advanced) < len(EVENTS):
                await wide.run_once()
    finally:
        await manager.stop_all()
    assert all(map(same, EXPECTED_PAYLOADS, by_offset(producer.advanced))), producer.advanced


async def test_the_reader_hands_back_bytes_and_nul_text_exactly(store: OutboxStore) -> None:
    producer = RecordingProducer(EVENTS, lane_for=kafka_lane)
    manager = await record_and_resolve(store, "kafka", producer, run_committer=False)
    await manager.stop_all()
    forget_seen_classes()
    async with store.engine.begin() as conn:
        records = await OutboxReader(store).claim(conn)
    assert len(records) == len(EVENTS)
    for record, (raw, _) in zip(records, EVENTS, strict=True):
        assert same(raw, record.payload), (raw, record.payload)


class AirflowKafkaProducer(AirflowSharedStreamProducer):
    """Written for Airflow's API: yields ``KafkaBrokerPayload``, defines no storage hooks."""

    def __init__(self) -> None:
        self.advanced: list[Any] = []

    async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
        for raw, payload in EVENTS:
            if isinstance(payload, KafkaBrokerPayload):
                yield raw, payload
        await asyncio.Event().wait()

    def get_advance_lane(self, broker_payload: Any) -> Hashable:
        return kafka_lane(broker_payload)

    async def advance(self, batch: Sequence[AirflowAdvanceItem]) -> None:
        self.advanced.extend(payload for payload, _ in batch)


async def test_an_airflow_producer_gets_its_kafka_payloads_back_unchanged(
    store: OutboxStore,
) -> None:
    producer = AirflowKafkaProducer()
    StreamTrigger.PRODUCERS["airflow"] = adapt_producer(producer)  # as the manager adapts it
    kafka_events = [(r, p) for r, p in EVENTS if isinstance(p, KafkaBrokerPayload)]
    async with SharedStreamManager(store) as manager:
        stream = manager.subscribe(trigger_id="sub", trigger=StreamTrigger(name="airflow"))
        assert all(map(same, [r for r, _ in kafka_events], await collect(stream, 3)))
        await wait_until(lambda: len(producer.advanced) == len(kafka_events))
    assert all(map(same, [p for _, p in kafka_events], producer.advanced)), producer.advanced


class HookedAirflowProducer(AirflowKafkaProducer):
    """Defines outbox's storage hooks: the adapter must use them."""

    def serialize_event(self, raw_event: Any) -> Any:
        return {"raw": raw_event}

    def serialize_payload(self, broker_payload: Any) -> Any:
        return [broker_payload.topic, broker_payload.partition, broker_payload.offset]

    def deserialize_payload(self, stored: Any) -> Any:
        return KafkaBrokerPayload(*stored)


def test_the_airflow_adapter_forwards_the_storage_hooks_it_finds() -> None:
    payload = KafkaBrokerPayload("t", 1, 2, b"v", b"k")
    hooked = adapt_producer(HookedAirflowProducer())
    assert hooked.serialize_event(b"x") == {"raw": b"x"}
    assert hooked.serialize_payload(payload) == ["t", 1, 2]
    assert hooked.deserialize_payload(["t", 1, 2]) == KafkaBrokerPayload("t", 1, 2)
    plain = adapt_producer(AirflowKafkaProducer())
    assert plain.serialize_event(b"x") == b"x"
    assert plain.serialize_payload(payload) is payload
    assert plain.deserialize_payload(payload) is payload

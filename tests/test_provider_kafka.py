"""The Airflow Kafka provider's ``KafkaSharedStreamTrigger`` and ``KafkaSharedStreamProducer``
(apache-airflow-providers-apache-kafka, confluent-kafka underneath), unchanged, on outbox's
manager in its default configuration, against the test broker (issue 14): three subscribers
(``tests.provider.triggers``: the provider's trigger, one firing for even messages only, one
rejecting every seventh, with ``dlq_topic`` set), 4 partitions, 5,000 messages of which every
tenth is a binary value framed as Confluent's wire format (a 0x00 magic byte first).

Then the same with the triggerer SIGKILLed five times mid-stream and restarted. Checked: every
subscriber stores every message it fires for exactly once (the provider's payload carries its
identity: topic, partition, offset), rejected messages are on the dead-letter topic, Kafka's
committed offsets reach the end of every partition, no delivery stays pending past its ack
timeout, and ``outbox status`` agrees with the tables each time it is asked.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from typing import TYPE_CHECKING

import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from outbox.codec import Codec
from tests.polling import eventually
from tests.provider.triggers import MODES, fires, n_of, rejects, value_of
from tests.streams import wait_until
from tests.test_e2e_kafka import Proc
from tests.test_kafka import create_topic

if TYPE_CHECKING:
    from pathlib import Path

    from outbox import OutboxStore

PARTITIONS = 4
MESSAGES = 5_000
ACK_TIMEOUT = 30.0
# How long past its ack timeout a delivery may stay pending: the sweep runs every poll
# interval (0.5 s) and the status read takes its time.
SWEEP_MARGIN = 5.0
KILLS = 5


class Provider:
    """The triggerer process and what the test reads back (records, dead letters, Kafka's
    committed offsets, status)."""

    def __init__(self, kafka: str, database_url: str, tmp_path: Path) -> None:
        self.kafka = kafka
        self.database_url = database_url
        self.tmp_path = tmp_path
        self.group = f"provider-{uuid.uuid4().hex[:8]}"
        self.topic = ""
        self.dlq = ""
        self.proc: Proc | None = None
        self.counts: dict[int, int] = dict.fromkeys(range(PARTITIONS), 0)

    async def start(self) -> None:
        self.topic = await create_topic(self.kafka, partitions=PARTITIONS)
        self.dlq = await create_topic(self.kafka)
        connection = {
            "conn_type": "kafka",
            "extra": {
                "bootstrap.servers": self.kafka,
                "group.id": self.group,
                "enable.auto.commit": "false",
                "auto.offset.reset": "earliest",
                "session.timeout.ms": "6000",
            },
        }
        os.environ["AIRFLOW_CONN_KAFKA_DEFAULT"] = json.dumps(connection)
        self.proc = Proc(
            "triggerer",
            [
                *(sys.executable, "-m", "tests.provider.triggerer"),
                *("--database-url", self.database_url, "--topic", self.topic),
                *("--dlq", self.dlq, "--ack-timeout", str(ACK_TIMEOUT)),
            ],
            self.tmp_path / "triggerer.log",
        )
        self.proc.start()

    async def produce(self, first: int, last: int) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.kafka, acks="all", linger_ms=5)
        await producer.start()
        try:
            for n in range(first, last):
                await producer.send(self.topic, value_of(n), partition=n % PARTITIONS)
            await producer.flush()
        finally:
            await producer.stop()
        for n in range(first, last):
            self.counts[n % PARTITIONS] += 1

    async def committed(self) -> dict[int, int]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.kafka, group_id=self.group, enable_auto_commit=False
        )
        await consumer.start()
        try:
            out = {}
            for p in range(PARTITIONS):
                value = await consumer.committed(TopicPartition(self.topic, p))
                out[p] = -1 if value is None else value
            return out
        finally:
            await consumer.stop()

    async def dead_letters(self, expected: int) -> list[int]:
        tp = TopicPartition(self.dlq, 0)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.kafka, enable_auto_commit=False)
        await consumer.start()
        seen: list[int] = []
        try:
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            async with asyncio.timeout(30):
                while len(seen) < expected:
                    batch = await consumer.getmany(tp, timeout_ms=500)
                    seen += [n_of(m.value) for m in batch.get(tp, [])]
        finally:
            await consumer.stop()
        return seen


async def assert_status_true(store: OutboxStore) -> None:
    """What ``outbox status`` says of each lane is what the tables hold, and no delivery is
    pending past its ack timeout (plus the sweep's cadence)."""
    lanes = {(lane.stream, lane.lane): lane for lane in await store.lane_status()}
    async with store.engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.text(
                    """
                    SELECT s.key, l.lane_key, l.advanced_through, l.next_position - 1,
                           count(e.id) FILTER (WHERE e.pending = 0
                                               AND e.position > l.advanced_through),
                           count(e.id) FILTER (WHERE e.pending > 0),
                           extract(epoch FROM now() - min(e.created_at)
                                   FILTER (WHERE e.pending > 0))
                    FROM outbox_lane l JOIN outbox_stream s ON s.id = l.stream_id
                    LEFT JOIN outbox_event e ON e.lane_id = l.id
                    GROUP BY s.key, l.lane_key, l.advanced_through, l.next_position
                    """
                )
            )
        ).all()
    assert {(r[0], r[1]) for r in rows} == set(lanes)
    for key, lane_key, cursor, last, resolved, unresolved, oldest in rows:
        shown = lanes[key, lane_key]
        # The status reads the lane after the tables: it may only have moved on since.
        assert shown.advanced_through >= cursor and shown.last_position >= last
        assert shown.advanced_through <= shown.last_position
        if oldest is not None:
            assert float(oldest) <= ACK_TIMEOUT + SWEEP_MARGIN, (
                f"lane {lane_key}: a delivery pending {float(oldest):.1f}s, past its ack timeout"
            )
        if shown.oldest_pending_seconds is not None and shown.oldest_pending_seconds > ACK_TIMEOUT:
            assert shown.stalled, shown
        del resolved, unresolved  # counted again by the lane's status: they move meanwhile
        assert shown.advance_in == "consumer"  # the provider commits through its consumer


async def records(store: OutboxStore) -> dict[tuple[int, str], int]:
    async with store.engine.connect() as conn:
        rows = (await conn.execute(sa.text("SELECT subscriber, payload FROM outbox_record"))).all()
    out: dict[tuple[int, str], int] = {}
    codec = Codec()  # the provider's trigger fires the decoded text: NUL bytes kept, tagged
    for subscriber, stored in rows:
        payload = codec.decode_parsed(stored)
        n = n_of(payload) if subscriber == "all" else int(payload["n"])
        out[n, subscriber] = out.get((n, subscriber), 0) + 1
    return out


async def run(
    kafka_bootstrap: str, store: OutboxStore, database_url: str, tmp_path: Path, kills: int
) -> None:
    began = time.monotonic()
    provider = Provider(kafka_bootstrap, database_url, tmp_path)
    await provider.start()
    proc = provider.proc
    assert proc is not None
    try:
        await provider.produce(0, MESSAGES // 2)
        for kill in range(kills):
            await wait_until(lambda: "progress" in proc.current_run(), within=60)
            await asyncio.sleep(1.0 + kill * 0.7)  # mid-stream, at different points
            proc.kill()
            await assert_status_true(store)
            proc.start()
            if kill == 1:
                await provider.produce(MESSAGES // 2, MESSAGES)
        if kills < 2:
            await provider.produce(MESSAGES // 2, MESSAGES)

        async def at_the_end() -> bool:
            return await provider.committed() == provider.counts

        try:
            await eventually(at_the_end, within=180, interval=0.5)
        except AssertionError:
            raise AssertionError(
                f"committed {await provider.committed()} of {provider.counts}\n{proc.tail()}"
            ) from None
        await assert_status_true(store)
        assert proc.stop() == 0, proc.tail()
    finally:
        proc.ensure_dead()
    assert "subscriber failed" not in proc.current_run(), proc.tail()
    stored = await records(store)
    doubles = {k: v for k, v in stored.items() if v != 1}
    assert not doubles, sorted(doubles)[:10]
    expected = {(n, m) for n in range(MESSAGES) for m in MODES if fires(m, n)}
    assert set(stored) == expected, (
        sorted(expected - set(stored))[:10],
        sorted(set(stored) - expected)[:10],
    )
    rejected = {n for n in range(MESSAGES) if rejects(n)}
    dead = await provider.dead_letters(len(rejected))
    assert set(dead) == rejected
    print(
        f"provider trigger on outbox, {kills} SIGKILLs: {MESSAGES} messages on {PARTITIONS}"
        f" partitions ({MESSAGES // 10} binary), {len(stored)} trigger events stored once each,"
        f" {len(dead)} dead letters ({len(dead) - len(set(dead))} repeated),"
        f" {time.monotonic() - began:.1f}s"
    )


async def test_the_providers_trigger_runs_unchanged_on_outbox(
    kafka_bootstrap: str, store: OutboxStore, database_url: str, tmp_path: Path
) -> None:
    await run(kafka_bootstrap, store, database_url, tmp_path, kills=0)


async def test_the_providers_trigger_through_sigkills(
    kafka_bootstrap: str, store: OutboxStore, database_url: str, tmp_path: Path
) -> None:
    await run(kafka_bootstrap, store, database_url, tmp_path, kills=KILLS)

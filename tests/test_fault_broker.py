"""A frozen Kafka broker (issue 7, faults): the test's own tansu process is stopped with SIGSTOP
for longer than the aiokafka clients' request timeout, mid-stream, then continued. The stream's
reader and the in-process committer's offset commits time out meanwhile; afterwards the
producer reconnects, advances resume, every partition is committed to its end and every
message's trigger events are stored exactly once per accepting subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from outbox import SharedStreamManager, TriggerEvent
from outbox.kafka import KafkaSharedTrigger
from tests.faults import accepts, filter_by_mode
from tests.invariants import tally
from tests.polling import eventually
from tests.tansu import start_tansu
from tests.test_kafka import create_topic

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from outbox import OutboxStore

PARTITIONS = 2
MESSAGES = 2000  # half before the freeze, half after
FREEZE = 8.0  # seconds; longer than the clients' request timeout below
TIMEOUTS: dict[str, Any] = {"request_timeout_ms": 3000, "retry_backoff_ms": 100}
MODES = ("all", "picky")


class Broker:
    """A tansu process of this test's own (memory storage)."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc, self.bootstrap = start_tansu(log_path)
        self.port = int(self.bootstrap.rpartition(":")[2])

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.thaw()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    own = Broker(tmp_path / "tansu.log")
    try:
        yield own
    finally:
        own.close()


class OutageTrigger(KafkaSharedTrigger):
    """``all`` fires for every message, ``picky`` rejects every seventh (dropped: no
    dead-letter topic)."""

    def __init__(self, *, mode: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mode = mode

    async def filter_shared_stream(
        self, shared_stream: AsyncIterator[Any]
    ) -> AsyncIterator[TriggerEvent]:
        async for event in filter_by_mode(self.mode, shared_stream):
            yield event


async def produce(bootstrap: str, topic: str, first: int, last: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for n in range(first, last):
            await producer.send(topic, json.dumps({"n": n}).encode(), partition=n % PARTITIONS)
        await producer.flush()
    finally:
        await producer.stop()


async def test_frozen_broker_recovers_without_loss(
    broker: Broker, store: OutboxStore, caplog: pytest.LogCaptureFixture
) -> None:
    topic = await create_topic(broker.bootstrap, partitions=PARTITIONS)
    group = f"g-{topic}"
    await produce(broker.bootstrap, topic, 0, MESSAGES // 2)
    manager = SharedStreamManager(
        store, committer_options={"poll_interval": 0.2, "retry_base": 0.2, "retry_cap": 1.0}
    )
    seen: Counter[tuple[int, str]] = Counter()
    errors: list[BaseException] = []

    async def drain(events: AsyncIterator[TriggerEvent], mode: str) -> None:
        try:
            async for event in events:
                seen[int(event.payload["n"]), mode] += 1
        except Exception as exc:
            errors.append(exc)

    common = {
        "topics": [topic],
        "bootstrap_servers": broker.bootstrap,
        "group_id": group,
        "consumer_options": TIMEOUTS,
    }
    drains = [
        asyncio.create_task(
            drain(
                manager.subscribe(trigger_id=mode, trigger=OutageTrigger(mode=mode, **common)), mode
            )
        )
        for mode in MODES
    ]
    sampler = AIOKafkaConsumer(
        bootstrap_servers=broker.bootstrap, group_id=group, enable_auto_commit=False, **TIMEOUTS
    )
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]

    async def committed() -> dict[int, int]:
        return {tp.partition: (await sampler.committed(tp)) or 0 for tp in tps}

    figures: dict[str, float] = {}
    try:
        await sampler.start()

        async def some_committed() -> bool:
            return sum((await committed()).values()) >= 200

        await eventually(some_committed, within=30, interval=0.1)
        before = await committed()
        broker.freeze()
        await asyncio.sleep(FREEZE)  # the outage itself
        broker.thaw()
        thawed = time.monotonic()

        async def moved() -> bool:
            return await committed() != before

        await eventually(moved, within=30, interval=0.1)
        figures["commits_after"] = time.monotonic() - thawed
        await produce(broker.bootstrap, topic, MESSAGES // 2, MESSAGES)
        end = dict.fromkeys(range(PARTITIONS), MESSAGES // PARTITIONS)

        async def all_committed() -> bool:
            return await committed() == end

        await eventually(all_committed, within=45, interval=0.1)
        figures["drained_after"] = time.monotonic() - thawed
        assert not errors, errors
    finally:
        await manager.stop_all()
        for task in drains:
            task.cancel()
        await asyncio.gather(*drains, return_exceptions=True)
        await sampler.stop()

    expected = {(n, mode) for n in range(MESSAGES) for mode in MODES if accepts(mode, n)}
    counted = await tally(store)
    owed, failed = counted.owed, counted.failed
    stored = counted.assert_each_stored_once()
    assert stored == expected, (sorted(expected - stored)[:10], sorted(stored - expected)[:10])
    assert owed == 0 and failed == 0
    assert max(seen.values()) == 1 and set(seen) == expected
    print(f"broker frozen {FREEZE:.0f} s (request timeout 3 s): {figures}")

"""Held Kafka deliveries come back and the partition's commit moves on; while held, the hold
shows (status, metrics) and prune keeps what deduplicates its re-reading; advancing after a hold
costs the same as without one. Against tansu and Postgres, except where the test says it drives
a broker double."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, ClassVar

import sqlalchemy as sa
from aiokafka import TopicPartition

from outbox import LaneCommitter, SharedStreamManager, TriggerEvent
from outbox.display import readable
from outbox.kafka import (
    DeadLetterFlood,
    FloodGuard,
    KafkaSharedStreamProducer,
    KafkaSharedTrigger,
    RoutingPolicy,
)
from outbox.metrics import CommitterMetrics
from tests.invariants import settled, tally
from tests.kafka_double import BrokerDouble, ProducerOnDouble
from tests.polling import eventually
from tests.streams import wait_until
from tests.test_kafka import ACK, FAIL, committed, create_topic, items, produce

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import pytest

    from outbox import OutboxStore
    from outbox.store import LaneStatus


MODES = ("steady", "flaky")
SHORT_LEASES = {"lease_seconds": 1.0}


class HoldTrigger(KafkaSharedTrigger):
    """One trigger event ``{"n": n}`` per message ``{"n": n}``; raises on message ``fail_on``
    (a subscriber failing one delivery), or waits on message ``wait_on`` until the test lets
    it go (a subscriber still working on a message)."""

    gates: ClassVar[dict[str, asyncio.Event]] = {}

    def __init__(
        self, *, name: str, fail_on: int | None = None, wait_on: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.name = name
        self.fail_on = fail_on
        self.wait_on = wait_on
        self.seen: list[int] = []

    def serialize(self) -> tuple[str, dict[str, Any]]:
        path, kwargs = super().serialize()
        return path, {**kwargs, "name": self.name, "fail_on": self.fail_on}

    @classmethod
    def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> KafkaSharedStreamProducer:
        own = ("name", "fail_on", "wait_on")
        return super().create_shared_stream_producer(
            {k: v for k, v in kwargs.items() if k not in own}
        )

    async def filter_shared_stream(
        self, shared_stream: AsyncIterator[Any]
    ) -> AsyncIterator[TriggerEvent]:
        async for raw in shared_stream:
            n = raw["n"]
            self.seen.append(n)
            if n == self.fail_on:
                raise RuntimeError(f"{self.name} fails message {n}")
            if n == self.wait_on:
                await self.gates[self.group_id].wait()
            yield TriggerEvent({"n": n})


class Subscriber:
    """Drains one subscription; when it fails, subscribes again (this time without failing),
    as a triggerer restarts a failed trigger."""

    def __init__(self, manager: SharedStreamManager, name: str, **kwargs: Any) -> None:
        self.manager = manager
        self.name = name
        self.kwargs = kwargs
        self.triggers: list[HoldTrigger] = []
        self.fired: list[int] = []
        self.task = asyncio.create_task(self._run())

    def seen(self) -> list[int]:
        return [n for trigger in self.triggers for n in trigger.seen]

    async def _run(self) -> None:
        kwargs = self.kwargs
        while True:
            trigger = HoldTrigger(name=self.name, **kwargs)
            self.triggers.append(trigger)
            try:
                async for event in self.manager.subscribe(trigger_id=self.name, trigger=trigger):
                    self.fired.append(event.payload["n"])
                return
            except RuntimeError:
                await self.manager.unsubscribe(self.name, trigger.shared_stream_key())
                kwargs = {k: v for k, v in kwargs.items() if k != "fail_on"}

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def the_lane(store: OutboxStore) -> LaneStatus:
    (lane,) = await store.lane_status()
    return lane


def held_at(identity: str, store: OutboxStore) -> Any:
    async def probe() -> LaneStatus | None:
        lanes = await store.lane_status()
        return lanes[0] if lanes and lanes[0].held_identity == identity else None

    return probe


def not_held(store: OutboxStore) -> Any:
    async def probe() -> bool:
        return (await the_lane(store)).held_identity is None

    return probe


def committed_to(bootstrap: str, group: str, topic: str, end: int) -> Any:
    async def probe() -> bool:
        return await committed(bootstrap, group, topic, 1) == {0: end}

    return probe


def assert_stored_once_each(counted: Any, expected: set[tuple[int, str]]) -> None:
    stored = counted.assert_each_stored_once()
    assert stored == expected, (sorted(expected - stored)[:10], sorted(stored - expected)[:10])


async def test_a_failed_delivery_comes_back_in_the_same_run_and_the_commit_reaches_the_end(
    kafka_bootstrap: str, store: OutboxStore
) -> None:
    """In-process committer: the producer that reads also advances; the reader seeks back to
    the held messages after ``redelivery_delay`` and hands out those only."""
    topic = await create_topic(kafka_bootstrap)
    group = f"g-{uuid.uuid4().hex[:8]}"
    await produce(kafka_bootstrap, topic, [{"n": n} for n in range(40)], partitions=1)
    common = {
        "topics": [topic],
        "bootstrap_servers": kafka_bootstrap,
        "group_id": group,
        "redelivery_delay": 2.0,
    }
    async with SharedStreamManager(store) as manager:
        steady = Subscriber(manager, "steady", **common)
        flaky = Subscriber(manager, "flaky", fail_on=3, **common)
        # While held: the commit stays at the held message, status and metrics show it.
        lane = await eventually(held_at(f"{topic}:0:3", store), within=30)
        assert lane.held_seconds is not None and lane.held_seconds >= 0
        assert await committed(kafka_bootstrap, group, topic, 1) == {0: 3}
        metrics = CommitterMetrics()
        await metrics.refresh(store)
        labels = {
            "stream": readable(lane.stream),
            "lane": readable(lane.lane),
            "held": f"{topic}:0:3",
        }
        assert metrics.registry.get_sample_value("outbox_lane_held_seconds", labels) is not None
        assert metrics.registry.get_sample_value("outbox_held_lanes") == 1
        # It comes back to the subscriber that failed it (subscribed again), and only to it.
        await eventually(committed_to(kafka_bootstrap, group, topic, 40), within=30)
        await eventually(lambda: settled(store))
        await eventually(not_held(store))
        assert steady.seen() == list(range(40))
        first, again = flaky.triggers[0].seen, flaky.triggers[-1].seen
        assert first == list(range(4))
        assert sorted(again) == list(range(3, 40))
        for subscriber in (steady, flaky):
            await subscriber.stop()
    assert_stored_once_each(await tally(store), {(n, s) for n in range(40) for s in MODES})


async def test_a_separate_committer_holds_and_the_reader_reads_the_partition_again(
    kafka_bootstrap: str, store: OutboxStore
) -> None:
    """`outbox committer`'s producer cannot seek the reader: the reader learns of the hold from
    the lane row (its manager reads it every second) and reads the partition again from the
    held offset once the hold is ``redelivery_delay`` old; identity deduplicates."""
    topic = await create_topic(kafka_bootstrap)
    group = f"g-{uuid.uuid4().hex[:8]}"
    await produce(kafka_bootstrap, topic, [{"n": n} for n in range(40)], partitions=1)
    common = {
        "topics": [topic],
        "bootstrap_servers": kafka_bootstrap,
        "group_id": group,
        "redelivery_delay": 1.0,
    }
    committer = LaneCommitter(
        store, allowed_modules=[__name__], poll_interval=0.1, lease_seconds=10
    )
    committing = asyncio.create_task(committer.run())
    try:
        async with SharedStreamManager(store, run_committer=False) as manager:
            steady = Subscriber(manager, "steady", **common)
            flaky = Subscriber(manager, "flaky", fail_on=3, **common)
            await eventually(held_at(f"{topic}:0:3", store), within=30)
            await eventually(committed_to(kafka_bootstrap, group, topic, 40), within=30)
            await eventually(lambda: settled(store))
            assert (await the_lane(store)).held_identity is None
            # Each subscriber was handed each message once, but for those it failed.
            assert steady.seen() == list(range(40))
            assert sorted(flaky.triggers[-1].seen) == list(range(3, 40))
            for subscriber in (steady, flaky):
                await subscriber.stop()
    finally:
        committer.request_stop()
        await committing
    assert_stored_once_each(await tally(store), {(n, s) for n in range(40) for s in MODES})


async def test_reading_a_partition_again_never_hands_a_message_twice_to_a_subscriber_on_it(
    kafka_bootstrap: str, store: OutboxStore
) -> None:
    """A separate committer holds the partition at 3 (flaky failed it) while steady still works
    on message 10, so the hold lasts and the reader reads 3..39 again every second: steady must
    not be handed any of 10..39 twice, flaky (subscribed again) gets 3..39."""
    topic = await create_topic(kafka_bootstrap)
    group = f"g-{uuid.uuid4().hex[:8]}"
    HoldTrigger.gates[group] = gate = asyncio.Event()
    await produce(kafka_bootstrap, topic, [{"n": n} for n in range(40)], partitions=1)
    common = {
        "topics": [topic],
        "bootstrap_servers": kafka_bootstrap,
        "group_id": group,
        "redelivery_delay": 0.0,
    }
    committer = LaneCommitter(
        store, allowed_modules=[__name__], poll_interval=0.1, lease_seconds=10
    )
    committing = asyncio.create_task(committer.run())

    async def read_again_twice() -> bool:
        async with store.engine.connect() as conn:  # a re-read refreshes the events it reuses
            rewrites = await conn.scalar(sa.text("SELECT rewrites FROM outbox_lane"))
            return bool(rewrites is not None and rewrites >= 2 * 37)

    try:
        async with SharedStreamManager(store, run_committer=False) as manager:
            steady = Subscriber(manager, "steady", wait_on=10, **common)
            flaky = Subscriber(manager, "flaky", fail_on=3, **common)
            await eventually(held_at(f"{topic}:0:3", store), within=30)
            await eventually(read_again_twice, within=30)
            gate.set()
            await eventually(committed_to(kafka_bootstrap, group, topic, 40), within=30)
            await produce(kafka_bootstrap, topic, [{"n": 40}], partitions=1)
            # FIFO: a message handed twice would come before the new one.
            await wait_until(lambda: 40 in steady.fired and 40 in flaky.fired, within=30)
            assert steady.seen() == list(range(41))
            assert sorted(flaky.triggers[-1].seen) == list(range(3, 41))
            for subscriber in (steady, flaky):
                await subscriber.stop()
    finally:
        del HoldTrigger.gates[group]
        committer.request_stop()
        await committing
    assert_stored_once_each(await tally(store), {(n, s) for n in range(41) for s in MODES})


async def test_a_failed_delivery_then_10000_messages_prune_while_held_and_after_and_restarts(
    kafka_bootstrap: str, store: OutboxStore
) -> None:
    """The issue's case: one failed delivery, 10,000 messages after it. While the commit is
    held, prune (retention 0) keeps the lane's events from the held message on; a restart reads
    everything from the held offset again and hands each subscriber only what it failed; the
    commit reaches the end; prune again; a restart reads nothing old; nothing stored twice."""
    total = 10_004
    topic = await create_topic(kafka_bootstrap)
    group = f"g-{uuid.uuid4().hex[:8]}"
    await produce(kafka_bootstrap, topic, [{"n": n} for n in range(total)], partitions=1)
    common = {"topics": [topic], "bootstrap_servers": kafka_bootstrap, "group_id": group}
    # A stopped manager's in-process committer leaves its lease to expire: keep it short.

    async def prune_all() -> int:
        pruned = 0
        while True:
            _, events = await store.prune(0.0, batch=100_000)
            if not events:
                return pruned
            pruned += events

    async def events_stored() -> int:
        async with store.engine.connect() as conn:
            return int(await conn.scalar(sa.text("SELECT count(*) FROM outbox_event")) or 0)

    # Run 1: the hold lasts (no redelivery in this run); everything after it is advanced.
    async with SharedStreamManager(store, committer_options=SHORT_LEASES) as manager:
        subscribers = [
            Subscriber(manager, "steady", redelivery_delay=3600, **common),
            Subscriber(manager, "flaky", fail_on=3, redelivery_delay=3600, **common),
        ]
        await wait_until(lambda: len(subscribers[0].fired) == total, within=120)
        await eventually(lambda: settled(store), within=60)
        assert (await the_lane(store)).held_identity == f"{topic}:0:3"
        assert await committed(kafka_bootstrap, group, topic, 1) == {0: 3}
        assert await prune_all() == 3  # offsets 0..2 only
        assert await events_stored() == total - 3
        for subscriber in subscribers:
            await subscriber.stop()
    failed_first = sorted(set(range(total)) - set(subscribers[1].fired))
    assert failed_first[0] == 3

    # Run 2 (restart): read again from offset 3; each subscriber gets only what it failed.
    async with SharedStreamManager(store, committer_options=SHORT_LEASES) as manager:
        subscribers = [
            Subscriber(manager, "steady", redelivery_delay=1, **common),
            Subscriber(manager, "flaky", redelivery_delay=1, **common),
        ]
        await eventually(committed_to(kafka_bootstrap, group, topic, total), within=120)
        await eventually(lambda: settled(store), within=60)
        assert (await the_lane(store)).held_identity is None
        assert subscribers[0].seen() == []
        assert subscribers[1].seen() == failed_first
        for subscriber in subscribers:
            await subscriber.stop()
    assert await prune_all() > 0
    assert await events_stored() == 0

    # Run 3 (restart): nothing old is read again; a new message goes through.
    async with SharedStreamManager(store, committer_options=SHORT_LEASES) as manager:
        subscribers = [
            Subscriber(manager, "steady", redelivery_delay=1, **common),
            Subscriber(manager, "flaky", redelivery_delay=1, **common),
        ]
        await produce(kafka_bootstrap, topic, [{"n": total}], partitions=1)
        await eventually(committed_to(kafka_bootstrap, group, topic, total + 1), within=60)
        assert [s.seen() for s in subscribers] == [[total], [total]]
        for subscriber in subscribers:
            await subscriber.stop()
    assert_stored_once_each(
        await tally(store), {(n, s) for n in range(total + 1) for s in ("steady", "flaky")}
    )


async def test_a_committed_offset_below_the_log_start_moves_to_it_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Driven against a broker double (tests/kafka_double.py): tansu cannot delete records, so
    a log start above the committed offset cannot be made on the test broker."""
    broker = BrokerDouble()
    tp = TopicPartition("orders", 0)
    broker.append(tp, [b'{"n": %d}' % n for n in range(20)])
    broker.committed[tp] = 4
    broker.delete_below(tp, 12)  # retention deleted offsets 0..11, the commit points at 4
    producer = ProducerOnDouble(
        broker, ["orders"], bootstrap_servers="double", group_id="g", redelivery_delay=60
    )
    caplog.set_level(logging.INFO, logger="outbox.kafka")
    stream = producer.open_stream()
    assert isinstance(stream, AsyncGenerator)
    read = [await anext(stream) for _ in range(8)]
    assert [payload["offset"] for _, payload in read] == list(range(12, 20))
    await producer.advance(items(*((o, ACK) for o in range(12, 16)), topic="orders"))
    assert broker.committed[tp] == 16
    await producer.advance(items(*((o, ACK) for o in range(16, 20)), topic="orders"))
    assert broker.committed[tp] == 20
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "Kafka partition orders:0: committed offset 4 is below the log start 12 (retention "
        "deleted those records); moving the commit to the log start"
    ]
    await stream.aclose()
    await producer.aclose()


async def test_advancing_after_a_hold_keeps_one_range_whatever_follows() -> None:
    """Driven against a broker double: only the adapter's own state is measured here (the
    benchmark bench/kafka_holds.py times it against a real broker)."""
    broker = BrokerDouble()
    tp = TopicPartition("orders", 0)
    broker.append(tp, [b"{}"])
    producer = ProducerOnDouble(broker, ["orders"], bootstrap_servers="double", group_id="g")
    await producer.advance(items((0, ACK), (1, ACK), (2, FAIL), (3, ACK), topic="orders"))
    times = []
    for start in range(4, 200_004, 1000):
        batch = items(*((o, ACK) for o in range(start, start + 1000)), topic="orders")
        began = time.perf_counter()
        await producer.advance(batch)
        times.append(time.perf_counter() - began)
    commits = producer._commits[tp]
    assert broker.committed[tp] == 2
    assert list(commits.handled) == [(3, 200_004)]
    assert commits.held == {2: 1}
    assert producer.describe_hold(("orders", 0)) == "orders:0:2"
    # The held message handled at last: everything goes, nothing is kept.
    await producer.advance(items((2, ACK), topic="orders"))
    assert broker.committed[tp] == 200_004
    assert not commits.handled and not commits.held
    assert producer.describe_hold(("orders", 0)) is None
    # Time per advance does not grow with what follows the hold (generous: a shared machine).
    early, late = sorted(times[:50])[25], sorted(times[-50:])[25]
    assert late < 3 * early + 0.001, (early, late)
    await producer.aclose()


def test_the_flood_guard_counts_as_before_in_time_per_batch() -> None:
    """Its running count raises exactly where summing the window each time did (the window is
    counted incrementally now: summing it per message cost an advance its batch times 1,000)."""

    def naive(policy: RoutingPolicy, history: list[bool], batch: list[bool]) -> bool:
        run, window = 0, deque[bool](maxlen=policy.flood_window)
        for is_dead in history:
            run = run + 1 if is_dead else 0
            window.append(is_dead)
        for is_dead in batch:
            run = run + 1 if is_dead else 0
            window.append(is_dead)
            assert policy.flood_run is not None and policy.flood_ratio is not None
            if run >= policy.flood_run or (
                len(window) == policy.flood_window
                and sum(window) / len(window) > policy.flood_ratio
            ):
                return True
        return False

    rnd = random.Random(18)
    policy = RoutingPolicy(rejected="drop", flood_run=12, flood_ratio=0.4, flood_window=50)
    for _ in range(300):
        guard = FloodGuard(policy)
        history: list[bool] = []
        for _ in range(8):
            share = rnd.choice((0.0, 0.2, 0.45, 0.7))
            batch = [rnd.random() < share for _ in range(rnd.randrange(1, 40))]
            expected = naive(policy, history, batch) and any(batch)
            try:
                guard.check(("t", 0), batch)
            except DeadLetterFlood:
                assert expected
                break
            assert not expected
            guard.record(("t", 0), batch)
            history += batch


async def test_a_reported_hold_has_the_reader_read_again_from_it_once_it_is_old_enough() -> None:
    """Driven against a broker double: the rules of ``on_hold_reported`` for a reader whose
    partitions another process advances."""
    broker = BrokerDouble()
    tp = TopicPartition("orders", 0)
    broker.append(tp, [b'{"n": %d}' % n for n in range(10)])
    producer = ProducerOnDouble(
        broker, ["orders"], bootstrap_servers="double", group_id="g", redelivery_delay=5
    )
    stream = producer.open_stream()
    assert isinstance(stream, AsyncGenerator)

    async def offsets(count: int) -> list[int]:
        return [(await anext(stream))[1]["offset"] for _ in range(count)]

    assert await offsets(10) == list(range(10))
    producer.on_hold_reported("orders:0:4", held_for=4.9)  # not old enough
    producer.on_hold_reported("orders:0:12", held_for=60)  # not read yet: comes anyway
    producer.on_hold_reported("other:0:4", held_for=60)  # not a partition read here
    producer.on_hold_reported("not an identity", held_for=60)
    broker.append(tp, [b'{"n": 10}'])
    assert await offsets(1) == [10]
    producer.on_hold_reported("orders:0:4", held_for=5)
    producer.on_hold_reported("orders:0:4", held_for=6)  # read again a moment ago already
    broker.append(tp, [b'{"n": 11}'])
    assert await offsets(8) == [4, 5, 6, 7, 8, 9, 10, 11]
    # Advanced here too: its holds come straight from advance, not from reports.
    await producer.advance(items((0, ACK), (1, ACK), topic="orders"))
    producer._reading[tp].read_again_at = -math.inf
    producer.on_hold_reported("orders:0:4", held_for=60)
    assert producer._reading[tp].again.first() is None
    await stream.aclose()
    await producer.aclose()

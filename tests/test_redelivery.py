"""Redelivery by event identity (DESIGN 3.6): each (identity, subscriber) that accepted or
rejected an event never gets it again, and its records are stored once."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, ClassVar

import sqlalchemy as sa

from outbox import (
    AdvanceItem,
    AdvanceOutcome,
    OutboxStore,
    SharedStreamManager,
    SharedStreamProducer,
    TriggerEvent,
)
from tests.streams import Gate, StreamTrigger, records, wait_until

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Hashable, Sequence


class FedProducer(SharedStreamProducer):
    """Yields what the test feeds it; payloads are receipt handles ``"<message id>#<n>"``."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[Any, str]] = asyncio.Queue()
        self.advanced: list[str] = []
        self.outcomes: list[AdvanceOutcome] = []

    def feed(self, raw: Any, receipt: str) -> None:
        self.queue.put_nowait((raw, receipt))

    async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
        while True:
            yield await self.queue.get()

    def get_event_key(self, broker_payload: Any) -> str | None:
        return str(broker_payload).split("#")[0]

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        self.advanced.extend(p for p, _ in batch)
        self.outcomes.extend(o for _, o in batch)


class FedTrigger(StreamTrigger):
    PRODUCERS: ClassVar[dict[str, SharedStreamProducer]] = {}

    def shared_stream_key(self) -> Hashable:
        return ("fed", self.name)


async def _delivery_states(store: OutboxStore) -> list[tuple[str | None, str, str]]:
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT e.identity, d.subscriber, d.state FROM outbox_delivery d "
                "JOIN outbox_event e ON e.id = d.event_id ORDER BY e.id, d.subscriber"
            )
        )
        return [(r[0], r[1], r[2]) for r in rows]


async def _drain(stream: AsyncIterator[TriggerEvent], into: list[Any]) -> None:
    async for event in stream:
        into.append(event.payload)


async def test_redelivery_after_everyone_accepted_reaches_nobody_and_advances_clean(
    store: OutboxStore,
) -> None:
    producer = FedProducer()
    FedTrigger.PRODUCERS["q"] = producer
    got: dict[str, list[Any]] = {"a": [], "b": []}
    async with SharedStreamManager(store) as manager:
        tasks = [
            asyncio.create_task(
                _drain(manager.subscribe(trigger_id=n, trigger=FedTrigger()), got[n])
            )
            for n in got
        ]
        producer.feed({"n": 1}, "m1#1")
        await wait_until(lambda: producer.advanced == ["m1#1"])
        producer.feed({"n": 1}, "m1#2")  # the broker delivers the same message again
        await wait_until(lambda: producer.advanced == ["m1#1", "m1#2"])
        producer.feed({"n": 2}, "m2#1")
        await wait_until(lambda: got["a"] == [{"n": 1}, {"n": 2}] == got["b"])
        for task in tasks:
            task.cancel()
    assert producer.outcomes[:2] == [AdvanceOutcome(2, 0, 0), AdvanceOutcome(2, 0, 0)]
    stored = await records(store)
    assert sorted(s for s, p in stored if p == {"n": 1}) == ["a", "b"]


async def test_redelivery_after_restart_goes_only_to_the_subscriber_that_owed_it(
    store: OutboxStore,
) -> None:
    first = FedProducer()
    FedTrigger.PRODUCERS["q"] = first
    slow = Gate()
    got_a: list[Any] = []
    manager = SharedStreamManager(store)
    task_a = asyncio.create_task(
        _drain(manager.subscribe(trigger_id="a", trigger=FedTrigger()), got_a)
    )
    manager.subscribe(trigger_id="b", trigger=FedTrigger(gate=slow))
    first.feed({"n": 1}, "m1#1")
    await slow.arrived(1)
    await wait_until(lambda: got_a == [{"n": 1}])
    await manager.stop_all()  # b still owes m1; the broker will redeliver it
    task_a.cancel()
    assert first.advanced == []
    assert await _delivery_states(store) == [("m1", "a", "acked")]

    second = FedProducer()
    FedTrigger.PRODUCERS["q"] = second
    got: dict[str, list[Any]] = {"a": [], "b": []}
    async with SharedStreamManager(store) as restarted:
        tasks = [
            asyncio.create_task(
                _drain(restarted.subscribe(trigger_id=n, trigger=FedTrigger()), got[n])
            )
            for n in got
        ]
        second.feed({"n": 1}, "m1#2")
        await wait_until(lambda: second.advanced == ["m1#2"])
        for task in tasks:
            task.cancel()
    assert got == {"a": [], "b": [{"n": 1}]}
    assert second.outcomes == [AdvanceOutcome(2, 0, 0)]  # one event, its payload refreshed
    assert await _delivery_states(store) == [("m1", "a", "acked"), ("m1", "b", "acked")]
    assert sorted(s for s, _ in await records(store)) == ["a", "b"]


async def test_subscriber_that_failed_gets_the_redelivery_and_others_do_not(
    store: OutboxStore,
) -> None:
    producer = FedProducer()
    FedTrigger.PRODUCERS["q"] = producer
    clock = [0.0]
    slow = Gate()
    got_a: list[Any] = []
    async with SharedStreamManager(store, ack_timeout=0.1, clock=lambda: clock[0]) as manager:
        task_a = asyncio.create_task(
            _drain(manager.subscribe(trigger_id="a", trigger=FedTrigger()), got_a)
        )
        failing = manager.subscribe(trigger_id="b", trigger=FedTrigger(gate=slow))
        producer.feed({"n": 1}, "m1#1")
        await slow.arrived(1)
        clock[0] = 0.2
        await wait_until(lambda: producer.advanced == ["m1#1"])
        assert producer.outcomes == [AdvanceOutcome(acked=1, failed=1)]
        await manager.unsubscribe("b", ("fed", "q"))
        assert [e async for e in failing] == []
        got_b: list[Any] = []
        task_b = asyncio.create_task(
            _drain(manager.subscribe(trigger_id="b", trigger=FedTrigger()), got_b)
        )
        producer.feed({"n": 1}, "m1#2")
        await wait_until(lambda: producer.advanced == ["m1#1", "m1#2"])
        for task in (task_a, task_b):
            task.cancel()
    assert got_a == [{"n": 1}] and got_b == [{"n": 1}]
    assert producer.outcomes[1] == AdvanceOutcome(2, 0, 0)
    assert await _delivery_states(store) == [
        ("m1", "a", "acked"),
        ("m1", "b", "failed"),
        ("m1", "a", "acked"),
        ("m1", "b", "acked"),
    ]
    assert sorted(s for s, _ in await records(store)) == ["a", "b"]


async def test_events_without_identity_are_not_deduplicated(store: OutboxStore) -> None:
    class NoIdentity(FedProducer):
        def get_event_key(self, broker_payload: Any) -> str | None:
            return None

    producer = NoIdentity()
    FedTrigger.PRODUCERS["q"] = producer
    got: list[Any] = []
    async with SharedStreamManager(store) as manager:
        task = asyncio.create_task(
            _drain(manager.subscribe(trigger_id="a", trigger=FedTrigger()), got)
        )
        producer.feed({"n": 1}, "m1#1")
        producer.feed({"n": 1}, "m1#2")
        await wait_until(lambda: got == [{"n": 1}, {"n": 1}])
        task.cancel()
    assert len(await records(store)) == 2

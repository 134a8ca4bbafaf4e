"""A subscriber that raises, one that hangs, one that floods: each is contained to itself."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from outbox import AdvanceOutcome, OutboxStore, SharedStreamManager, TriggerEvent
from tests.streams import (
    Background,
    FakeClock,
    RecordingProducer,
    StreamTrigger,
    deliveries,
    records,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

EVENTS = [({"n": i}, f"p{i}") for i in range(4)]


class Raises(StreamTrigger):
    async def filter_shared_stream(
        self, shared_stream: AsyncIterator[Any]
    ) -> AsyncIterator[TriggerEvent]:
        async for raw in shared_stream:
            if raw["n"] == 1:
                raise RuntimeError("filter bug on n=1")
            yield TriggerEvent(raw)


class Hangs(StreamTrigger):
    async def filter_shared_stream(
        self, shared_stream: AsyncIterator[Any]
    ) -> AsyncIterator[TriggerEvent]:
        async for raw in shared_stream:
            if raw["n"] == 1:
                await asyncio.Event().wait()
            yield TriggerEvent(raw)


class Floods(StreamTrigger):
    async def filter_shared_stream(
        self, shared_stream: AsyncIterator[Any]
    ) -> AsyncIterator[TriggerEvent]:
        async for raw in shared_stream:
            for k in range(5000 if raw["n"] == 1 else 1):
                yield TriggerEvent({"n": raw["n"], "k": k})


async def test_a_filter_that_raises_fails_itself_only(store: OutboxStore) -> None:
    producer = RecordingProducer(EVENTS)
    StreamTrigger.PRODUCERS["q"] = producer
    async with SharedStreamManager(store) as manager:
        bad = Background(manager.subscribe(trigger_id="bad", trigger=Raises()))
        good = Background(manager.subscribe(trigger_id="good", trigger=StreamTrigger()))
        await bad.finished()
        assert isinstance(bad.error, RuntimeError) and bad.items == [{"n": 0}]
        await wait_until(lambda: len(good.items) == 4)
        await wait_until(lambda: len(producer.advanced) >= 2)
    assert producer.outcomes[:2] == [AdvanceOutcome(2, 0), AdvanceOutcome(1, 1)]
    assert sorted(s for s, _ in await records(store)).count("good") == 4


async def test_a_filter_that_hangs_is_timed_out_and_the_lane_goes_on(store: OutboxStore) -> None:
    producer = RecordingProducer(EVENTS)
    StreamTrigger.PRODUCERS["q"] = producer
    clock = FakeClock()
    async with SharedStreamManager(store, ack_timeout=5.0, clock=clock) as manager:
        stuck = Background(manager.subscribe(trigger_id="stuck", trigger=Hangs()))
        good = Background(manager.subscribe(trigger_id="good", trigger=StreamTrigger()))
        await wait_until(lambda: len(good.items) == 4 and stuck.items == [{"n": 0}])
        await wait_until(lambda: len(producer.advanced) == 1)
        assert producer.advanced == ["p0"]  # n=1 cannot go before the stuck subscriber
        clock.now = 5.0
        await wait_until(lambda: len(producer.advanced) >= 3)
    assert producer.outcomes[1] == AdvanceOutcome(1, 1)
    assert (2, "stuck", "failed") in await deliveries(store)


async def test_thousands_of_trigger_events_for_one_event_are_stored_once(
    store: OutboxStore,
) -> None:
    producer = RecordingProducer(EVENTS)
    StreamTrigger.PRODUCERS["q"] = producer
    async with SharedStreamManager(store) as manager:
        flood = Background(manager.subscribe(trigger_id="flood", trigger=Floods()))
        good = Background(manager.subscribe(trigger_id="good", trigger=StreamTrigger()))
        await wait_until(lambda: len(flood.items) == 5003 and len(good.items) == 4, within=30)
        await wait_until(lambda: len(producer.advanced) >= 3)
    stored = [p for s, p in await records(store) if s == "flood"]
    assert len(stored) == 5003
    assert len({(p["n"], p["k"]) for p in stored}) == 5003
    assert producer.outcomes[1] == AdvanceOutcome(2, 0)


async def test_a_subscriber_past_the_per_event_bound_fails_itself_only(store: OutboxStore) -> None:
    producer = RecordingProducer(EVENTS)
    StreamTrigger.PRODUCERS["q"] = producer
    async with SharedStreamManager(store, max_trigger_events_per_event=1000) as manager:
        flood = Background(manager.subscribe(trigger_id="flood", trigger=Floods()))
        good = Background(manager.subscribe(trigger_id="good", trigger=StreamTrigger()))
        await flood.finished()
        assert isinstance(flood.error, RuntimeError)
        assert "more than 1000 trigger events for one raw event" in str(flood.error)
        await wait_until(lambda: len(good.items) == 4 and len(producer.advanced) >= 2)
    assert producer.outcomes[1] == AdvanceOutcome(1, 1)
    assert [p for s, p in await records(store) if s == "flood"] == [{"n": 0, "k": 0}]

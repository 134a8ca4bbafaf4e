from __future__ import annotations

import asyncio

from outbox import AdvanceOutcome, OutboxStore, SharedStreamManager
from tests.streams import RecordingProducer, StreamTrigger, collect, records, wait_until


async def test_two_subscribers_events_stored_and_advanced(store: OutboxStore) -> None:
    producer = RecordingProducer([({"n": i}, f"p{i}") for i in range(3)])
    StreamTrigger.PRODUCERS["q"] = producer
    async with SharedStreamManager(store) as manager:
        a = manager.subscribe(trigger_id=1, trigger=StreamTrigger())
        b = manager.subscribe(trigger_id=2, trigger=StreamTrigger())
        got_a, got_b = await asyncio.gather(collect(a, 3), collect(b, 3))
        assert got_a == got_b == [{"n": 0}, {"n": 1}, {"n": 2}]
        await wait_until(lambda: len(producer.advanced) == 3)
    assert producer.advanced == ["p0", "p1", "p2"]
    assert all(o == AdvanceOutcome(2, 0, 0) for o in producer.outcomes)
    stored = await records(store)
    assert sorted(stored, key=lambda r: (r[0], r[1]["n"])) == [
        (s, {"n": i}) for s in ("1", "2") for i in range(3)
    ]

from __future__ import annotations

import asyncio
import json

import psycopg
import sqlalchemy as sa

from outbox import AdvanceOutcome, OutboxStore, SharedStreamManager
from tests.polling import eventually
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


async def test_a_trigger_event_is_handed_over_only_once_it_is_committed(
    store: OutboxStore, database_url: str
) -> None:
    """While another transaction holds ``outbox_record`` locked, nothing is handed over; each
    trigger event handed over is, at that moment, in the outbox as seen from another
    connection."""
    producer = RecordingProducer([({"n": i}, f"p{i}") for i in range(20)])
    StreamTrigger.PRODUCERS["q"] = producer
    observer = OutboxStore.from_url(database_url)
    blocker = await psycopg.AsyncConnection.connect(database_url.replace("+asyncpg", ""))
    try:
        async with SharedStreamManager(store) as manager:
            await blocker.execute("LOCK TABLE outbox_record IN ACCESS EXCLUSIVE MODE")
            events = manager.subscribe(trigger_id=1, trigger=StreamTrigger())
            first = asyncio.ensure_future(anext(events))
            # Every event is recorded and resolved (the write of records waits on the lock)...

            async def recorded() -> bool:
                async with observer.engine.connect() as conn:
                    count = await conn.scalar(sa.text("SELECT count(*) FROM outbox_event"))
                return bool(count == 20)

            await eventually(recorded, within=10)
            assert not first.done()
            await blocker.rollback()  # ...and is handed over only after it commits
            payloads = [(await first).payload]
            for _ in range(19):
                payloads.append((await anext(events)).payload)
                async with observer.engine.connect() as conn:
                    stored = await conn.scalar(
                        sa.text("SELECT count(*) FROM outbox_record WHERE payload = :p"),
                        {"p": json.dumps(payloads[-1])},
                    )
                assert stored == 1, payloads[-1]
            assert payloads == [{"n": i} for i in range(20)]
    finally:
        await blocker.close()
        await observer.aclose()

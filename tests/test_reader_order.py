"""The reader hands a subscriber's records out in event order, under any write batching.

A large batch of resolutions is split by event into transactions committed concurrently
(``Writer(parallel=2)``): a later event's records may be inserted (and get their ids) before an
earlier one's, and its transaction may finish first. A reader claiming all the while must still
never hand out a subscriber's record after a record of a later event.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from outbox.core import canonical_json
from outbox.reader import OutboxReader, OutboxRecord
from outbox.store import EventToRecord, ResolutionRow
from outbox.writer import Writer
from tests.polling import eventually

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from outbox import OutboxStore

SUBSCRIBERS = ("s1", "s2", "s3", "s4")
EVENTS = 20_000  # x 4 subscribers, 1 or 2 records each: 120,000 records
LANES = 3


async def _record_events(store: OutboxStore, count: int = EVENTS) -> tuple[int, list[int]]:
    stream_id = await store.ensure_stream(
        canonical_json(("queue", "ordered"), what="key"), "x.Trigger", "{}", 300.0
    )
    lanes = await store.ensure_lanes(stream_id, [str(n) for n in range(LANES)])
    event_ids: list[int] = []
    for start in range(0, count, 5000):
        staged = [
            EventToRecord(stream_id, lanes[str(n % LANES)], None, "{}", json.dumps(n), SUBSCRIBERS)
            for n in range(start, min(start + 5000, count))
        ]
        async with store.autocommit() as conn:
            await store.record_events(conn, staged)
        event_ids.extend(e.event_id for e in staged)
    return stream_id, event_ids


async def test_records_are_handed_out_in_event_order_per_subscriber_under_split_batches(
    store: OutboxStore,
) -> None:
    stream_id, event_ids = await _record_events(store)
    writer = Writer(store, max_batch=4000, parallel=2, min_split=500)
    written: list[Any] = []
    expected = 0
    # Subscribers at different paces (as they are): each resolves in its own event order.
    for n, event_id in enumerate(event_ids):
        for k, subscriber in enumerate(SUBSCRIBERS):
            count = 1 + (n + k) % 2
            writer.resolve(
                ResolutionRow(
                    stream_id,
                    event_id,
                    subscriber,
                    "acked",
                    None,
                    [json.dumps({"n": n, "i": i}) for i in range(count)],
                ),
                written.append,
            )
            expected += count
    assert expected >= 100_000

    handed: list[OutboxRecord] = []

    async def keep(conn: AsyncConnection, records: list[OutboxRecord]) -> None:
        handed.extend(records)

    reader = OutboxReader(store, batch_size=700)
    writer.start()
    writing = asyncio.create_task(writer.barrier())
    while not writing.done():
        # Claims interleave with the commits of concurrent parts.
        await reader.process(keep)
        await asyncio.sleep(0)
    await writing
    await writer.aclose()
    while await reader.process(keep):
        pass

    assert written == [True] * len(written)
    assert writer.transactions > len(written) // 4000  # batches were split
    assert len(handed) == expected == len({r.id for r in handed})
    behind: dict[str, list[tuple[int, int]]] = {s: [] for s in SUBSCRIBERS}
    last: dict[str, tuple[int, int]] = {}
    for record in handed:
        assert record.event_id is not None
        order = (record.event_id, record.ordinal)
        previous = last.get(record.subscriber)
        if previous is not None and order < previous:
            behind[record.subscriber].append(order)
        last[record.subscriber] = max(order, previous or order)
    out_of_order = {s: len(v) for s, v in behind.items() if v}
    assert not out_of_order, f"records handed out after a later event's: {out_of_order}"


async def test_a_later_part_waiting_for_its_turn_yields_its_locks_to_a_third_writer(
    store: OutboxStore,
) -> None:
    """Another writer holds an event of the first part and waits for one of the second: the
    second part, done and waiting for the first to commit, must roll back and run again once
    the first committed (Postgres cannot see this wait as a deadlock), not hold on forever."""
    stream_id, events = await _record_events(store, 1000)
    first, later = events[10], events[-10]
    writer = Writer(store, max_batch=4000, parallel=2, min_split=100)
    results: list[Any] = []
    for event_id in events:
        writer.resolve(
            ResolutionRow(stream_id, event_id, "s1", "acked", None, ['{"x": 1}']), results.append
        )

    async def locked_by_someone(event_id: int) -> bool:
        async with store.engine.connect() as probe:
            try:
                await probe.execute(
                    sa.text("SELECT 1 FROM outbox_event WHERE id = :id FOR UPDATE NOWAIT"),
                    {"id": event_id},
                )
            except sa.exc.DBAPIError:
                return True
            return False

    async with store.engine.connect() as other:
        await other.begin()
        await other.execute(
            sa.text("SELECT 1 FROM outbox_event WHERE id = :id FOR UPDATE"), {"id": first}
        )
        writer.start()
        writing = asyncio.create_task(writer.barrier())
        await eventually(lambda: locked_by_someone(later), within=30)
        # Waits for the second part's row lock, which it has until it gives up its turn.
        await other.execute(
            sa.text("SELECT 1 FROM outbox_event WHERE id = :id FOR UPDATE"), {"id": later}
        )
        assert not writing.done()
        await other.commit()
    await asyncio.wait_for(writing, 30)
    await writer.aclose()
    assert results == [True] * len(events)
    async with store.engine.connect() as conn:
        stored = await conn.scalar(sa.text("SELECT count(*) FROM outbox_record"))
    assert stored == len(events)

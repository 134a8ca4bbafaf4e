"""The reader hands a subscriber's records out in event order, under any write batching.

A large batch of resolutions is split by event into transactions committed concurrently
(``Writer(parallel=2)``): a later event's records may be inserted (and get their ids) before an
earlier one's, and its transaction may finish first (here made sure of, by holding an event of
the first part). A reader claiming all the while must still
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

    async def stored_for(event_id: int) -> bool:
        async with store.engine.connect() as conn:
            found = await conn.scalar(
                sa.text("SELECT count(*) FROM outbox_record WHERE event_id = :id"), {"id": event_id}
            )
        return bool(found)

    # The first batch's first part waits for an event another transaction holds, while its
    # second part commits: the reader then sees later events' records before earlier ones'.
    async with store.engine.connect() as other:
        await other.begin()
        await other.execute(
            sa.text("SELECT 1 FROM outbox_event WHERE id = :id FOR UPDATE"), {"id": event_ids[10]}
        )
        writer.start()
        writing = asyncio.create_task(writer.barrier())
        await eventually(lambda: stored_for(event_ids[900]), within=30)
        while await reader.process(keep):
            pass
        await other.commit()
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


async def test_a_record_after_an_event_its_subscriber_still_owes_waits_for_that_event(
    store: OutboxStore,
) -> None:
    """s1 resolves the third event before the second (as a later part of a split batch may
    commit first): its record of the third is held back until the second is resolved; s2, which
    owes nothing before it, is not held back."""
    stream_id, events = await _record_events(store, 6)
    reader = OutboxReader(store, batch_size=100)
    handed: list[OutboxRecord] = []

    async def keep(conn: AsyncConnection, records: list[OutboxRecord]) -> None:
        handed.extend(records)

    async def resolve(event_id: int, subscriber: str) -> None:
        async with store.autocommit() as conn:
            await store.resolve(
                conn,
                [(stream_id, event_id, subscriber, "acked", None, [json.dumps(event_id)], None)],
            )

    await resolve(events[0], "s1")
    await resolve(events[2], "s1")
    for event_id in events[:3]:
        await resolve(event_id, "s2")
    while await reader.process(keep):
        pass
    assert [(r.event_id, r.subscriber) for r in handed] == [
        (events[0], "s1"),
        (events[0], "s2"),
        (events[1], "s2"),
        (events[2], "s2"),
    ]
    await resolve(events[1], "s1")
    while await reader.process(keep):
        pass
    assert [(r.event_id, r.subscriber) for r in handed[4:]] == [
        (events[1], "s1"),
        (events[2], "s1"),
    ]

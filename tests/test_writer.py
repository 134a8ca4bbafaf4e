"""The writer on a real Postgres: first resolution wins inside one group-committed batch."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from outbox.core import canonical_json
from outbox.store import EventToRecord, ResolutionRow
from outbox.writer import Writer

if TYPE_CHECKING:
    from outbox import OutboxStore


async def _one_recorded_event(store: OutboxStore) -> tuple[int, int, EventToRecord]:
    """A stream with one lane and one recorded event that subscriber s1 owes."""
    stream_id = await store.ensure_stream(canonical_json("k", what="key"), "x.T", "{}", 300.0)
    lane_id = (await store.ensure_lanes(stream_id, ["null"]))["null"]
    event = EventToRecord(stream_id, lane_id, None, "{}", "1", ["s1"])
    async with store.engine.begin() as conn:
        await store.record_events(conn, [event])
    return stream_id, lane_id, event


async def test_second_resolution_of_a_delivery_in_one_batch_loses_with_its_records(
    store: OutboxStore,
) -> None:
    stream_id, _, event = await _one_recorded_event(store)
    writer = Writer(store)
    results: list[Any] = []
    # Both are queued before the writer runs, so they commit in one transaction.
    writer.resolve(ResolutionRow(stream_id, event.event_id, "s1", "acked", None), results.append)
    writer.resolve(
        ResolutionRow(stream_id, event.event_id, "s1", "acked", None, [json.dumps({"late": 1})]),
        results.append,
    )
    writer.start()
    await writer.barrier()
    await writer.aclose()
    assert results == [True, False]
    assert writer.transactions == 1
    async with store.engine.connect() as conn:
        records = await conn.scalar(sa.text("SELECT count(*) FROM outbox_record"))
        deliveries = await conn.scalar(sa.text("SELECT count(*) FROM outbox_delivery"))
        pending = await conn.scalar(sa.text("SELECT pending FROM outbox_event"))
    assert (records, deliveries, pending) == (0, 1, 0)


async def test_recording_is_not_held_up_by_a_resolution_batch_in_flight(
    store: OutboxStore,
) -> None:
    """Recording and resolving commit on their own connections: while a resolution batch
    waits on a row lock, new events still get recorded."""
    stream_id, lane_id, first = await _one_recorded_event(store)
    writer = Writer(store)
    writer.start()
    resolved: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    recorded: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    async with store.engine.connect() as blocker:
        await blocker.begin()
        # Hold the event's row: the resolution's counter update must wait for it.
        await blocker.execute(sa.text("SELECT 1 FROM outbox_event FOR UPDATE"))
        writer.resolve(
            ResolutionRow(stream_id, first.event_id, "s1", "acked", None), resolved.set_result
        )
        second = EventToRecord(stream_id, lane_id, None, "{}", "2", ["s1"])
        writer.record_events([second], recorded.set_result)
        assert await asyncio.wait_for(recorded, 10) == [second]
        assert not resolved.done()
        await blocker.rollback()
    assert await asyncio.wait_for(resolved, 10) is True
    await writer.aclose()

"""OutboxReader: claims in the caller's transaction, exactly-once hand-off, shared work."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa

from outbox.core import canonical_json
from outbox.reader import OutboxReader, OutboxRecord
from outbox.store import EventToRecord, ResolutionRow
from tests.polling import eventually

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy.ext.asyncio import AsyncConnection

    from outbox import OutboxStore

SINK = """
CREATE TABLE consumer_sink (
    seq bigserial PRIMARY KEY, record_id bigint NOT NULL UNIQUE, stream_id bigint NOT NULL,
    reader text NOT NULL)
"""


async def fill(store: OutboxStore, stream_name: str, events: int, per_event: int = 2) -> int:
    """Record ``events`` events on stream ("queue", stream_name), each acked by subscriber
    "s1" with ``per_event`` trigger events; returns the stream id."""
    stream_id = await store.ensure_stream(
        canonical_json(("queue", stream_name), what="key"), "x.Trigger", "{}", 300.0
    )
    lane_id = (await store.ensure_lanes(stream_id, ["null"]))["null"]
    staged = [
        EventToRecord(stream_id, lane_id, None, "{}", json.dumps(i), ["s1"]) for i in range(events)
    ]
    async with store.engine.begin() as conn:
        await store.record_events(conn, staged)
        await store.resolve(
            conn,
            [
                ResolutionRow(
                    stream_id,
                    e.event_id,
                    "s1",
                    "acked",
                    None,
                    [json.dumps({"event": i, "k": k}) for k in range(per_event)],
                )
                for i, e in enumerate(staged)
            ],
        )
    return stream_id


async def sink_rows(store: OutboxStore) -> list[tuple[int, int, str]]:
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            sa.text("SELECT record_id, stream_id, reader FROM consumer_sink ORDER BY seq")
        )
        return [(r[0], r[1], r[2]) for r in rows]


def sink_into(name: str) -> Callable[[AsyncConnection, list[OutboxRecord]], Awaitable[None]]:
    async def handler(conn: AsyncConnection, records: list[OutboxRecord]) -> None:
        await conn.execute(
            sa.text(
                "INSERT INTO consumer_sink (record_id, stream_id, reader) "
                "SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:streams AS bigint[]), "
                "CAST(:readers AS text[]))"
            ),
            {
                "ids": [r.id for r in records],
                "streams": [r.stream_id for r in records],
                "readers": [name] * len(records),
            },
        )

    return handler


@pytest.fixture
async def sink(store: OutboxStore) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(sa.text(SINK))


async def test_hand_off_commits_with_the_consumers_own_writes(
    store: OutboxStore, sink: None
) -> None:
    await fill(store, "q", events=3)
    reader = OutboxReader(store, batch_size=10)

    async def failing(conn: AsyncConnection, records: list[OutboxRecord]) -> None:
        await sink_into("r")(conn, records)
        raise RuntimeError("consumer crashed mid-batch")

    with pytest.raises(RuntimeError):
        await reader.process(failing)
    assert await sink_rows(store) == []  # rolled back, and nothing marked dispatched
    assert await reader.process(sink_into("r")) == 6
    assert await reader.process(sink_into("r")) == 0
    rows = await sink_rows(store)
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    async with store.engine.connect() as conn:
        payloads = (
            (await conn.execute(sa.text("SELECT payload FROM outbox_record ORDER BY id")))
            .scalars()
            .all()
        )
        undispatched = await conn.scalar(
            sa.text("SELECT count(*) FROM outbox_record WHERE dispatched_at IS NULL")
        )
    assert payloads[:2] == [{"event": 0, "k": 0}, {"event": 0, "k": 1}]
    assert undispatched == 0


async def test_claim_inside_the_callers_transaction(store: OutboxStore) -> None:
    await fill(store, "q", events=2, per_event=1)
    reader = OutboxReader(store)
    async with store.engine.begin() as conn:
        records = await reader.claim(conn)
        assert [r.payload for r in records] == [{"event": 0, "k": 0}, {"event": 1, "k": 0}]
        async with store.engine.begin() as other:
            assert await reader.claim(other) == []  # locked by the open transaction
        await reader.mark_dispatched(conn, records)
    async with store.engine.begin() as conn:
        assert await reader.claim(conn) == []


async def test_several_readers_share_the_work_once_each_in_stream_order(
    store: OutboxStore, sink: None
) -> None:
    streams = [await fill(store, name, events=150) for name in ("a", "b", "c")]
    readers = {name: OutboxReader(store, batch_size=25) for name in ("r1", "r2", "r3")}

    async def drain(name: str) -> None:
        while await readers[name].process(sink_into(name)):
            pass

    await asyncio.gather(*(drain(name) for name in readers))
    rows = await sink_rows(store)
    assert len(rows) == 3 * 150 * 2 == len({r[0] for r in rows})
    for stream_id in streams:
        ids = [record_id for record_id, s, _ in rows if s == stream_id]
        assert ids == sorted(ids)
    assert len({reader for *_, reader in rows}) > 1


async def test_filters_by_stream_and_subscriber(store: OutboxStore, sink: None) -> None:
    await fill(store, "a", events=2)
    b = await fill(store, "b", events=2)
    only_b = OutboxReader(store, streams=[("queue", "b")])
    assert await only_b.process(sink_into("x")) == 4
    assert {s for _, s, _ in await sink_rows(store)} == {b}
    nobody = OutboxReader(store, subscribers=["s2"])
    assert await nobody.process(sink_into("y")) == 0


async def test_run_wakes_on_new_records_without_waiting_for_its_poll(
    store: OutboxStore, sink: None
) -> None:
    """Storing trigger events notifies ``outbox_records``: a running reader hands them over at
    once, long before its poll interval."""
    reader = OutboxReader(store, poll_interval=3600.0)
    await fill(store, "first", 2)
    task = asyncio.create_task(reader.run(sink_into("r")))
    try:
        # The reader listens before its first pass: once it took these, it is listening.
        await eventually(lambda: _count(store, 4), within=10.0)
        await fill(store, "second", 3)
        await eventually(lambda: _count(store, 10), within=10.0)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _count(store: OutboxStore, expected: int) -> bool:
    return len(await sink_rows(store)) == expected


async def test_run_ends_with_what_the_handler_raised_and_hands_nothing_over(
    store: OutboxStore, sink: None
) -> None:
    """A handler's own failure (a broker timeout, say) is not a database outage: ``run`` does
    not retry it, it raises it, and the records stay undispatched for the next reader."""
    await fill(store, "q", 1)

    async def broker_down(conn: AsyncConnection, records: list[OutboxRecord]) -> None:
        raise ConnectionError("broker unreachable")

    with pytest.raises(ConnectionError, match="broker unreachable"):
        await asyncio.wait_for(OutboxReader(store).run(broker_down), 10)
    assert await OutboxReader(store).process(sink_into("next")) == 2

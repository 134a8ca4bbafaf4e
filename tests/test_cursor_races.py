"""The committer's cursor move against a redelivery that changes an event it is advancing.

A redelivery locks the lane before it changes an event, and counts the change in the lane's
``rewrites``; the move is one update of the lane row that requires ``rewrites`` to be what the
committer read with the events (checked again on the row a redelivery left, if one held it). So
a refreshed payload (an SQS receipt handle, say) or a re-opened event always makes the batch go
out again, whether the redelivery committed during the advance or was still open when the move
came.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, NamedTuple

import pytest
import sqlalchemy as sa

from outbox import LaneCommitter
from outbox.core import canonical_json
from outbox.store import EventToRecord, ResolutionRow
from tests.polling import eventually
from tests.test_committer import KEY, Producer, add_events, resolve

if TYPE_CHECKING:
    from outbox import OutboxStore


async def _stream(store: OutboxStore) -> tuple[int, int]:
    stream_id = await store.ensure_stream(
        canonical_json(KEY, what="key"), "tests.NotATrigger", "{}", 300.0
    )
    lanes = await store.ensure_lanes(stream_id, ["null"])
    return stream_id, lanes["null"]


def _delivery(
    stream_id: int, lane_id: int, receipt: str, snapshot: tuple[str, ...] = ("s1",)
) -> EventToRecord:
    return EventToRecord(stream_id, lane_id, "m1", "{}", json.dumps(receipt), list(snapshot))


async def _accepted_event(store: OutboxStore) -> tuple[int, int]:
    """Message m1 (receipt r1), recorded and acked by its only subscriber s1."""
    stream_id, lane_id = await _stream(store)
    event = _delivery(stream_id, lane_id, "r1")
    async with store.engine.begin() as conn:
        await store.record_events(conn, [event])
        await store.resolve(conn, [ResolutionRow(stream_id, event.event_id, "s1", "acked", None)])
    return stream_id, lane_id


class _HeldPass(NamedTuple):
    stream_id: int
    lane_id: int
    producer: _HeldProducer
    lanes: LaneCommitter
    first: asyncio.Task[int]


class _HeldProducer(Producer):
    def __init__(self) -> None:
        super().__init__(hold=asyncio.Event())

    def release(self) -> None:
        assert self.hold is not None
        self.hold.set()


async def _pass_held_in_its_advance(store: OutboxStore) -> _HeldPass:
    """m1 accepted, and a committer pass started that now waits inside its advance of r1."""
    stream_id, lane_id = await _accepted_event(store)
    producer = _HeldProducer()
    lanes = LaneCommitter(store, producers={KEY: producer})
    first = asyncio.create_task(lanes.run_once())
    await producer.entered.wait()
    return _HeldPass(stream_id, lane_id, producer, lanes, first)


async def _cursor(store: OutboxStore) -> int:
    async with store.engine.connect() as conn:
        return int(await conn.scalar(sa.text("SELECT advanced_through FROM outbox_lane")) or 0)


async def _move_waits_on_a_lock(store: OutboxStore) -> bool:
    async with store.engine.connect() as conn:
        waiting = await conn.scalar(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND query LIKE '%SET advanced_through%'"
            )
        )
    return bool(waiting)


async def test_payload_refreshed_during_the_advance_sends_the_batch_again(
    store: OutboxStore,
) -> None:
    stream_id, lane_id, producer, lanes, first = await _pass_held_in_its_advance(store)
    # The broker redelivers m1 with a new receipt while the committer is deleting with r1.
    async with store.engine.begin() as conn:
        await store.record_events(conn, [_delivery(stream_id, lane_id, "r2")])
    producer.release()
    assert await first == 0, "the cursor moved over an event whose payload changed"
    assert lanes.more_ready(), "a refused move must be followed by another pass at once"
    assert await _cursor(store) == 0
    assert await lanes.run_once() == 1
    assert producer.batches == [["r1"], ["r2"]]
    assert await _cursor(store) == 1


async def test_move_waits_for_an_open_redelivery_and_then_sees_its_change(
    store: OutboxStore,
) -> None:
    stream_id, lane_id, producer, lanes, first = await _pass_held_in_its_advance(store)
    async with store.engine.connect() as redelivery:
        await redelivery.begin()
        await store.record_events(redelivery, [_delivery(stream_id, lane_id, "r2")])
        producer.release()  # the advance returns; the move now needs the lane the redelivery holds
        await eventually(lambda: _move_waits_on_a_lock(store), within=10.0)
        assert not first.done()
        await redelivery.commit()
    assert await first == 0, "the move did not see the redelivery it waited for"
    assert await lanes.run_once() == 1
    assert producer.batches == [["r1"], ["r2"]]


async def test_event_reopened_for_a_new_subscriber_during_the_advance_stays_unadvanced(
    store: OutboxStore,
) -> None:
    stream_id, lane_id, producer, lanes, first = await _pass_held_in_its_advance(store)
    # Redelivered to a triggerer where s2 subscribed meanwhile: s2 now owes the event.
    reopened = _delivery(stream_id, lane_id, "r2", snapshot=("s1", "s2"))
    async with store.engine.begin() as conn:
        await store.record_events(conn, [reopened])
    assert reopened.deliver_to == ["s2"]
    producer.release()
    assert await first == 0
    assert await lanes.run_once() == 0, "advanced before the new subscriber resolved it"
    async with store.engine.begin() as conn:
        await store.resolve(
            conn, [ResolutionRow(stream_id, reopened.event_id, "s2", "acked", None)]
        )
    assert await lanes.run_once() == 1
    assert producer.batches == [["r1"], ["r2"]]
    assert producer.outcomes[-1].acked == 2


async def test_the_timeout_sweep_skips_an_event_a_redelivery_is_reopening(
    store: OutboxStore,
) -> None:
    """m1 timed out for s2 and failed for s1; its redelivery re-opens it (fresh ``created_at``,
    s1 owed again) while the ack-timeout sweep runs. The sweep must not fail the fresh
    deliveries: it skips the event while the redelivery holds it, and afterwards the event is
    no longer expired."""
    stream_id, lane_id = await _stream(store)
    first = _delivery(stream_id, lane_id, "r1", ("s1", "s2"))
    async with store.engine.begin() as conn:
        await store.record_events(conn, [first])
        await store.resolve(conn, [ResolutionRow(stream_id, first.event_id, "s1", "failed", "x")])
        await conn.execute(sa.text("UPDATE outbox_stream SET ack_timeout = 60"))
        await conn.execute(sa.text("UPDATE outbox_event SET created_at = now() - interval '1 h'"))
    async with store.engine.connect() as redelivery:
        await redelivery.begin()
        again = _delivery(stream_id, lane_id, "r2", ("s1", "s2"))
        await store.record_events(redelivery, [again])
        assert again.event_id == first.event_id and set(again.deliver_to) == {"s1", "s2"}
        assert await asyncio.wait_for(store.fail_expired(), 10) == 0
        await redelivery.commit()
    assert await store.fail_expired() == 0
    async with store.engine.connect() as conn:
        states = (
            await conn.execute(sa.text("SELECT subscriber, state FROM outbox_delivery"))
        ).all()
        pending = await conn.scalar(sa.text("SELECT pending FROM outbox_event"))
    assert (states, pending) == ([], 2)


async def test_the_move_locks_its_lanes_in_id_order(store: OutboxStore) -> None:
    """A recording locks its lanes in id order; the cursor move must too, or the two deadlock
    (and stall for a second until Postgres breaks the deadlock). Here the lower lane's row sits
    after the other one in the table, where a plain update would reach it second: while the
    higher lane is held, the move must already hold the lower one."""
    ids = await add_events(store, ["a1", "b1", "a2", "b2"], lane_of=lambda p: p[0])
    lanes = LaneCommitter(store, producers={KEY: Producer()})
    await resolve(store, ids[:2])
    assert await lanes.run_once() == 2  # leases taken (and kept for the next pass)
    await resolve(store, ids[2:])
    async with store.engine.connect() as conn:
        low, high = (await conn.execute(sa.text("SELECT id FROM outbox_lane ORDER BY id"))).all()
        # A new version of the lower lane's row, placed after the higher one's; and plans that
        # read this small table in place (as they do once it has statistics and dead rows).
        await conn.execute(
            sa.text("UPDATE outbox_lane SET attempts = 0 WHERE id = :id"), {"id": low[0]}
        )
        database = await conn.scalar(sa.text("SELECT current_database()"))
        for setting in ("enable_indexscan", "enable_bitmapscan", "enable_nestloop"):
            await conn.execute(sa.text(f'ALTER DATABASE "{database}" SET {setting} = off'))
        await conn.commit()
    await store.engine.dispose()  # new connections, with those settings
    async with store.engine.connect() as holder:
        await holder.begin()
        await holder.execute(
            sa.text("SELECT id FROM outbox_lane WHERE id = :id FOR UPDATE"), {"id": high[0]}
        )
        moving = asyncio.create_task(lanes.run_once())
        await eventually(lambda: _move_waits_on_a_lock(store), within=10.0)
        async with store.engine.connect() as probe:
            with pytest.raises(sa.exc.DBAPIError, match="could not obtain lock"):
                await probe.execute(
                    sa.text("SELECT id FROM outbox_lane WHERE id = :id FOR UPDATE NOWAIT"),
                    {"id": low[0]},
                )
        await holder.rollback()
    assert await moving == 2

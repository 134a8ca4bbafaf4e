"""The lane committer on a real Postgres: order, batching, lanes, leases, failures, timeouts."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from outbox import AdvanceItem, AdvanceOutcome, LaneCommitter, OutboxStore, SharedStreamProducer
from outbox.core import canonical_json
from outbox.store import EventToRecord, ResolutionRow
from tests.polling import eventually
from tests.streams import wait_until

if TYPE_CHECKING:
    from collections.abc import Sequence

KEY = ("queue", "q")


class Producer(SharedStreamProducer):
    def __init__(self, *, fail_first: int = 0, hold: asyncio.Event | None = None) -> None:
        self.batches: list[list[Any]] = []
        self.outcomes: list[AdvanceOutcome] = []
        self.fail_first = fail_first
        self.hold = hold
        self.calls = 0
        self.entered = asyncio.Event()

    async def open_stream(self) -> Any:  # pragma: no cover - never opened by the committer
        raise NotImplementedError
        yield

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        self.calls += 1
        self.entered.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.calls <= self.fail_first:
            raise RuntimeError(f"broker down (call {self.calls})")
        self.batches.append([p for p, _ in batch])
        self.outcomes.extend(o for _, o in batch)


async def add_events(
    store: OutboxStore,
    payloads: Sequence[Any],
    *,
    lane_of: Any = None,
    snapshot: Sequence[str] = ("s1",),
    ack_timeout: float = 300.0,
    trigger_class: str = "tests.test_committer.NotATrigger",
) -> list[int]:
    stream_id = await store.ensure_stream(
        canonical_json(KEY, what="key"), trigger_class, json.dumps({"name": "q"}), ack_timeout
    )
    lane_keys = {canonical_json(lane_of(p) if lane_of else None, what="lane") for p in payloads}
    lane_ids = await store.ensure_lanes(stream_id, lane_keys)
    events = [
        EventToRecord(
            stream_id=stream_id,
            lane_id=lane_ids[canonical_json(lane_of(p) if lane_of else None, what="lane")],
            identity=None,
            raw_json=json.dumps({"p": p}),
            payload_json=json.dumps(p),
            snapshot=list(snapshot),
        )
        for p in payloads
    ]
    async with store.engine.begin() as conn:
        await store.record_events(conn, events)
    return [e.event_id for e in events]


async def resolve(
    store: OutboxStore, event_ids: Sequence[int], subscriber: str = "s1", state: str = "acked"
) -> None:
    async with store.engine.begin() as conn:
        stream_id = await conn.scalar(sa.text("SELECT id FROM outbox_stream"))
        assert stream_id is not None
        await store.resolve(
            conn, [ResolutionRow(stream_id, e, subscriber, state, None) for e in event_ids]
        )


async def advance_when_due(lanes: LaneCommitter, within: float = 10.0) -> int:
    """Run passes until one advances something (a lease or retry comes due by the database
    clock), failing after ``within`` seconds."""
    return await eventually(lanes.run_once, within=within, interval=0.02)


def committer(store: OutboxStore, producer: SharedStreamProducer, **options: Any) -> LaneCommitter:
    return LaneCommitter(store, producers={KEY: producer}, **options)


async def test_advances_contiguous_resolved_prefix_in_order_and_stops_at_unresolved_head(
    store: OutboxStore,
) -> None:
    ids = await add_events(store, ["p1", "p2", "p3", "p4"])
    producer = Producer()
    lanes = committer(store, producer)
    await resolve(store, [ids[1], ids[2]])
    assert await lanes.run_once() == 0
    assert producer.batches == []
    await resolve(store, [ids[0]])
    assert await lanes.run_once() == 3
    assert producer.batches == [["p1", "p2", "p3"]]
    assert producer.outcomes == [AdvanceOutcome(1, 0, 0)] * 3
    await resolve(store, [ids[3]], state="rejected")
    assert await lanes.run_once() == 1
    assert producer.batches[-1] == ["p4"] and producer.outcomes[-1] == AdvanceOutcome(0, 0, 1)


async def test_batches_are_bounded_and_strictly_in_order(store: OutboxStore) -> None:
    payloads = list(range(25))
    ids = await add_events(store, payloads)
    await resolve(store, ids)
    producer = Producer()
    lanes = committer(store, producer, batch_size=10)
    more = []
    while await lanes.run_once():
        more.append(lanes.more_ready())
    assert producer.batches == [payloads[0:10], payloads[10:20], payloads[20:25]]
    # A pass cut at the batch size asks for another at once; the last one does not.
    assert more == [True, True, False]


async def test_lanes_advance_independently(store: OutboxStore) -> None:
    ids = await add_events(store, ["a1", "b1", "a2", "b2"], lane_of=lambda p: p[0])
    await resolve(store, [ids[1], ids[2], ids[3]])  # a1 is unresolved
    producer = Producer()
    lanes = committer(store, producer)
    assert await lanes.run_once() == 2
    assert producer.batches == [["b1", "b2"]]
    await resolve(store, [ids[0]])
    assert await lanes.run_once() == 2
    assert producer.batches == [["b1", "b2"], ["a1", "a2"]]


async def test_event_nobody_was_subscribed_to_is_advanced_not_clean(store: OutboxStore) -> None:
    await add_events(store, ["p1"], snapshot=())
    producer = Producer()
    assert await committer(store, producer).run_once() == 1
    assert producer.outcomes == [AdvanceOutcome(0, 0, 0)]
    assert not producer.outcomes[0].is_clean


async def test_second_committer_waits_for_the_lease(store: OutboxStore) -> None:
    ids = await add_events(store, ["p1", "p2"])
    await resolve(store, ids[:1])
    first, second = Producer(), Producer()
    one = committer(store, first, lease_seconds=30)
    two = committer(store, second, lease_seconds=30)
    assert await one.run_once() == 1
    await resolve(store, ids[1:])
    assert await two.run_once() == 0  # lane leased to the first committer
    assert await one.run_once() == 1
    await one.release()
    assert first.batches == [["p1"], ["p2"]] and second.batches == []


async def test_paused_committer_past_its_lease_cannot_move_the_cursor(store: OutboxStore) -> None:
    ids = await add_events(store, ["p1", "p2"])
    await resolve(store, ids)
    hold = asyncio.Event()
    paused_producer, live_producer = Producer(hold=hold), Producer()
    paused = committer(store, paused_producer, lease_seconds=0.2)
    live = committer(store, live_producer, lease_seconds=30)
    stuck = asyncio.create_task(paused.run_once())
    await asyncio.wait_for(paused_producer.entered.wait(), 10)

    assert await advance_when_due(live) == 2  # once the lease expired by the database clock
    hold.set()
    assert await stuck == 0  # its advance ran, but the fenced cursor update was refused
    assert live_producer.batches == [["p1", "p2"]]
    assert paused_producer.batches == [["p1", "p2"]]  # at-least-once, never out of order
    async with store.engine.connect() as conn:
        assert await conn.scalar(sa.text("SELECT advanced_through FROM outbox_lane")) == 2


async def test_advance_failure_stalls_the_lane_then_retries_with_backoff(
    store: OutboxStore,
) -> None:
    ids = await add_events(store, ["a1", "b1"], lane_of=lambda p: p[0])
    await resolve(store, ids)
    made: list[Producer] = []

    def factory() -> Producer:
        # The first instance fails every call, so a retry must come from a fresh one.
        made.append(Producer(fail_first=10**6 if not made else 0))
        return made[-1]

    lanes = LaneCommitter(store, producers={KEY: factory}, retry_base=0.05, retry_cap=0.1)
    assert await lanes.run_once() == 1  # lane b goes on, on a fresh producer
    assert made[1].batches == [["b1"]]
    async with store.engine.connect() as conn:
        row = (
            await conn.execute(
                sa.text(
                    "SELECT attempts, last_error, stalled_since IS NOT NULL, advanced_through "
                    "FROM outbox_lane WHERE lane_key = '\"a\"'"
                )
            )
        ).one()
    assert row[0] == 1 and "broker down" in row[1] and row[2] and row[3] == 0

    assert await advance_when_due(lanes) == 1  # once the retry is due by the database clock
    assert made[0].batches == [] and made[1].batches == [["b1"], ["a1"]]
    async with store.engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.text("SELECT attempts, last_error, stalled_since FROM outbox_lane")
            )
        ).all()
    assert all(r == (0, None, None) for r in rows)


async def test_orphaned_delivery_times_out_by_the_database_clock(store: OutboxStore) -> None:
    await add_events(store, ["p1"], snapshot=("gone", "s1"), ack_timeout=0.05)
    async with store.engine.begin() as conn:
        await conn.execute(
            sa.text("UPDATE outbox_event SET created_at = now() - interval '1 second'")
        )
    ids = list(await _event_ids(store))
    await resolve(store, ids, subscriber="s1")
    producer = Producer()
    assert await committer(store, producer).run_once() == 1
    assert producer.outcomes == [AdvanceOutcome(acked=1, failed=1)]
    async with store.engine.connect() as conn:
        reason = await conn.scalar(
            sa.text("SELECT reason FROM outbox_delivery WHERE subscriber = 'gone'")
        )
    assert reason == "ack timeout (database clock)"


async def _event_ids(store: OutboxStore) -> list[int]:
    async with store.engine.connect() as conn:
        return [
            r[0] for r in await conn.execute(sa.text("SELECT id FROM outbox_event ORDER BY id"))
        ]


async def test_trigger_class_outside_the_allow_list_stalls_with_a_clear_error(
    store: OutboxStore,
) -> None:
    ids = await add_events(store, ["p1"], trigger_class="evil.module.Trigger")
    await resolve(store, ids)
    lanes = LaneCommitter(store, allowed_modules=["tests"])
    assert await lanes.run_once() == 0
    async with store.engine.connect() as conn:
        error = await conn.scalar(sa.text("SELECT last_error FROM outbox_lane"))
    assert error is not None
    assert "evil.module.Trigger is outside the allowed modules" in error
    assert "--allow-module" in error


async def test_producer_is_rebuilt_from_the_stored_trigger_class(store: OutboxStore) -> None:
    from tests.streams import StreamTrigger

    ids = await add_events(store, ["p1"], trigger_class="tests.streams.StreamTrigger")
    await resolve(store, ids)
    producer = Producer()
    StreamTrigger.PRODUCERS["q"] = producer
    StreamTrigger.factory_calls.clear()
    lanes = LaneCommitter(store, allowed_modules=["tests.streams"])
    assert await lanes.run_once() == 1
    assert producer.batches == [["p1"]]
    assert StreamTrigger.factory_calls == [{"name": "q"}]


async def test_waits_on_notify_not_on_polling(store: OutboxStore) -> None:
    ids = await add_events(store, ["p1"])
    producer = Producer()
    lanes = committer(store, producer, poll_interval=3600)
    runner = asyncio.create_task(lanes.run())
    try:
        await wait_until(lambda: lanes.passes >= 1 and lanes.listening, within=5)
        await resolve(store, ids)
        await wait_until(lambda: producer.batches == [["p1"]], within=5)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_draining_a_backlog_sweeps_timeouts_once_per_poll_interval(
    store: OutboxStore,
) -> None:
    """The sweep reads every lane's events after its cursor: run on each pass of a drain it
    would read the remaining backlog again and again."""
    ids = await add_events(store, [f"p{i}" for i in range(6)])
    await resolve(store, ids)
    lanes = committer(store, Producer(), batch_size=2, poll_interval=3600.0)
    sweeps = 0
    sweep = store.fail_expired

    async def counted(**kwargs: Any) -> int:
        nonlocal sweeps
        sweeps += 1
        return await sweep(**kwargs)

    store.fail_expired = counted  # type: ignore[method-assign]
    advanced = 0
    while moved := await lanes.run_once():
        advanced += moved
    assert advanced == 6 and lanes.passes == 4 and sweeps == 1

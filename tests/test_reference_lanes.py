"""Airflow's shared-stream reference scenarios 42-48 and 57-77 (catalogue sections 3.7 lanes and
batching, 3.9 producer failures / stop / drain / aclose, 3.10 V4-derived scenarios), ported to
``SharedStreamManager`` on a real Postgres.

Batching scenarios need resolutions to pile up before an advance runs: they use a manager without
its in-process committer and a separate ``LaneCommitter`` driven pass by pass (deterministic).
Where Airflow resolves a lane's events out of broadcast order (confirming seqs out of order),
the events come from several triggerers writing one stream (``Triggerers``): within one manager
a subscriber always resolves in broadcast order. Advance failures follow DESIGN 3.7: the lane
stays unadvanced and is retried with backoff; the stream and other lanes go on (Airflow V4 ends
the group).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import pytest

from outbox import (
    AdvanceOutcome,
    LaneCommitter,
    OutboxStore,
    SharedStreamManager,
    SharedStreamProducer,
    SubscriberOverflow,
    TriggerEvent,
    reject_shared_stream_event,
)
from tests.polling import eventually
from tests.streams import (
    Background,
    FakeClock,
    Gate,
    ScriptedProducer,
    ScriptedTrigger,
    StreamTrigger,
    Triggerers,
    collect,
    delivery_rows,
    event_rows,
    lane_rows,
    producer_of,
    record_rows,
    settle,
    wait_resolved,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

pytestmark = pytest.mark.anyio

KEY = ("queue", "q")


def by_letter(payload: Any) -> str:
    return str(payload)[0]


def projection(advanced: list[Any], letter: str) -> list[Any]:
    return [p for p in advanced if str(p)[0] == letter]


async def passes(committer: LaneCommitter) -> int:
    total = 0
    while advanced := await committer.run_once():
        total += advanced
    return total


# -- 3.7 Lanes, serialization, batching ----------------------------------------------------


@pytest.mark.parametrize(
    ("events", "lanes"), [(["p1", "p2"], False), (["a1", "b1"], True)], ids=["one", "two"]
)
async def test_pump_serializes_advance_calls(
    store: OutboxStore, events: list[str], lanes: bool
) -> None:
    """Scenario 42: at most one advance in flight, across lanes too."""
    release = asyncio.Event()

    async def blocked(payloads: list[Any]) -> None:
        await release.wait()

    producer = producer_of(
        *[({"p": p}, p) for p in events],
        lane_for=by_letter if lanes else None,
        advance_hook=blocked,
    )
    async with SharedStreamManager(store) as manager:
        sub = Background(manager.subscribe(trigger_id=1, trigger=StreamTrigger()))
        await wait_until(lambda: len(sub.items) == 2)
        await wait_resolved(store, events)
        await wait_until(lambda: producer.in_flight == 1)
        assert producer.advanced == []
        release.set()
        await wait_until(lambda: len(producer.advanced) == 2)
        if lanes:
            assert sorted(producer.advanced) == ["a1", "b1"]
        else:
            assert producer.advanced == ["p1", "p2"]
        assert producer.max_in_flight == 1


async def test_lanes_advance_independently(store: OutboxStore) -> None:
    """Scenario 43: a1, a2 are read by a triggerer whose subscriber is still on a1; b1, b2 are
    owed to a subscriber on another triggerer, which resolves them: lane b advances, lane a
    waits, then follows. Airflow's lane GC (``_lane_queues == {}``) maps to every lane cursor
    caught up with its last position."""
    triggerers = Triggerers(store, lane_for=by_letter)
    gate = Gate()
    try:
        triggerers.subscribe(trigger_id=1, gate=gate)
        triggerers.advancer.push({"p": "a1"}, "a1")
        triggerers.advancer.push({"p": "a2"}, "a2")
        await gate.arrived(1)
        await triggerers.record_elsewhere("2", ({"p": "b1"}, "b1"), ({"p": "b2"}, "b2"))
        await triggerers.resolve_elsewhere("2", "b1", "b2")
        await wait_resolved(store, ["b1", "b2"])
        assert await triggerers.settle() == 2
        assert triggerers.advancer.advanced == ["b1", "b2"]
        gate.release()
        await wait_resolved(store, ["a1"])
        await triggerers.settle()
        await gate.arrived(2)
        gate.release()
        await wait_resolved(store, ["a2"])
        await triggerers.settle()
        advanced = triggerers.advancer.advanced
        assert projection(advanced, "a") == ["a1", "a2"]
        assert projection(advanced, "b") == ["b1", "b2"]
        assert len(advanced) == 4
        assert all(r["advanced_through"] == r["next_position"] - 1 for r in await lane_rows(store))
    finally:
        await triggerers.aclose()


async def test_lane_internal_fifo_with_out_of_order_resolve(store: OutboxStore) -> None:
    """Scenario 44: a1 (unresolved: the reading triggerer's subscriber is on it), then b1, a2,
    a3 (resolved by a subscriber on another triggerer): only b1 advances; once a1 resolves,
    lane a advances a1, a2, a3 in one batch, in lane order."""
    triggerers = Triggerers(store, lane_for=by_letter)
    gate = Gate()
    try:
        triggerers.subscribe(trigger_id=1, gate=gate)
        triggerers.advancer.push({"p": "a1"}, "a1")
        await gate.arrived(1)
        pushed = [({"p": p}, p) for p in ("b1", "a2", "a3")]
        await triggerers.record_elsewhere("2", *pushed)
        await triggerers.resolve_elsewhere("2", "b1", "a2", "a3")
        await wait_resolved(store, ["b1", "a2", "a3"])
        await triggerers.settle()
        assert triggerers.advancer.advanced == ["b1"]
        gate.release()
        await wait_resolved(store, ["a1"])
        await triggerers.settle()
        advanced = triggerers.advancer.advanced
        assert projection(advanced, "a") == ["a1", "a2", "a3"]
        assert projection(advanced, "b") == ["b1"]
        assert len(advanced) == 4
        assert ["a1", "a2", "a3"] in triggerers.advancer.batches
    finally:
        await triggerers.aclose()


def external_committer(store: OutboxStore, producer: SharedStreamProducer) -> LaneCommitter:
    return LaneCommitter(store, producers={KEY: producer}, retry_base=0.01, retry_cap=0.05)


async def test_pump_batches_contiguous_resolved_prefix(store: OutboxStore) -> None:
    """Scenario 45: while the subscriber is on p1 ("unconfirmed") no batch; once p1, p2 and p3
    are all resolved before the committer's pass: one batch."""
    producer = producer_of(*[({"n": i}, f"p{i}") for i in (1, 2, 3)])
    committer = external_committer(store, producer)
    gate = Gate()
    async with SharedStreamManager(store, run_committer=False) as manager:
        Background(manager.subscribe(trigger_id=1, trigger=StreamTrigger(gate=gate)))
        await gate.arrived(1)
        await manager._writer.barrier()
        assert await passes(committer) == 0
        for i in (1, 2, 3):
            await gate.arrived(i)
            gate.release()
        await wait_resolved(store, ["p1", "p2", "p3"])
        assert producer.batches == []
        assert await passes(committer) == 3
        assert producer.batches == [["p1", "p2", "p3"]]


async def test_pump_batches_per_lane_independently(store: OutboxStore) -> None:
    """Scenario 46."""
    events = ["a1", "b1", "a2", "b2"]
    producer = producer_of(*[({"p": p}, p) for p in events], lane_for=by_letter)
    committer = external_committer(store, producer)
    async with SharedStreamManager(store, run_committer=False) as manager:
        Background(manager.subscribe(trigger_id=1, trigger=StreamTrigger()))
        await wait_resolved(store, events)
        assert await passes(committer) == 4
        assert sorted(producer.batches) == [["a1", "a2"], ["b1", "b2"]]


async def test_partial_prefix_waits_for_lane_head(store: OutboxStore) -> None:
    """Scenario 47: p2 and p3 (owed to a subscriber on another triggerer) resolve while p1 does
    not: no batch; then p1 resolves: one batch [p1, p2, p3]."""
    triggerers = Triggerers(store)
    gate = Gate()
    try:
        triggerers.subscribe(trigger_id=1, gate=gate)
        triggerers.advancer.push({"n": 1}, "p1")
        await gate.arrived(1)
        await triggerers.record_elsewhere("2", ({"n": 2}, "p2"), ({"n": 3}, "p3"))
        await triggerers.resolve_elsewhere("2", "p2", "p3")
        await wait_resolved(store, ["p2", "p3"])
        assert await triggerers.settle() == 0
        assert triggerers.advancer.batches == []
        gate.release()
        await wait_resolved(store, ["p1"])
        assert await triggerers.settle() == 3
        assert triggerers.advancer.batches == [["p1", "p2", "p3"]]
    finally:
        await triggerers.aclose()


async def test_trickle_resolution_yields_singleton_batches(store: OutboxStore) -> None:
    """Scenario 48: one resolution per committer pass."""
    producer = producer_of(*[({"n": i}, f"p{i}") for i in (1, 2, 3)])
    committer = external_committer(store, producer)
    gate = Gate()
    async with SharedStreamManager(store, run_committer=False) as manager:
        Background(manager.subscribe(trigger_id=1, trigger=StreamTrigger(gate=gate)))
        for i in (1, 2, 3):
            await gate.arrived(i)
            gate.release()
            await wait_resolved(store, [f"p{i}"])
            assert await passes(committer) == 1
        assert producer.batches == [["p1"], ["p2"], ["p3"]]


# -- 3.9 Producer failures, stop, drain, aclose --------------------------------------------


async def test_get_advance_lane_raise_terminates_poll(store: OutboxStore) -> None:
    """Scenario 57."""

    def lane(payload: Any) -> Any:
        if payload == "p2":
            raise RuntimeError("lane boom")
        return None

    producer = producer_of(({"n": 1}, "p1"), lane_for=lane)
    async with SharedStreamManager(store) as manager:
        sub = Background(manager.subscribe(trigger_id=1, trigger=StreamTrigger()))
        poll = manager._streams[KEY].poll_task
        await wait_until(lambda: sub.items == [{"n": 1}])
        producer.push({"n": 2}, "p2")
        await sub.finished()
        assert isinstance(sub.error, RuntimeError) and str(sub.error) == "lane boom"
        assert KEY not in manager._streams
        assert poll is not None
        await asyncio.wait({poll})
        assert producer.aclose_calls == 1
        assert producer.advanced == ["p1"]
    assert len(await event_rows(store)) == 1  # p2 was never recorded


async def test_producer_factory_failure_is_terminal(store: OutboxStore) -> None:
    """Scenario 58."""

    def factory(kwargs: dict[str, Any]) -> SharedStreamProducer:
        raise RuntimeError("factory boom")

    StreamTrigger.FACTORIES["q"] = factory
    async with SharedStreamManager(store) as manager:
        stream = manager.subscribe(trigger_id=1, trigger=StreamTrigger())
        with pytest.raises(RuntimeError, match="factory boom"):
            await collect(stream, 1)
        assert KEY not in manager._streams


async def test_aclose_called_once_on_stop_path(store: OutboxStore) -> None:
    """Scenario 59."""
    producer = producer_of(({"n": 1}, "p1"))
    async with SharedStreamManager(store) as manager:
        stream = manager.subscribe(trigger_id=1, trigger=StreamTrigger())
        assert await collect(stream, 1) == [{"n": 1}]
        await manager.unsubscribe(1, KEY)
        assert producer.aclose_calls == 1
        assert producer.advanced == ["p1"]
    assert producer.aclose_calls == 1


async def test_aclose_called_once_on_terminal_path(store: OutboxStore) -> None:
    """Scenario 60."""
    producer = producer_of()
    producer.fail(RuntimeError("open boom"))
    async with SharedStreamManager(store) as manager:
        stream = manager.subscribe(trigger_id=1, trigger=StreamTrigger())
        poll = manager._streams[KEY].poll_task
        with pytest.raises(RuntimeError, match="open boom"):
            await collect(stream, 1)
        assert KEY not in manager._streams
        assert poll is not None
        await asyncio.wait({poll})
        assert producer.aclose_calls == 1


async def test_stop_drains_in_flight_advance(store: OutboxStore) -> None:
    """Scenario 61: stop_all waits for the advance in flight (and does not cancel it)."""
    go = asyncio.Event()
    finished: list[str] = []

    async def slow(payloads: list[Any]) -> None:
        await go.wait()
        finished.extend(payloads)

    producer = producer_of(({"n": 1}, "receipt-slow"), advance_hook=slow)
    manager = SharedStreamManager(store)
    Background(manager.subscribe(trigger_id=1, trigger=StreamTrigger()))
    await wait_until(lambda: producer.in_flight == 1)
    stopping = asyncio.create_task(manager.stop_all())
    await wait_until(lambda: manager._streams == {})
    await manager._writer.barrier()
    assert not stopping.done()
    go.set()
    await asyncio.wait_for(stopping, 10)
    assert finished == ["receipt-slow"]
    assert producer.advanced == ["receipt-slow"]
    assert producer.aclose_calls == 1


async def test_stop_drains_resolved_prefix_and_abandons_unresolved(store: OutboxStore) -> None:
    """Scenario 62: p1 resolved (its advance blocked), the subscriber on p2: stop_all advances
    p1 only; p2 stays pending in the outbox (not advanced, not failed: a restart or redelivery
    deals with it)."""
    go = asyncio.Event()

    async def blocked(payloads: list[Any]) -> None:
        await go.wait()

    producer = producer_of(({"n": 1}, "p1"), ({"n": 2}, "p2"), advance_hook=blocked)
    gate = Gate()
    manager = SharedStreamManager(store)
    sub = Background(manager.subscribe(trigger_id=1, trigger=StreamTrigger(gate=gate)))
    await gate.arrived(1)
    gate.release()
    await gate.arrived(2)
    await wait_until(lambda: producer.in_flight == 1)
    stopping = asyncio.create_task(manager.stop_all())
    await wait_until(lambda: manager._streams == {})
    await asyncio.sleep(0)  # one tick, as in Airflow
    assert not stopping.done()
    go.set()
    await asyncio.wait_for(stopping, 10)
    assert producer.advanced == ["p1"]
    assert producer.aclose_calls == 1
    await sub.finished()
    assert sub.items == [{"n": 1}] and sub.error is None
    assert [(e["payload"], e["pending"]) for e in await event_rows(store)] == [("p1", 0), ("p2", 1)]


async def test_stop_drains_all_lanes(store: OutboxStore) -> None:
    """Scenario 63: a1's advance blocks; a2, b1 resolve; the subscriber is on b2 when it
    unsubscribes (closing b2's window: acked). Once the advance returns, the stop drains every
    lane, pass after pass."""
    go = asyncio.Event()

    async def first_blocks(payloads: list[Any]) -> None:
        if payloads[0] == "a1":
            await go.wait()

    events = ["a1", "a2", "b1", "b2"]
    producer = producer_of(
        *[({"p": p}, p) for p in events], lane_for=by_letter, advance_hook=first_blocks
    )
    gate = Gate()
    async with SharedStreamManager(store) as manager:
        manager.subscribe(trigger_id=1, trigger=StreamTrigger(gate=gate))
        for i in range(1, 4):
            await gate.arrived(i)
            gate.release()
            if i == 1:
                await wait_until(lambda: producer.in_flight == 1)
        await gate.arrived(4)
        leaving = asyncio.create_task(manager.unsubscribe(1, KEY))
        await wait_resolved(store, events)
        assert not leaving.done()
        go.set()
        await asyncio.wait_for(leaving, 10)
        assert projection(producer.advanced, "a") == ["a1", "a2"]
        assert projection(producer.advanced, "b") == ["b1", "b2"]
        assert len(producer.advanced) == 4
        assert producer.aclose_calls == 1


@pytest.mark.parametrize("how", ["unsubscribe", "stop_all"])
async def test_group_stop_abandons_unconfirmed_advance(store: OutboxStore, how: str) -> None:
    """Scenario 64. The subscriber yielded a trigger event for p1 and is still on it.
    ``unsubscribe`` (deviation by design): leaving commits it with ``acked`` at once, so p1 IS
    advanced and the record stored (Airflow abandons it waiting for a confirmation).
    ``stop_all``: nothing is committed for p1: not advanced, no record, still pending."""
    producer = producer_of(({"n": 1}, "p1"))
    hold = Gate()

    async def script(trigger: ScriptedTrigger, raw: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for event in raw:
            yield TriggerEvent(event)
            await hold.hold(event)

    manager = SharedStreamManager(store)
    stream = manager.subscribe(trigger_id=1, trigger=ScriptedTrigger(script))
    await hold.arrived(1)
    if how == "unsubscribe":
        await manager.unsubscribe(1, KEY)
    else:
        await manager.stop_all()
    assert manager._streams == {}
    assert producer.aclose_calls == 1
    got = [e.payload async for e in stream]
    if how == "unsubscribe":
        assert producer.advanced == ["p1"]
        assert producer.outcomes == [AdvanceOutcome(1, 0)]
        assert got == [{"n": 1}]
        assert [r[3] for r in await record_rows(store)] == [{"n": 1}]
    else:
        assert producer.advanced == []
        assert got == []
        assert await record_rows(store) == []
        assert [e["pending"] for e in await event_rows(store)] == [1]
    await manager.stop_all()


async def test_ack_mode_late_subscriber_during_poll_failure_window_gets_fresh_group(
    store: OutboxStore,
) -> None:
    """Scenario 65."""
    producers: list[ScriptedProducer] = []

    def factory(kwargs: dict[str, Any]) -> SharedStreamProducer:
        if not producers:
            producer = ScriptedProducer()
            producer.fail(RuntimeError("boom"))
        else:
            producer = ScriptedProducer([({"region": "fresh"}, "fresh-1")])
        producers.append(producer)
        return producer

    StreamTrigger.FACTORIES["q"] = factory
    async with SharedStreamManager(store) as manager:
        first = manager.subscribe(trigger_id=1, trigger=StreamTrigger())
        await wait_until(lambda: KEY not in manager._streams)
        second = manager.subscribe(trigger_id=2, trigger=StreamTrigger())
        assert await collect(second, 1) == [{"region": "fresh"}]
        with pytest.raises(RuntimeError, match="boom"):
            await collect(first, 1)
        assert [p.opened for p in producers] == [1, 1]
        assert len(StreamTrigger.factory_calls) == 2
        await wait_until(lambda: producers[1].advanced == ["fresh-1"])


async def test_ack_mode_dead_stream_does_not_hold_up_fresh_stream_lanes(
    store: OutboxStore,
) -> None:
    """Scenario 65, durable part: the first stream dies while its subscriber is on e1 with e2
    queued. Both are failed with the stream (the broker redelivers them) and advanced as
    failed, so the fresh stream's e3, in the same lane, advances too."""
    producers: list[ScriptedProducer] = []

    def factory(kwargs: dict[str, Any]) -> SharedStreamProducer:
        producer = ScriptedProducer()
        producers.append(producer)
        return producer

    StreamTrigger.FACTORIES["q"] = factory
    gate = Gate()
    async with SharedStreamManager(store) as manager:
        first = Background(manager.subscribe(trigger_id=1, trigger=StreamTrigger(gate=gate)))
        await wait_until(lambda: len(producers) == 1)
        producers[0].push({"n": 1}, "e1")
        producers[0].push({"n": 2}, "e2")
        await gate.arrived(1)
        await wait_until(lambda: len(manager._streams[KEY].subscribers["1"].raw) == 1)
        producers[0].fail(RuntimeError("boom"))
        await wait_until(lambda: KEY not in manager._streams)
        second = manager.subscribe(trigger_id=2, trigger=StreamTrigger())
        await wait_until(lambda: len(producers) == 2)
        producers[1].push({"n": 3}, "e3")
        assert await collect(second, 1) == [{"n": 3}]
        await wait_until(
            lambda: producers[0].advanced + producers[1].advanced == ["e1", "e2", "e3"]
        )
        assert producers[0].outcomes + producers[1].outcomes == [
            AdvanceOutcome(0, 1),
            AdvanceOutcome(0, 1),
            AdvanceOutcome(1, 0),
        ]
        gate.release()
        await first.finished()
        assert isinstance(first.error, RuntimeError) and first.items == []


async def wait_until_async(
    read: Callable[[], Awaitable[Any]], condition: Callable[[Any], bool], within: float = 10.0
) -> None:
    """Like ``wait_until`` for a condition on something read from the database."""

    async def met() -> bool:
        return condition(await read())

    await eventually(met, within=within, interval=0.005)


def _advance_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("Producer advance raised")]


async def test_producer_advance_exception_is_logged(
    store: OutboxStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario 66 (DESIGN 3.7 instead of V4's group termination): advance always raises; the
    error is logged, the lane shows as stalled with its last error, the stream stays up and the
    subscriber still gets event-2; the producer is not closed."""

    async def broken(payloads: list[Any]) -> None:
        raise RuntimeError("simulated broker failure")

    producer = producer_of(({"n": 1}, "event-1"), advance_hook=broken)
    caplog.set_level(logging.ERROR, logger="outbox")
    async with SharedStreamManager(store) as manager:
        sub = Background(manager.subscribe(trigger_id=1, trigger=StreamTrigger()))
        await wait_until(lambda: bool(_advance_errors(caplog)))
        await wait_until_async(lambda: lane_rows(store), lambda rows: rows[0]["attempts"] >= 1)
        [lane] = await lane_rows(store)
        assert lane["attempts"] >= 1 and lane["stalled_since"] is not None
        assert "simulated broker failure" in lane["last_error"]
        assert "lane stays unadvanced" in _advance_errors(caplog)[0].getMessage()
        assert KEY in manager._streams
        producer.push({"n": 2}, "event-2")
        await wait_until(lambda: sub.items == [{"n": 1}, {"n": 2}])
        assert sub.error is None
        assert producer.advanced == [] and producer.aclose_calls == 0
        assert len(StreamTrigger.factory_calls) == 1


async def test_pump_continues_after_advance_raises(
    store: OutboxStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario 67: the first advance (p1) raises once. p1 is retried (not abandoned, unlike
    V2, and the stream is not ended, unlike V4); p2 is never advanced before p1."""
    attempted: list[list[Any]] = []

    async def once(payloads: list[Any]) -> None:
        attempted.append(payloads)
        if len(attempted) == 1:
            raise RuntimeError("p1 boom")

    producer = producer_of(({"n": 1}, "p1"), advance_hook=once)
    caplog.set_level(logging.ERROR, logger="outbox")
    options = {"retry_base": 0.01, "retry_cap": 0.05, "poll_interval": 0.05}
    async with SharedStreamManager(store, committer_options=options) as manager:
        sub = Background(manager.subscribe(trigger_id=1, trigger=StreamTrigger()))
        await wait_until(lambda: len(attempted) >= 1)
        producer.push({"n": 2}, "p2")
        await wait_until(lambda: producer.advanced == ["p1", "p2"])
        assert attempted[0] == ["p1"]
        assert all(batch[0] == "p1" for batch in attempted[:2])
        assert len(_advance_errors(caplog)) == 1
        assert sub.error is None and KEY in manager._streams
        # The cursor moves (clearing the stall) right after the advance returns.
        await wait_until_async(
            lambda: lane_rows(store),
            lambda rows: rows[0]["attempts"] == 0 and rows[0]["last_error"] is None,
        )


async def test_advance_raise_abandons_whole_batch(
    store: OutboxStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario 68: p1 and p2 resolved together, their batch raises: the whole batch stays
    unadvanced and is retried (with p3 once it resolves); nothing is abandoned."""
    calls: list[list[Any]] = []

    async def first_raises(payloads: list[Any]) -> None:
        calls.append(payloads)
        if len(calls) == 1:
            raise RuntimeError("batch boom")

    producer = producer_of(({"n": 1}, "p1"), ({"n": 2}, "p2"), advance_hook=first_raises)
    committer = external_committer(store, producer)
    caplog.set_level(logging.ERROR, logger="outbox")
    async with SharedStreamManager(store, run_committer=False) as manager:
        sub = Background(manager.subscribe(trigger_id=1, trigger=StreamTrigger()))
        await wait_resolved(store, ["p1", "p2"])
        assert await passes(committer) == 0
        assert calls == [["p1", "p2"]]
        assert len(_advance_errors(caplog)) == 1
        [lane] = await lane_rows(store)
        assert lane["attempts"] == 1 and lane["last_error"] == "RuntimeError: batch boom"
        producer.push({"n": 3}, "p3")
        await wait_resolved(store, ["p3"])

        async def retried() -> bool:
            return await passes(committer) > 0

        await eventually(retried, within=10, interval=0.01)
        assert calls == [["p1", "p2"], ["p1", "p2", "p3"]]
        assert producer.advanced == ["p1", "p2", "p3"]
        assert len(_advance_errors(caplog)) == 1
        assert KEY in manager._streams and sub.error is None


# -- 3.10 Scenarios derived from the V4 source ----------------------------------------------


async def test_scenario_69_zero_subscriber_outcome_is_not_clean(store: OutboxStore) -> None:
    """Scenario 69, through the public API: the only subscriber timed out (failed, still
    subscribed), so later events have an empty snapshot: born resolved, (0, 0, 0), not clean,
    advanced in lane order."""
    producer = producer_of(({"p": "a0"}, "a0"), lane_for=by_letter)
    clock = FakeClock()
    gate = Gate()
    async with SharedStreamManager(store, ack_timeout=0.1, clock=clock) as manager:
        manager.subscribe(trigger_id=1, trigger=StreamTrigger(gate=gate))
        await gate.arrived(1)
        clock.now = 0.2
        await wait_until(lambda: producer.advanced == ["a0"])
        for p in ("a1", "b1", "a2"):
            producer.push({"p": p}, p)
        await wait_until(lambda: len(producer.advanced) == 4)
        assert projection(producer.advanced, "a") == ["a0", "a1", "a2"]
        outcomes = dict(zip(producer.advanced, producer.outcomes, strict=True))
        assert outcomes["a0"] == AdvanceOutcome(0, 1)
        for p in ("a1", "b1", "a2"):
            assert outcomes[p] == AdvanceOutcome(0, 0, 0)
            assert not outcomes[p].is_clean
    assert [e["snapshot"] for e in await event_rows(store)] == [["1"], [], [], []]


@pytest.mark.parametrize("alone", [False, True], ids=["with-s2", "alone"])
async def test_scenario_70_unsubscribe_fails_events_never_pulled(
    store: OutboxStore, alone: bool
) -> None:
    """Scenario 70: S1 is on e1 (no trigger events), e2 and e3 queued for it, when it
    unsubscribes: e1 acked, e2 and e3 failed for S1."""
    producer = producer_of(*[({"n": i}, f"e{i}") for i in (1, 2, 3)])
    gate = Gate()
    async with SharedStreamManager(store) as manager:
        manager.subscribe(trigger_id=1, trigger=StreamTrigger(gate=gate))
        if not alone:
            s2 = Background(manager.subscribe(trigger_id=2, trigger=StreamTrigger()))
            await wait_until(lambda: len(s2.items) == 3)
        await gate.arrived(1)
        await manager.unsubscribe(1, KEY)
        if alone:
            # The stop drained them before unsubscribe returned.
            assert producer.advanced == ["e1", "e2", "e3"]
            assert producer.outcomes == [
                AdvanceOutcome(1, 0, 0),
                AdvanceOutcome(0, 1, 0),
                AdvanceOutcome(0, 1, 0),
            ]
        else:
            await wait_until(lambda: len(producer.advanced) == 3)
            assert producer.outcomes == [
                AdvanceOutcome(2, 0),
                AdvanceOutcome(1, 1),
                AdvanceOutcome(1, 1),
            ]
    s1 = [(p, st, r) for p, s, st, r in await delivery_rows(store) if s == "1"]
    assert s1 == [
        ("e1", "acked", None),
        ("e2", "failed", "unsubscribed before pulling"),
        ("e3", "failed", "unsubscribed before pulling"),
    ]


async def test_scenario_71_advance_failure_does_not_end_the_stream(
    store: OutboxStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario 71, ported to DESIGN 3.7: lane a's advance raises twice. Every subscriber keeps
    going, no new producer is built, lane b advances meanwhile, lane a shows as stalled, then
    advances in order and its stall clears."""
    failures = 0

    async def lane_a_fails_twice(payloads: list[Any]) -> None:
        nonlocal failures
        if payloads[0][0] == "a" and failures < 2:
            failures += 1
            raise RuntimeError("lane a down")

    producer = producer_of(
        *[({"p": p}, p) for p in ("a1", "b1")],
        lane_for=by_letter,
        advance_hook=lane_a_fails_twice,
    )
    caplog.set_level(logging.ERROR, logger="outbox")
    options = {"retry_base": 0.05, "retry_cap": 0.1, "poll_interval": 0.05}
    async with SharedStreamManager(store, committer_options=options) as manager:
        s1 = Background(manager.subscribe(trigger_id=1, trigger=StreamTrigger()))
        s2 = Background(manager.subscribe(trigger_id=2, trigger=StreamTrigger()))
        await wait_until(lambda: "b1" in producer.advanced and failures >= 1)
        await wait_until_async(
            lambda: lane_rows(store),
            lambda rows: any(r["lane_key"] == '"a"' and r["stalled_since"] for r in rows),
        )
        stalled = {r["lane_key"]: r for r in await lane_rows(store)}
        assert stalled['"a"']["stalled_since"] is not None
        assert stalled['"a"']["last_error"] == "RuntimeError: lane a down"
        assert stalled['"b"']["stalled_since"] is None
        for p in ("a2", "b2"):
            producer.push({"p": p}, p)
        await wait_until(lambda: len(producer.advanced) == 4)
        assert projection(producer.advanced, "a") == ["a1", "a2"]
        assert projection(producer.advanced, "b") == ["b1", "b2"]
        assert failures == 2 and len(_advance_errors(caplog)) == 2
        assert len(s1.items) == len(s2.items) == 4
        assert s1.error is None and s2.error is None
        assert len(StreamTrigger.factory_calls) == 1 and producer.aclose_calls == 0
        await wait_until_async(
            lambda: lane_rows(store), lambda rows: all(r["stalled_since"] is None for r in rows)
        )


@pytest.mark.parametrize("grace", [0.5, 0.0])
async def test_scenario_72_cohort_grace(store: OutboxStore, grace: float) -> None:
    """Scenario 72: with a grace period the producer is not built before it ends, and a
    subscriber joining within it is in the first event's snapshot; without one, polling starts
    at once and a later subscriber is not."""
    producer = producer_of(({"n": 1}, "p1"))
    async with SharedStreamManager(store, cohort_grace_period=grace) as manager:
        a = manager.subscribe(trigger_id=1, trigger=StreamTrigger())
        if grace:
            await manager._writer.barrier()
            assert StreamTrigger.factory_calls == [] and producer.opened == 0
            b = manager.subscribe(trigger_id=2, trigger=StreamTrigger())
            assert await collect(a, 1) == [{"n": 1}]
            assert await collect(b, 1) == [{"n": 1}]
            snapshot = ["1", "2"]
        else:
            assert await collect(a, 1) == [{"n": 1}]
            manager.subscribe(trigger_id=2, trigger=StreamTrigger())
            snapshot = ["1"]
        assert len(StreamTrigger.factory_calls) == 1
    assert [e["snapshot"] for e in await event_rows(store)] == [snapshot]


async def test_scenario_73_reject_logs_info(
    store: OutboxStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario 73."""
    producer = producer_of(({"reject": True}, "p1"))
    caplog.set_level(logging.INFO, logger="outbox.manager")
    async with SharedStreamManager(store) as manager:
        manager.subscribe(trigger_id=1, trigger=StreamTrigger())
        await wait_until(lambda: producer.advanced == ["p1"])
    [event] = await event_rows(store)
    [record] = [r for r in caplog.records if r.getMessage() == "Rejecting shared-stream event"]
    assert record.levelno == logging.INFO
    assert record.trigger_id == 1  # type: ignore[attr-defined]
    assert record.event_id == event["id"]  # type: ignore[attr-defined]


async def test_scenario_74_overflow_fails_current_event_too(store: OutboxStore) -> None:
    """Scenario 74 (``overflow="fail"``, bound 1): the only subscriber is on e0 with e1 queued;
    e2 overflows it and is advanced with (acked=0, failed=1), like e0 and e1."""
    producer = producer_of(({"n": 0}, "e0"))
    gate = Gate()
    async with SharedStreamManager(store, max_subscriber_queue=1, overflow="fail") as manager:
        sub = Background(manager.subscribe(trigger_id=1, trigger=StreamTrigger(gate=gate)))
        await gate.arrived(1)
        producer.push({"n": 1}, "e1")
        await wait_until(lambda: len(manager._streams[KEY].subscribers["1"].raw) == 1)
        producer.push({"n": 2}, "e2")
        await wait_until(lambda: len(producer.advanced) == 3)
        assert producer.advanced == ["e0", "e1", "e2"]
        assert producer.outcomes == [AdvanceOutcome(acked=0, failed=1)] * 3
        gate.release()
        await sub.finished()
        assert isinstance(sub.error, SubscriberOverflow)


async def test_scenario_75_failed_subscriber_excluded_until_resubscribed(
    store: OutboxStore,
) -> None:
    """Scenario 75."""
    producer = producer_of(({"n": 1}, "e1"))
    clock = FakeClock()
    gate = Gate()
    async with SharedStreamManager(store, ack_timeout=0.1, clock=clock) as manager:
        manager.subscribe(trigger_id=1, trigger=StreamTrigger(gate=gate))
        s2 = Background(manager.subscribe(trigger_id=2, trigger=StreamTrigger()))
        await gate.arrived(1)
        clock.now = 0.2
        await wait_until(lambda: manager._streams[KEY].subscribers["1"].failed)
        producer.push({"n": 2}, "e2")
        await wait_until(lambda: len(s2.items) == 2)
        await manager.unsubscribe(1, KEY)
        again = Background(manager.subscribe(trigger_id=1, trigger=StreamTrigger()))
        producer.push({"n": 3}, "e3")
        await wait_until(lambda: again.items == [{"n": 3}] and len(s2.items) == 3)
        await wait_until(lambda: len(producer.advanced) == 3)
        assert producer.outcomes == [
            AdvanceOutcome(1, 1),
            AdvanceOutcome(1, 0),
            AdvanceOutcome(2, 0),
        ]
    assert [sorted(e["snapshot"]) for e in await event_rows(store)] == [
        ["1", "2"],
        ["2"],
        ["1", "2"],
    ]


async def test_scenario_76_unbound_trigger_events_and_ordinals(store: OutboxStore) -> None:
    """Scenario 76 (Airflow: ``bind_pending_event`` returns None without drawing a seq when
    there is no live binding). Here: a trigger event yielded outside any window is stored
    unbound (no event) and still fires; one yielded after a reject is not stored; record
    ordinals per (event, subscriber) are consecutive from 0, unaffected by either."""
    producer = producer_of(({"n": 1}, "p1"), ({"n": 2, "reject": True}, "p2"), ({"n": 3}, "p3"))

    async def script(trigger: ScriptedTrigger, raw: AsyncIterator[Any]) -> AsyncIterator[Any]:
        yield TriggerEvent({"boot": True})
        async for event in raw:
            if event.get("reject"):
                reject_shared_stream_event()
                yield TriggerEvent({"after-reject": event["n"]})
                continue
            for part in range((event["n"] == 1 and 2) or 1):
                yield TriggerEvent({"n": event["n"], "part": part})

    async with SharedStreamManager(store) as manager:
        sub = Background(manager.subscribe(trigger_id=1, trigger=ScriptedTrigger(script)))
        await wait_until(lambda: len(producer.advanced) == 3)
        await wait_until(lambda: len(sub.items) == 4)
        assert sub.items == [
            {"boot": True},
            {"n": 1, "part": 0},
            {"n": 1, "part": 1},
            {"n": 3, "part": 0},
        ]
        assert producer.outcomes == [
            AdvanceOutcome(1, 0),
            AdvanceOutcome(0, 0, 1),
            AdvanceOutcome(1, 0),
        ]
    assert await record_rows(store) == [
        (None, "1", 0, {"boot": True}),
        ("p1", "1", 0, {"n": 1, "part": 0}),
        ("p1", "1", 1, {"n": 1, "part": 1}),
        ("p3", "1", 0, {"n": 3, "part": 0}),
    ]


async def test_scenario_77_one_commit_reaches_several_streams(store: OutboxStore) -> None:
    """Scenario 77 (Airflow: one ``confirm_persisted`` iterable reaches every group). Here:
    subscribers of two streams move on in the same tick, so their resolutions share the
    writer's group commit; each stream gets exactly its own records and advances."""
    pa = ScriptedProducer([({"s": "a"}, "pa")])
    pb = ScriptedProducer([({"s": "b"}, "pb")])
    StreamTrigger.PRODUCERS.update(a=pa, b=pb)
    ga, gb = Gate(), Gate()
    async with SharedStreamManager(store) as manager:
        sa = Background(manager.subscribe(trigger_id=1, trigger=StreamTrigger(name="a", gate=ga)))
        sb = Background(manager.subscribe(trigger_id=2, trigger=StreamTrigger(name="b", gate=gb)))
        await ga.arrived(1)
        await gb.arrived(1)
        await settle(manager)
        ga.release()
        gb.release()
        await wait_until(lambda: pa.advanced == ["pa"] and pb.advanced == ["pb"])
        assert sa.items == [{"s": "a"}] and sb.items == [{"s": "b"}]
    assert sorted((r[0], r[1], r[3]) for r in await record_rows(store)) == [
        ("pa", "1", {"s": "a"}),
        ("pb", "2", {"s": "b"}),
    ]

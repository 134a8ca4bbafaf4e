"""Airflow's shared-stream reference scenarios 23-41 and 49-56 (catalogue sections 3.3 basic
resolution, 3.4 ack timeout, 3.5 overflow, 3.6 zero-subscriber events, 3.8 reject), ported to
``SharedStreamManager`` on a real Postgres.

Mapping (DESIGN.md): Airflow's "bind a seq, confirm it later" is here "the filter yields, and
commits when it moves on": a filter still holding the event (a ``Gate``) is "unconfirmed"; the
trigger events it yielded and its ``acked`` mark commit in one transaction when it asks for the
next raw event or unsubscribes. "Nothing advanced" is asserted after ``settle`` (writer barrier,
then committer passes until one advances nothing), which is deterministic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import pytest

from outbox import (
    AckTimeout,
    AdvanceOutcome,
    OutboxStore,
    SharedStreamManager,
    SubscriberOverflow,
    TriggerEvent,
    reject_shared_stream_event,
)
from outbox.core import timeout_cadence
from outbox.subscriber import Failure as _Failure
from tests.streams import (
    Background,
    FakeClock,
    FastTrigger,
    Gate,
    ScriptedTrigger,
    StreamTrigger,
    Triggerers,
    collect,
    delivery_rows,
    event_rows,
    producer_of,
    record_rows,
    settle,
    wait_resolved,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from outbox.group import StreamGroup as _Stream
    from outbox.subscriber import Subscriber as _Subscriber

pytestmark = pytest.mark.anyio

KEY = ("queue", "q")


def stream_of(manager: SharedStreamManager) -> _Stream:
    return manager._streams[KEY]


def subscriber_of(manager: SharedStreamManager, trigger_id: int) -> _Subscriber:
    return manager._streams[KEY].subscribers[str(trigger_id)]


async def error_of(stream: AsyncIterator[TriggerEvent]) -> BaseException:
    try:
        async for _ in stream:
            pass
    except Exception as exc:
        return exc
    raise AssertionError("the stream ended without raising")


# -- 3.3 Basic resolution and advance -------------------------------------------------------


async def test_ack_required_producer_advances_after_all_subscribers_resolve(
    store: OutboxStore,
) -> None:
    """Scenario 23."""
    producer = producer_of(({"n": 1}, "receipt-1"))
    gate = Gate()
    async with SharedStreamManager(store) as manager:
        slow = Background(manager.subscribe(trigger_id=1, trigger=StreamTrigger(gate=gate)))
        fast = Background(manager.subscribe(trigger_id=2, trigger=StreamTrigger()))
        await gate.arrived(1)
        await wait_until(lambda: fast.items == [{"n": 1}])
        await settle(manager)
        assert producer.advanced == []
        gate.release()
        await wait_until(lambda: producer.advanced == ["receipt-1"])
        await settle(manager)
        assert producer.advanced == ["receipt-1"]
        assert producer.outcomes == [AdvanceOutcome(acked=2, failed=0)]
        assert slow.items == [{"n": 1}]
    assert sorted(r[1] for r in await record_rows(store)) == ["1", "2"]


async def test_ack_required_producer_does_not_advance_on_partial_resolution(
    store: OutboxStore,
) -> None:
    """Scenario 24."""
    producer = producer_of(({"n": 1}, "receipt-1"))
    gate = Gate()
    async with SharedStreamManager(store) as manager:
        manager.subscribe(trigger_id=1, trigger=StreamTrigger(gate=gate))
        fast = Background(manager.subscribe(trigger_id=2, trigger=StreamTrigger()))
        await gate.arrived(1)
        await wait_until(lambda: fast.items == [{"n": 1}])
        await settle(manager)
        assert producer.advanced == []
        assert [(s, st) for _, s, st, _ in await delivery_rows(store)] == [("2", "acked")]
        assert [e["pending"] for e in await event_rows(store)] == [1]


async def test_filtered_out_event_resolves_on_next_pull_without_confirmation(
    store: OutboxStore,
) -> None:
    """Scenario 25: the filter drops p1 (other region) and asks for the next event."""
    producer = producer_of(({"region": "eu"}, "p1"))
    async with SharedStreamManager(store) as manager:
        sub = Background(manager.subscribe(trigger_id=1, trigger=StreamTrigger(region="us")))
        await wait_until(lambda: producer.advanced == ["p1"])
        assert producer.outcomes == [AdvanceOutcome(acked=1, failed=0)]
        assert sub.items == []
    assert await record_rows(store) == []
    assert [(p, s, st) for p, s, st, _ in await delivery_rows(store)] == [("p1", "1", "acked")]


async def test_multi_event_binding_gates_advance_on_every_seq(store: OutboxStore) -> None:
    """Scenario 26: the filter yields two trigger events for p1, holding after each ("seq 1
    unconfirmed", "seq 2 unconfirmed"); nothing is stored, yielded or advanced until it moves
    on, then both commit with the ``acked`` mark and p1 advances once."""
    producer = producer_of(({"n": 1}, "p1"))
    holds = [Gate(), Gate()]

    async def script(trigger: ScriptedTrigger, raw: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for event in raw:
            yield TriggerEvent({"part": 1, **event})
            await holds[0].hold(event)
            yield TriggerEvent({"part": 2, **event})
            await holds[1].hold(event)

    async with SharedStreamManager(store) as manager:
        sub = Background(manager.subscribe(trigger_id=1, trigger=ScriptedTrigger(script)))
        for gate in holds:
            await gate.arrived(1)
            await settle(manager)
            assert producer.advanced == []
            assert await record_rows(store) == []
            assert sub.items == []
            gate.release()
        await wait_until(lambda: producer.advanced == ["p1"])
        assert producer.outcomes == [AdvanceOutcome(acked=1, failed=0)]
        assert sub.items == [{"part": 1, "n": 1}, {"part": 2, "n": 1}]
    assert await record_rows(store) == [
        ("p1", "1", 0, {"part": 1, "n": 1}),
        ("p1", "1", 1, {"part": 2, "n": 1}),
    ]


async def test_out_of_order_resolve_still_advances_in_fanout_order(store: OutboxStore) -> None:
    """Scenario 27. Within one manager a subscriber resolves in broadcast order, so p2 and p3
    are owed to subscribers on other triggerers (one lane): p3 resolves, then p2 (nothing
    advanced), then p1: one batch [p1, p2, p3], in lane order."""
    triggerers = Triggerers(store)
    gate = Gate()
    try:
        triggerers.subscribe(trigger_id=1, gate=gate)
        triggerers.advancer.push({"n": 1}, "p1")
        await gate.arrived(1)
        await triggerers.record_elsewhere("2", ({"n": 2}, "p2"))
        await triggerers.record_elsewhere("3", ({"n": 3}, "p3"))
        for subscriber, payload, resolved in (("3", "p3", ["p3"]), ("2", "p2", ["p2", "p3"])):
            await triggerers.resolve_elsewhere(subscriber, payload)
            await wait_resolved(store, resolved)
            assert await triggerers.settle() == 0
            assert triggerers.advancer.batches == []
        gate.release()
        await wait_resolved(store, ["p1", "p2", "p3"])
        assert await triggerers.settle() == 3
        assert triggerers.advancer.batches == [["p1", "p2", "p3"]]
        assert triggerers.advancer.outcomes == [AdvanceOutcome(1, 0)] * 3
    finally:
        await triggerers.aclose()


async def test_late_subscriber_does_not_block_advance_of_earlier_event(
    store: OutboxStore,
) -> None:
    """Scenario 28."""
    producer = producer_of(({"n": 1}, "receipt-late"), gate=asyncio.Event())
    assert producer.gate is not None
    gate = Gate()
    async with SharedStreamManager(store) as manager:
        manager.subscribe(trigger_id=1, trigger=StreamTrigger(gate=gate))
        producer.gate.set()
        await gate.arrived(1)
        late = Background(manager.subscribe(trigger_id=2, trigger=StreamTrigger()))
        [owed] = stream_of(manager).outstanding.values()
        assert set(owed) == {"1"}
        assert [e["snapshot"] for e in await event_rows(store)] == [["1"]]
        gate.release()
        await wait_until(lambda: producer.advanced == ["receipt-late"])
        assert producer.outcomes == [AdvanceOutcome(1, 0)]
        await settle(manager)
        assert late.items == []


async def test_subscriber_unsubscribe_during_outstanding_event(store: OutboxStore) -> None:
    """Scenario 29. The leaving subscriber's iterator ends cleanly."""
    producer = producer_of(({"n": 1}, "receipt-unsub"))
    gate = Gate()
    async with SharedStreamManager(store) as manager:
        Background(manager.subscribe(trigger_id=1, trigger=StreamTrigger()))
        staying = manager.subscribe(trigger_id=2, trigger=StreamTrigger(gate=gate))
        await gate.arrived(1)
        await settle(manager)
        assert producer.advanced == []
        await manager.unsubscribe(2, KEY)
        assert [e async for e in staying] == []
        await wait_until(lambda: producer.advanced == ["receipt-unsub"])
        assert producer.outcomes == [AdvanceOutcome(acked=2, failed=0)]


async def test_unsubscribe_with_unconfirmed_seq_waits_for_confirmation(
    store: OutboxStore,
) -> None:
    """Scenario 30. S1 yields a trigger event for p1 and unsubscribes while still on p1: here
    the unsubscribe itself commits that trigger event with S1's ``acked`` (there is no separate
    confirmation to wait for), and S1's iterator yields it, then ends. Once S2 moves past p1,
    p1 advances with (acked=2, failed=0)."""
    producer = producer_of(({"n": 1}, "p1"))
    hold = Gate()

    async def script(trigger: ScriptedTrigger, raw: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for event in raw:
            yield TriggerEvent(event)
            await hold.hold(event)

    gate2 = Gate()
    async with SharedStreamManager(store) as manager:
        leaving = manager.subscribe(trigger_id=1, trigger=ScriptedTrigger(script))
        s2 = Background(manager.subscribe(trigger_id=2, trigger=StreamTrigger(gate=gate2)))
        await hold.arrived(1)
        await gate2.arrived(1)
        await manager.unsubscribe(1, KEY)
        assert [e.payload async for e in leaving] == [{"n": 1}]
        await settle(manager)
        assert producer.advanced == []
        assert len(stream_of(manager).outstanding) == 1
        gate2.release()
        await wait_until(lambda: producer.advanced == ["p1"])
        assert producer.outcomes == [AdvanceOutcome(acked=2, failed=0)]
        assert s2.items == [{"n": 1}]
    assert sorted(r[1] for r in await record_rows(store)) == ["1", "2"]


@pytest.mark.parametrize("how", ["resume", "unsubscribe"])
async def test_outcome_classification(store: OutboxStore, how: str) -> None:
    """Scenario 31."""
    producer = producer_of(({"n": 1}, "receipt-outcome"))
    gate = Gate()
    async with SharedStreamManager(store) as manager:
        Background(manager.subscribe(trigger_id=1, trigger=StreamTrigger()))
        manager.subscribe(trigger_id=2, trigger=StreamTrigger(gate=gate))
        await gate.arrived(1)
        if how == "resume":
            gate.release()
        else:
            await manager.unsubscribe(2, KEY)
        await wait_until(lambda: producer.advanced == ["receipt-outcome"])
        [outcome] = producer.outcomes
        assert outcome == AdvanceOutcome(acked=2, failed=0)
        assert outcome.is_clean
        assert outcome.acked + outcome.failed == 2


# -- 3.4 Ack timeout --------------------------------------------------------------------------


async def test_ack_timeout_force_fails_slow_subscriber_only(store: OutboxStore) -> None:
    """Scenario 32."""
    producer = producer_of(({"n": 1}, "receipt-timeout"))
    clock = FakeClock()
    gate = Gate()
    async with SharedStreamManager(store, ack_timeout=0.1, clock=clock) as manager:
        fast = Background(manager.subscribe(trigger_id=1, trigger=StreamTrigger()))
        slow = Background(manager.subscribe(trigger_id=2, trigger=StreamTrigger(gate=gate)))
        await gate.arrived(1)
        await wait_until(lambda: fast.items == [{"n": 1}])
        clock.now = 0.2
        await wait_until(lambda: subscriber_of(manager, 2).failed)
        [item] = subscriber_of(manager, 2).raw.items
        assert isinstance(item, _Failure) and isinstance(item.error, AckTimeout)
        assert len(subscriber_of(manager, 1).raw) == 0
        assert fast.error is None and not subscriber_of(manager, 1).failed
        await wait_until(lambda: producer.advanced == ["receipt-timeout"])
        gate.release()
        await slow.finished()
        assert isinstance(slow.error, AckTimeout)
        assert slow.items == []
        assert fast.error is None
    assert [(s, st, r) for _, s, st, r in await delivery_rows(store)] == [
        ("1", "acked", None),
        ("2", "failed", "ack timeout"),
    ]


async def test_ack_timeout_at_cap_boundary_does_not_timeout(store: OutboxStore) -> None:
    """Scenario 33: 0.099 s after broadcast with a 0.1 s timeout (several timeout passes)."""
    producer = producer_of(({"n": 1}, "receipt-boundary"))
    clock = FakeClock()
    gate = Gate()
    async with SharedStreamManager(store, ack_timeout=0.1, clock=clock) as manager:
        sub = Background(manager.subscribe(trigger_id=1, trigger=StreamTrigger(gate=gate)))
        await gate.arrived(1)
        clock.now = 0.099
        await clock.passes(3)
        assert len(subscriber_of(manager, 1).raw) == 0
        assert not subscriber_of(manager, 1).failed
        await settle(manager)
        assert producer.advanced == []
        gate.release()
        await wait_until(lambda: producer.advanced == ["receipt-boundary"])
        assert producer.outcomes == [AdvanceOutcome(1, 0)]
        assert sub.items == [{"n": 1}] and sub.error is None


async def test_ack_timeout_exactly_at_timeout_force_fails(store: OutboxStore) -> None:
    """Scenario 34: the boundary is inclusive."""
    producer = producer_of(({"n": 1}, "receipt-exact"))
    clock = FakeClock()
    gate = Gate()
    async with SharedStreamManager(store, ack_timeout=0.1, clock=clock) as manager:
        sub = Background(manager.subscribe(trigger_id=1, trigger=StreamTrigger(gate=gate)))
        await gate.arrived(1)
        clock.now = 0.1
        await wait_until(lambda: subscriber_of(manager, 1).failed)
        [item] = subscriber_of(manager, 1).raw.items
        assert isinstance(item, _Failure) and isinstance(item.error, AckTimeout)
        await wait_until(lambda: producer.advanced == ["receipt-exact"])
        assert producer.outcomes == [AdvanceOutcome(0, 1)]
        gate.release()
        await sub.finished()
        assert isinstance(sub.error, AckTimeout)


@pytest.mark.parametrize(("ack_timeout", "cadence"), [(0.05, 0.01), (0.2, 0.02)])
async def test_ack_timeout_cadence_floor(
    store: OutboxStore, monkeypatch: pytest.MonkeyPatch, ack_timeout: float, cadence: float
) -> None:
    """Scenario 35: the cadence is max(0.01, timeout / 10); the manager's timeout task asks for
    it with its ack timeout (instead of patching ``asyncio.sleep``)."""
    assert timeout_cadence(ack_timeout) == pytest.approx(cadence)
    asked: list[float] = []

    def spy(ack_timeout: float) -> float:
        asked.append(ack_timeout)
        return timeout_cadence(ack_timeout)

    monkeypatch.setattr("outbox.group.timeout_cadence", spy)
    producer_of()
    async with SharedStreamManager(store, ack_timeout=ack_timeout) as manager:
        manager.subscribe(trigger_id=1, trigger=StreamTrigger())
        await wait_until(lambda: asked == [ack_timeout])


async def test_outcome_counts_timeout_as_failed(store: OutboxStore) -> None:
    """Scenario 36."""
    producer = producer_of(({"n": 1}, "receipt-to"))
    clock = FakeClock()
    gate = Gate()
    async with SharedStreamManager(store, ack_timeout=0.1, clock=clock) as manager:
        fast = Background(manager.subscribe(trigger_id=1, trigger=StreamTrigger()))
        manager.subscribe(trigger_id=2, trigger=StreamTrigger(gate=gate))
        await gate.arrived(1)
        await wait_until(lambda: fast.items == [{"n": 1}])
        clock.now = 0.2
        await wait_until(lambda: producer.advanced == ["receipt-to"])
        assert producer.outcomes == [AdvanceOutcome(acked=1, failed=1)]
        assert not producer.outcomes[0].is_clean


def _yield_then_hold(hold: Gate) -> Any:
    async def script(trigger: ScriptedTrigger, raw: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for event in raw:
            yield TriggerEvent(event)
            await hold.hold(event)

    return script


@pytest.mark.parametrize("at", [0.099, 0.2])
async def test_unconfirmed_persist_confirm_timing_around_timeout(
    store: OutboxStore, at: float
) -> None:
    """Scenario 37: the subscriber yielded a trigger event for p1 but has not moved on
    ("unconfirmed") when the clock reaches ``at``; then it moves on ("confirms")."""
    producer = producer_of(({"n": 1}, "p1"))
    clock = FakeClock()
    hold = Gate()
    async with SharedStreamManager(store, ack_timeout=0.1, clock=clock) as manager:
        sub = Background(
            manager.subscribe(trigger_id=1, trigger=ScriptedTrigger(_yield_then_hold(hold)))
        )
        await hold.arrived(1)
        clock.now = at
        if at < 0.1:
            await clock.passes(3)
            await settle(manager)
            assert producer.advanced == [] and producer.outcomes == []
            assert len(stream_of(manager).outstanding) == 1
            hold.release()
            await wait_until(lambda: producer.advanced == ["p1"])
            assert producer.outcomes == [AdvanceOutcome(acked=1, failed=0)]
            await wait_until(lambda: sub.items == [{"n": 1}])
            assert [r[3] for r in await record_rows(store)] == [{"n": 1}]
        else:
            await wait_until(lambda: producer.advanced == ["p1"])
            assert producer.outcomes == [AdvanceOutcome(acked=0, failed=1)]
            assert stream_of(manager).outstanding == {}
            hold.release()  # the late "confirmation"
            await sub.finished()
            assert isinstance(sub.error, AckTimeout)
            await settle(manager)
            assert producer.advanced == ["p1"]
            assert producer.outcomes == [AdvanceOutcome(acked=0, failed=1)]
            assert sub.items == []
            assert await record_rows(store) == []


async def test_unconfirmed_persist_at_timeout_fails_subscriber(store: OutboxStore) -> None:
    """Scenario 38."""
    producer = producer_of(({"n": 1}, "p1"))
    clock = FakeClock()
    hold = Gate()
    async with SharedStreamManager(store, ack_timeout=0.1, clock=clock) as manager:
        sub = Background(
            manager.subscribe(trigger_id=1, trigger=ScriptedTrigger(_yield_then_hold(hold)))
        )
        await hold.arrived(1)
        clock.now = 0.1
        await wait_until(lambda: producer.advanced == ["p1"])
        assert producer.outcomes == [AdvanceOutcome(acked=0, failed=1)]
        hold.release()
        await sub.finished()
        assert isinstance(sub.error, AckTimeout)
        assert sub.items == []
    assert await record_rows(store) == []


# -- 3.5 Overflow in ack mode ------------------------------------------------------------------


async def test_ack_mode_queue_full_during_fanout_does_not_break_iteration(
    store: OutboxStore,
) -> None:
    """Scenario 39 (``overflow="fail"``, bound 1). Instead of pre-filling the queue, subscriber 1
    holds event 0 while event 1 fills its queue; the burst overflows it. Subscriber 2 (after it
    in the snapshot) still gets the burst, and every event advances with (acked=1, failed=1)."""
    producer = producer_of()
    gate = Gate()
    async with SharedStreamManager(store, max_subscriber_queue=1, overflow="fail") as manager:
        s1 = Background(manager.subscribe(trigger_id=1, trigger=StreamTrigger(gate=gate)))
        s2 = Background(manager.subscribe(trigger_id=2, trigger=StreamTrigger()))
        producer.push({"n": 0}, "receipt-0")
        await gate.arrived(1)
        await wait_until(lambda: len(s2.items) == 1)
        producer.push({"n": 1}, "receipt-1")
        await wait_until(lambda: len(s2.items) == 2)
        assert len(subscriber_of(manager, 1).raw) == 1
        producer.push({"msg": "burst"}, "receipt-burst")
        await wait_until(lambda: s2.items[-1:] == [{"msg": "burst"}])
        gate.release()
        await s1.finished()
        assert isinstance(s1.error, SubscriberOverflow)
        assert "exceeded maxsize=1" in str(s1.error)
        await wait_until(lambda: len(producer.advanced) == 3)
        assert producer.advanced == ["receipt-0", "receipt-1", "receipt-burst"]
        assert producer.outcomes == [AdvanceOutcome(acked=1, failed=1)] * 3
        assert s2.error is None


async def test_force_fail_clears_subscriber_from_all_outstanding_entries(
    store: OutboxStore,
) -> None:
    """Scenario 40 (``overflow="fail"``, bound 1, default 300 s timeout): the dead subscriber
    holds p1 with p2 queued; p3 overflows it, which fails it in p1 and p2 at once."""
    producer = producer_of(({"n": 1}, "p1"))
    gate = Gate()
    async with SharedStreamManager(store, max_subscriber_queue=1, overflow="fail") as manager:
        manager.subscribe(trigger_id=1, trigger=StreamTrigger(gate=gate))
        live = Background(manager.subscribe(trigger_id=2, trigger=StreamTrigger()))
        await gate.arrived(1)
        producer.push({"n": 2}, "p2")
        await wait_until(lambda: len(live.items) == 2)
        assert len(subscriber_of(manager, 1).raw) == 1
        await settle(manager)
        assert producer.advanced == []
        producer.push({"n": 3}, "p3")
        await wait_until(lambda: len(producer.advanced) == 3)
        assert producer.advanced == ["p1", "p2", "p3"]
        assert producer.outcomes == [AdvanceOutcome(acked=1, failed=1)] * 3
        assert live.items == [{"n": 1}, {"n": 2}, {"n": 3}]
    reasons = {r for _, s, _, r in await delivery_rows(store) if s == "1"}
    assert reasons == {"subscriber queue overflow"}


# -- 3.6 Zero-subscriber events -------------------------------------------------------------


@pytest.mark.parametrize(
    "events",
    [["p1", "p2", "p3"], ["a1", "b1", "a2", "b2"]],
    ids=["one-lane", "two-lanes"],
)
async def test_empty_snapshot_advances_in_fanout_order(
    store: OutboxStore, events: list[str]
) -> None:
    """Scenario 41 [V4]: outcomes are (0, 0, 0) and NOT clean. As in Airflow the only
    subscriber is removed from the group while the poll keeps running (white-box: Airflow calls
    ``group.unsubscribe(1)``; here the subscriber is detached from the stream)."""
    lanes = events[0] != "p1"
    producer = producer_of(lane_for=(lambda p: p[0]) if lanes else None)
    async with SharedStreamManager(store) as manager:
        manager.subscribe(trigger_id=1, trigger=StreamTrigger())
        await wait_until(
            lambda: KEY in manager._streams and stream_of(manager).producer is not None
        )
        stream = stream_of(manager)
        stream.detach(stream.subscribers["1"], classify=True)
        for payload in events:
            producer.push({"p": payload}, payload)
        await wait_until(lambda: len(producer.advanced) == len(events))
        if lanes:
            assert [p for p in producer.advanced if p[0] == "a"] == ["a1", "a2"]
            assert [p for p in producer.advanced if p[0] == "b"] == ["b1", "b2"]
        else:
            assert producer.advanced == events
        assert all(o == AdvanceOutcome(0, 0) for o in producer.outcomes)
        assert not any(o.is_clean for o in producer.outcomes)
    assert [e["snapshot"] for e in await event_rows(store)] == [[]] * len(events)
    assert await delivery_rows(store) == []


# -- 3.8 Reject -----------------------------------------------------------------------------


async def test_reject_counts_as_rejected_not_acked_or_failed(store: OutboxStore) -> None:
    """Scenario 49."""
    producer = producer_of(({"reject": True}, "receipt-reject"))
    async with SharedStreamManager(store) as manager:
        sub = manager.subscribe(trigger_id=1, trigger=StreamTrigger())
        await wait_until(lambda: producer.advanced == ["receipt-reject"])
        assert producer.outcomes == [AdvanceOutcome(acked=0, failed=0, rejected=1)]
        await manager.unsubscribe(1, KEY)
        assert [e async for e in sub] == []
    assert await record_rows(store) == []
    assert [(s, st) for _, s, st, _ in await delivery_rows(store)] == [("1", "rejected")]


async def test_reject_resolves_immediately_without_persist_gate(store: OutboxStore) -> None:
    """Scenario 50: the filter rejects and then stays on the event; the reject has committed
    (and advanced) anyway, with the clock pinned at 0."""
    producer = producer_of(({"n": 1}, "receipt-now"))
    hold = Gate()

    async def script(trigger: ScriptedTrigger, raw: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for event in raw:
            reject_shared_stream_event()
            await hold.hold(event)
            yield TriggerEvent(event)  # pragma: no cover - never released

    clock = FakeClock(0.0)
    async with SharedStreamManager(store, ack_timeout=0.1, clock=clock) as manager:
        manager.subscribe(trigger_id=1, trigger=ScriptedTrigger(script))
        await hold.arrived(1)
        await wait_until(lambda: producer.advanced == ["receipt-now"])
        assert producer.outcomes == [AdvanceOutcome(0, 0, 1)]
        assert subscriber_of(manager, 1).window is not None  # still on the event


async def test_fan_out_mixed_ack_reject_fail_outcome(store: OutboxStore) -> None:
    """Scenario 51: S1 consumes, S2 rejects (from its filter; Airflow calls the group's
    ``_reject_pending_event``), S3 stalls past the timeout."""
    producer = producer_of(({"n": 1}, "receipt-mixed"))
    clock = FakeClock()
    hold2, hold3 = Gate(), Gate()

    async def rejecting(trigger: ScriptedTrigger, raw: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for event in raw:
            await hold2.hold(event)
            reject_shared_stream_event()
            yield TriggerEvent(event)

    async with SharedStreamManager(store, ack_timeout=0.1, clock=clock) as manager:
        s1 = Background(manager.subscribe(trigger_id=1, trigger=StreamTrigger()))
        manager.subscribe(trigger_id=2, trigger=ScriptedTrigger(rejecting))
        manager.subscribe(trigger_id=3, trigger=StreamTrigger(gate=hold3))
        await hold2.arrived(1)
        await hold3.arrived(1)
        await wait_until(lambda: s1.items == [{"n": 1}])
        hold2.release()
        await wait_until(lambda: len(stream_of(manager).outstanding[_only(manager)]) == 1)
        clock.now = 0.2
        await wait_until(lambda: producer.advanced == ["receipt-mixed"])
        [outcome] = producer.outcomes
        assert outcome == AdvanceOutcome(acked=1, failed=1, rejected=1)
        assert outcome.acked + outcome.failed + outcome.rejected == 3
    assert [(s, st) for _, s, st, _ in await delivery_rows(store)] == [
        ("1", "acked"),
        ("2", "rejected"),
        ("3", "failed"),
    ]
    assert [r[1] for r in await record_rows(store)] == ["1"]


def _only(manager: SharedStreamManager) -> int:
    [event_id] = stream_of(manager).outstanding
    return event_id


async def test_reject_does_not_block_later_event_in_same_lane(store: OutboxStore) -> None:
    """Scenario 52."""
    producer = producer_of(({"reject": True}, "receipt-a"), ({"n": 2}, "receipt-b"))
    async with SharedStreamManager(store) as manager:
        sub = manager.subscribe(trigger_id=1, trigger=StreamTrigger())
        assert await collect(sub, 1) == [{"n": 2}]
        await wait_until(lambda: len(producer.advanced) == 2)
        assert producer.advanced == ["receipt-a", "receipt-b"]
        assert producer.outcomes == [AdvanceOutcome(0, 0, 1), AdvanceOutcome(1, 0, 0)]


async def test_reject_on_fast_path_is_no_op_and_event_still_fires(
    store: OutboxStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario 53: the fast-path filter rejects, then yields; the event is stored and fires."""

    async def source(kwargs: dict[str, Any], invocation: int) -> AsyncIterator[Any]:
        yield {"reject": True}
        await asyncio.Event().wait()

    FastTrigger.SOURCES["fast"] = source
    caplog.set_level(logging.WARNING, logger="outbox")
    async with SharedStreamManager(store) as manager:
        stream = manager.subscribe(trigger_id=1, trigger=FastTrigger())
        assert await collect(stream, 1) == [{"reject": True}]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "reject_shared_stream_event called outside an ack-mode binding window; ignored"
    ]
    assert await record_rows(store) == [(None, "1", 0, {"reject": True})]


async def test_reject_outside_any_window_is_no_op(caplog: pytest.LogCaptureFixture) -> None:
    """Scenario 54."""
    caplog.set_level(logging.WARNING, logger="outbox")
    reject_shared_stream_event()
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            logging.WARNING,
            "reject_shared_stream_event called outside an ack-mode binding window; ignored",
        )
    ]


async def test_reject_from_another_task_is_no_op(
    store: OutboxStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Rule 21: the filter must reject in the task that drives its stream. A task it spawns
    inside the window (and so inherits its context) gets the warning, and the event is
    acked with the trigger event the filter yields."""
    producer = producer_of(({"n": 1}, "receipt-t"))

    async def script(trigger: ScriptedTrigger, raw: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for event in raw:
            await asyncio.get_running_loop().create_task(_reject_soon())
            yield TriggerEvent(event)

    async def _reject_soon() -> None:
        reject_shared_stream_event()

    caplog.set_level(logging.WARNING, logger="outbox")
    async with SharedStreamManager(store) as manager:
        sub = Background(manager.subscribe(trigger_id=1, trigger=ScriptedTrigger(script)))
        await wait_until(lambda: producer.advanced == ["receipt-t"])
        assert producer.outcomes == [AdvanceOutcome(1, 0, 0)]
        await wait_until(lambda: sub.items == [{"n": 1}])
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "reject_shared_stream_event called outside an ack-mode binding window; ignored"
    ]


async def test_reject_after_the_stream_was_closed_is_no_op(
    store: OutboxStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Rule 16: a filter that closes its stream while on an event (``break`` inside
    ``aclosing``) leaves the window open, but a reject after that only warns; the event stays
    pending (for unsubscribe or the ack timeout)."""
    producer_of(({"n": 1}, "receipt-c"))
    rejected = asyncio.Event()

    async def script(trigger: ScriptedTrigger, raw: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async with contextlib.aclosing(raw) as events:  # type: ignore[type-var]
            async for _ in events:
                break
        reject_shared_stream_event()
        rejected.set()
        return
        yield  # pragma: no cover - an async generator that yields nothing

    caplog.set_level(logging.WARNING, logger="outbox")
    async with SharedStreamManager(store, clock=FakeClock()) as manager:
        Background(manager.subscribe(trigger_id=1, trigger=ScriptedTrigger(script)))
        await asyncio.wait_for(rejected.wait(), 10)
        await settle(manager)
        assert subscriber_of(manager, 1).window is not None  # still open, never resolved
        assert await delivery_rows(store) == []
    assert "reject_shared_stream_event called outside an ack-mode binding window; ignored" in [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
    ]


async def test_reject_then_yield_real_event_fires_but_does_not_bind(
    store: OutboxStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario 55. Deviation by design: a trigger event yielded after the reject is NOT
    stored (and so never yielded by the iterator); a warning says so. The event advances as
    rejected (0, 0, 1)."""
    producer = producer_of(({"reject": True}, "receipt-x"))

    async def script(trigger: ScriptedTrigger, raw: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for event in raw:
            reject_shared_stream_event()
            yield TriggerEvent(event)

    caplog.set_level(logging.WARNING, logger="outbox")
    async with SharedStreamManager(store) as manager:
        sub = Background(manager.subscribe(trigger_id=1, trigger=ScriptedTrigger(script)))
        await wait_until(lambda: producer.advanced == ["receipt-x"])
        assert producer.outcomes == [AdvanceOutcome(0, 0, 1)]
        await settle(manager)
        assert sub.items == []
    assert await record_rows(store) == []
    assert any(
        "yielded after reject_shared_stream_event; not stored" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.parametrize(
    ("outcome", "clean"),
    [
        (AdvanceOutcome(2, 0, 0), True),
        (AdvanceOutcome(2, 0, 1), False),
        (AdvanceOutcome(2, 1, 0), False),
        (AdvanceOutcome(0, 0, 0), False),
        (AdvanceOutcome(0, 0), False),
    ],
)
def test_is_clean_requires_no_reject_and_no_fail(outcome: AdvanceOutcome, clean: bool) -> None:
    """Scenario 56 [V4]: a zero-subscriber outcome is not clean."""
    assert outcome.is_clean is clean
    assert AdvanceOutcome(acked=1, failed=0) == AdvanceOutcome(1, 0, 0)

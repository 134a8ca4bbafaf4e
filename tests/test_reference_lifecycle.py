"""Airflow's shared-stream reference scenarios 1-22 (catalogue sections 3.1 and 3.2), ported
to ``SharedStreamManager`` on a real Postgres.

Section 3.1 is about the fast path in Airflow; where the lifecycle behaviour is the same in ack
mode, the test runs in both modes (``mode`` parameter). Differences by design (DESIGN.md): the
subscriber iterator yields stored ``TriggerEvent``s, unsubscribe / ``stop_all`` end it cleanly,
and overflow fails a subscriber only with ``overflow="fail"`` (the default pauses the producer).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa

from outbox import (
    BaseEventTrigger,
    OutboxStore,
    SharedStreamManager,
    SharedStreamProducer,
    StreamTerminated,
    SubscriberOverflow,
    TriggerEvent,
)
from outbox.subscriber import Failure as _Failure
from outbox.triggers import is_ack_mode
from tests.streams import (
    Background,
    FastTrigger,
    Gate,
    RecordingProducer,
    StreamTrigger,
    collect,
    delivery_rows,
    event_rows,
    record_rows,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Hashable

# Marked here (not only by conftest's collection hook) so that parametrized tests keep their
# parameters alongside anyio's backend parameter.
pytestmark = pytest.mark.anyio

MODES = ["fast", "ack"]


async def forever() -> None:
    await asyncio.Event().wait()


class SourceProducer(RecordingProducer):
    """An ack-mode producer around a fast-path style source: yields ``(raw, "<poll>-<n>")``."""

    def __init__(
        self,
        source: Callable[[dict[str, Any], int], AsyncIterator[Any]],
        kwargs: dict[str, Any],
        invocation: int,
    ) -> None:
        super().__init__([])
        self.source = source
        self.kwargs = kwargs
        self.invocation = invocation

    async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
        self.opened += 1
        n = 0
        async for raw in self.source(self.kwargs, self.invocation):
            n += 1
            yield raw, f"{self.invocation}-{n}"


class Env:
    """One source behind either a fast-path trigger or an ack-mode trigger (fresh producer per
    poll), so a lifecycle scenario runs unchanged in both modes."""

    def __init__(
        self,
        mode: str,
        source: Callable[[dict[str, Any], int], AsyncIterator[Any]],
        name: str = "q",
    ) -> None:
        self.mode = mode
        self.name = name
        self.producers: list[SourceProducer] = []
        if mode == "fast":
            FastTrigger.SOURCES[name] = source
        else:

            def factory(kwargs: dict[str, Any]) -> SharedStreamProducer:
                producer = SourceProducer(source, kwargs, len(self.producers))
                self.producers.append(producer)
                return producer

            StreamTrigger.FACTORIES[name] = factory

    def trigger(self, *, region: str | None = None, gate: Gate | None = None) -> BaseEventTrigger:
        if self.mode == "fast":
            return FastTrigger(name=self.name, region=region, gate=gate)
        return StreamTrigger(name=self.name, region=region, gate=gate)

    @property
    def key(self) -> Hashable:
        return ("fast" if self.mode == "fast" else "queue", self.name)

    @property
    def invocations(self) -> list[int]:
        if self.mode == "fast":
            return list(FastTrigger.invocations)
        return [p.invocation for p in self.producers]


async def next_error(stream: AsyncIterator[TriggerEvent]) -> BaseException:
    """Drain ``stream`` until it raises; return the exception."""
    try:
        async for _ in stream:
            pass
    except Exception as exc:
        return exc
    raise AssertionError("the stream ended without raising")


# -- 3.1 Group lifecycle and fast path ------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_single_subscriber_receives_broadcast_events(store: OutboxStore, mode: str) -> None:
    """Scenario 1."""

    async def source(kwargs: dict[str, Any], invocation: int) -> AsyncIterator[Any]:
        yield {"region": "us"}
        yield {"region": "eu"}
        await forever()

    env = Env(mode, source)
    async with SharedStreamManager(store) as manager:
        stream = manager.subscribe(trigger_id=1, trigger=env.trigger(region="us"))
        assert await collect(stream, 1) == [{"region": "us"}]
    stored = await record_rows(store)
    if mode == "fast":
        assert stored == [(None, "1", 0, {"region": "us"})]
    else:
        assert stored == [("0-1", "1", 0, {"region": "us"})]


@pytest.mark.parametrize("mode", MODES)
async def test_two_subscribers_share_one_poll_and_filter_independently(
    store: OutboxStore, mode: str
) -> None:
    """Scenario 2."""

    async def source(kwargs: dict[str, Any], invocation: int) -> AsyncIterator[Any]:
        for region in ("us", "eu", "us"):
            yield {"region": region}
        await forever()

    env = Env(mode, source)
    async with SharedStreamManager(store) as manager:
        us = manager.subscribe(trigger_id=1, trigger=env.trigger(region="us"))
        eu = manager.subscribe(trigger_id=2, trigger=env.trigger(region="eu"))
        assert len(manager._streams) == 1
        got_us, got_eu = await asyncio.gather(collect(us, 2), collect(eu, 1))
        assert [e["region"] for e in got_us] == ["us", "us"]
        assert [e["region"] for e in got_eu] == ["eu"]
        assert env.invocations == [0]
        if mode == "ack":
            await wait_until(lambda: len(env.producers[0].advanced) == 3)
            assert env.producers[0].advanced == ["0-1", "0-2", "0-3"]


@pytest.mark.parametrize("mode", MODES)
async def test_group_is_torn_down_when_last_subscriber_leaves(
    store: OutboxStore, mode: str
) -> None:
    """Scenario 3. Also: the subscriber's iterator ends cleanly (no injected failure)."""

    async def source(kwargs: dict[str, Any], invocation: int) -> AsyncIterator[Any]:
        await forever()
        yield None  # pragma: no cover

    env = Env(mode, source)
    async with SharedStreamManager(store) as manager:
        stream = manager.subscribe(trigger_id=1, trigger=env.trigger())
        assert env.key in manager._streams
        if mode == "ack":
            await wait_until(lambda: len(env.producers) == 1)
        poll = manager._streams[env.key].poll_task
        await manager.unsubscribe(1, env.key)
        assert env.key not in manager._streams
        assert [e async for e in stream] == []
        assert poll is not None and poll.done()
        if mode == "ack":
            assert env.producers[0].aclose_calls == 1


@pytest.mark.parametrize("mode", MODES)
async def test_independent_keys_use_independent_groups(store: OutboxStore, mode: str) -> None:
    """Scenario 4."""

    async def source(kwargs: dict[str, Any], invocation: int) -> AsyncIterator[Any]:
        yield {"from": kwargs["name"]}
        await forever()

    a, b = Env(mode, source, name="a"), Env(mode, source, name="b")
    async with SharedStreamManager(store) as manager:
        sa_ = manager.subscribe(trigger_id=1, trigger=a.trigger())
        sb = manager.subscribe(trigger_id=2, trigger=b.trigger())
        assert set(manager._streams) == {a.key, b.key}
        assert await collect(sa_, 1) == [{"from": "a"}]
        assert await collect(sb, 1) == [{"from": "b"}]
    async with store.engine.connect() as conn:
        keys = (await conn.execute(sa.text("SELECT key FROM outbox_stream ORDER BY key"))).all()
    assert len(keys) == 2


@pytest.mark.parametrize("mode", MODES)
async def test_poll_failure_propagates_to_subscribers_and_evicts_group(
    store: OutboxStore, mode: str
) -> None:
    """Scenario 5."""

    async def source(kwargs: dict[str, Any], invocation: int) -> AsyncIterator[Any]:
        raise RuntimeError("boom")
        yield None  # pragma: no cover

    env = Env(mode, source)
    async with SharedStreamManager(store) as manager:
        stream = manager.subscribe(trigger_id=1, trigger=env.trigger())
        try:
            await stream.__anext__()
        except RuntimeError as exc:
            assert str(exc) == "boom"
            assert env.key not in manager._streams  # already gone when the subscriber sees it
        else:
            pytest.fail("the subscriber did not see the poll failure")
        if mode == "ack":
            await wait_until(lambda: env.producers[0].aclose_calls == 1)


async def test_subscribe_rejects_none_key(store: OutboxStore) -> None:
    """Scenario 6: an explicit key=None falls back to shared_stream_key(); a trigger whose key is
    None is refused."""

    class Unshared(FastTrigger):
        def shared_stream_key(self) -> Hashable:
            return None

    async with SharedStreamManager(store) as manager:
        with pytest.raises(ValueError, match="must not be None"):
            manager.subscribe(trigger_id=1, trigger=Unshared(), key=None)
        assert manager._streams == {}


@pytest.mark.parametrize("mode", MODES)
async def test_double_subscribe_same_id_is_rejected(store: OutboxStore, mode: str) -> None:
    """Scenario 7."""

    async def source(kwargs: dict[str, Any], invocation: int) -> AsyncIterator[Any]:
        await forever()
        yield None  # pragma: no cover

    env = Env(mode, source)
    async with SharedStreamManager(store) as manager:
        manager.subscribe(trigger_id=1, trigger=env.trigger())
        with pytest.raises(RuntimeError, match="already subscribed"):
            manager.subscribe(trigger_id=1, trigger=env.trigger())
        assert list(manager._streams[env.key].subscribers) == ["1"]


@pytest.mark.parametrize("mode", MODES)
async def test_stop_all_clears_every_group(store: OutboxStore, mode: str) -> None:
    """Scenario 8. Also: each iterator ends cleanly, each producer is closed once."""

    async def source(kwargs: dict[str, Any], invocation: int) -> AsyncIterator[Any]:
        await forever()
        yield None  # pragma: no cover

    a, b = Env(mode, source, name="a"), Env(mode, source, name="b")
    manager = SharedStreamManager(store)
    sa_ = manager.subscribe(trigger_id=1, trigger=a.trigger())
    sb = manager.subscribe(trigger_id=2, trigger=b.trigger())
    assert len(manager._streams) == 2
    if mode == "ack":
        await wait_until(lambda: len(a.producers) == len(b.producers) == 1)
    await manager.stop_all()
    assert manager._streams == {}
    assert [e async for e in sa_] == [] and [e async for e in sb] == []
    if mode == "ack":
        assert a.producers[0].aclose_calls == b.producers[0].aclose_calls == 1


@pytest.mark.parametrize("mode", MODES)
async def test_late_subscriber_after_poll_failure_gets_fresh_group(
    store: OutboxStore, mode: str
) -> None:
    """Scenario 9."""

    async def source(kwargs: dict[str, Any], invocation: int) -> AsyncIterator[Any]:
        if invocation == 0:
            raise RuntimeError("boom")
        yield {"region": "us"}
        await forever()

    env = Env(mode, source)
    async with SharedStreamManager(store) as manager:
        first = manager.subscribe(trigger_id=1, trigger=env.trigger())
        with pytest.raises(RuntimeError, match="boom"):
            await first.__anext__()
        await manager.unsubscribe(1, env.key)
        second = manager.subscribe(trigger_id=2, trigger=env.trigger())
        assert await collect(second, 1) == [{"region": "us"}]
        assert env.invocations == [0, 1]
        if mode == "ack":
            await wait_until(lambda: env.producers[1].advanced == ["1-1"])
            assert env.producers[0].advanced == []


@pytest.mark.parametrize("mode", MODES)
async def test_late_subscriber_during_poll_failure_window_does_not_attach_to_dead_group(
    store: OutboxStore, mode: str
) -> None:
    """Scenario 10."""

    async def source(kwargs: dict[str, Any], invocation: int) -> AsyncIterator[Any]:
        if invocation == 0:
            raise RuntimeError("boom")
        yield {"region": "fresh"}
        await forever()

    env = Env(mode, source)
    async with SharedStreamManager(store) as manager:
        first = manager.subscribe(trigger_id=1, trigger=env.trigger())
        dead = manager._streams[env.key].poll_task
        assert dead is not None
        await asyncio.wait({dead})
        assert env.key not in manager._streams
        second = manager.subscribe(trigger_id=2, trigger=env.trigger())
        assert await collect(second, 1) == [{"region": "fresh"}]
        with pytest.raises(RuntimeError, match="boom"):
            await first.__anext__()
        assert env.invocations == [0, 1]


@pytest.mark.parametrize("mode", MODES)
async def test_resubscribe_during_last_unsubscribe_creates_fresh_group(
    store: OutboxStore, mode: str
) -> None:
    """Scenario 11: the old stream's teardown is held open (its source's ``finally`` waits), so
    the new subscriber provably arrives while ``stop()`` is awaited."""
    closing = asyncio.Event()
    release = asyncio.Event()

    async def source(kwargs: dict[str, Any], invocation: int) -> AsyncIterator[Any]:
        try:
            yield {"n": invocation}
            await forever()
        finally:
            if invocation == 0:
                closing.set()
                await release.wait()

    env = Env(mode, source)
    async with SharedStreamManager(store) as manager:
        first = manager.subscribe(trigger_id=1, trigger=env.trigger())
        assert await collect(first, 1) == [{"n": 0}]
        leaving = asyncio.create_task(manager.unsubscribe(1, env.key))
        await asyncio.wait_for(closing.wait(), 10)
        assert env.key not in manager._streams
        assert not leaving.done()
        second = manager.subscribe(trigger_id=2, trigger=env.trigger())
        assert await collect(second, 1) == [{"n": 1}]
        release.set()
        await asyncio.wait_for(leaving, 10)
        assert env.invocations == [0, 1]
        assert env.key in manager._streams
        if mode == "ack":
            assert env.producers[0].aclose_calls == 1
            assert env.producers[1].aclose_calls == 0


@pytest.mark.parametrize("mode", MODES)
async def test_open_shared_stream_returning_naturally_propagates_as_failure(
    store: OutboxStore, mode: str
) -> None:
    """Scenario 12."""

    async def source(kwargs: dict[str, Any], invocation: int) -> AsyncIterator[Any]:
        yield {"n": 1}

    env = Env(mode, source)
    async with SharedStreamManager(store) as manager:
        stream = manager.subscribe(trigger_id=1, trigger=env.trigger())
        with pytest.raises(StreamTerminated, match="expected to run for the lifetime of the group"):
            await collect(stream, 2)
        assert env.key not in manager._streams


async def test_slow_subscriber_overflow_fails_only_that_subscriber(store: OutboxStore) -> None:
    """Scenario 13 (``overflow="fail"``): the slow subscriber holds the first event, its queue
    (bound 2) overflows on the fourth."""

    async def source(kwargs: dict[str, Any], invocation: int) -> AsyncIterator[Any]:
        for i in range(5):
            yield {"i": i}
            await asyncio.sleep(0)
        await forever()

    FastTrigger.SOURCES["fast"] = source
    gate = Gate()
    async with SharedStreamManager(store, max_subscriber_queue=2, overflow="fail") as manager:
        slow = manager.subscribe(trigger_id=1, trigger=FastTrigger(gate=gate))
        fast = manager.subscribe(trigger_id=2, trigger=FastTrigger())
        got = await collect(fast, 5)
        assert [e["i"] for e in got] == [0, 1, 2, 3, 4]
        gate.release()
        error = await next_error(slow)
        assert isinstance(error, SubscriberOverflow)
        assert "exceeded maxsize=2" in str(error)
        key = ("fast", "fast")
        assert key in manager._streams
        assert manager._streams[key].subscribers["1"].failed
        assert not manager._streams[key].subscribers["2"].failed
    assert [r[1] for r in await record_rows(store)] == ["2"] * 5


async def test_slow_subscriber_pauses_the_stream_by_default(store: OutboxStore) -> None:
    """Scenario 13, default ``overflow="pause"`` (deviation by design): the producer is not
    pulled while the slow subscriber's queue is full; nobody fails, everyone gets everything."""
    pulled: list[int] = []

    async def source(kwargs: dict[str, Any], invocation: int) -> AsyncIterator[Any]:
        for i in range(5):
            pulled.append(i)
            yield {"i": i}
            await asyncio.sleep(0)
        await forever()

    FastTrigger.SOURCES["fast"] = source
    gate = Gate()
    async with SharedStreamManager(store, max_subscriber_queue=2) as manager:
        slow = Background(manager.subscribe(trigger_id=1, trigger=FastTrigger(gate=gate)))
        fast = Background(manager.subscribe(trigger_id=2, trigger=FastTrigger()))
        await wait_until(lambda: len(fast.items) == 3)
        # The slow subscriber holds event 0 with events 1 and 2 queued: the poll is paused.
        assert pulled == [0, 1, 2]
        await manager._writer.barrier()
        assert pulled == [0, 1, 2] and len(fast.items) == 3
        for count in range(1, 6):
            gate.release()
            await wait_until(lambda count=count: len(slow.items) == count)  # type: ignore[misc]
        await wait_until(lambda: len(fast.items) == 5)
        assert slow.items == fast.items == [{"i": i} for i in range(5)]
        assert slow.error is None and fast.error is None


async def test_concurrent_unsubscribes_tear_down_group_cleanly(store: OutboxStore) -> None:
    """Scenario 14 (ack mode: the drain and aclose run once)."""
    producer = RecordingProducer([({"n": 1}, "p1")])
    StreamTrigger.PRODUCERS["q"] = producer
    async with SharedStreamManager(store) as manager:
        streams = [manager.subscribe(trigger_id=i, trigger=StreamTrigger()) for i in range(8)]
        got = await asyncio.gather(*(collect(s, 1) for s in streams))
        assert got == [[{"n": 1}]] * 8
        poll = manager._streams[("queue", "q")].poll_task
        assert poll is not None
        await asyncio.gather(*(manager.unsubscribe(i, ("queue", "q")) for i in range(8)))
        assert manager._streams == {}
        assert poll.done() and poll.cancelled()
        assert producer.aclose_calls == 1
        assert producer.advanced == ["p1"]
        assert producer.outcomes[0].acked == 8


@pytest.mark.parametrize("mode", MODES)
async def test_stop_all_with_blocked_consumer_does_not_inject_failure_sentinel(
    store: OutboxStore, mode: str
) -> None:
    """Scenario 15. Deviation by design: no failure is injected, and the blocked consumer's
    iterator ends cleanly (Airflow leaves it blocked for the runner to cancel)."""

    async def source(kwargs: dict[str, Any], invocation: int) -> AsyncIterator[Any]:
        await forever()
        yield None  # pragma: no cover

    env = Env(mode, source)
    manager = SharedStreamManager(store)
    stream = manager.subscribe(trigger_id=1, trigger=env.trigger())
    consumer = asyncio.create_task(anext(stream, "ended"))
    poll = manager._streams[env.key].poll_task
    assert poll is not None
    await manager._writer.barrier()
    assert not consumer.done()
    await manager.stop_all()
    assert poll.cancelled()
    assert await asyncio.wait_for(consumer, 10) == "ended"


async def test_sibling_non_key_kwargs_diverge_first_subscriber_wins(store: OutboxStore) -> None:
    """Scenario 16. The first subscriber's kwargs are also what the stream row stores."""

    async def source(kwargs: dict[str, Any], invocation: int) -> AsyncIterator[Any]:
        yield {"region": kwargs["region"]}
        await forever()

    FastTrigger.SOURCES["fast"] = source
    async with SharedStreamManager(store) as manager:
        first = manager.subscribe(trigger_id=1, trigger=FastTrigger(region="us"))
        manager.subscribe(trigger_id=2, trigger=FastTrigger(region="eu"))
        assert await collect(first, 1) == [{"region": "us"}]
        assert [k["region"] for k in FastTrigger.opened_with] == ["us"]
    async with store.engine.connect() as conn:
        kwargs = (await conn.execute(sa.text("SELECT trigger_kwargs FROM outbox_stream"))).all()
    assert kwargs == [({"name": "fast", "region": "us"},)]


@pytest.mark.parametrize("mode", MODES)
async def test_serialize_failure_in_subscribe_leaves_groups_clean(
    store: OutboxStore, mode: str
) -> None:
    """Scenario 17."""

    async def source(kwargs: dict[str, Any], invocation: int) -> AsyncIterator[Any]:
        yield {"region": "us"}
        await forever()

    env = Env(mode, source)

    def broken() -> tuple[str, dict[str, Any]]:
        raise RuntimeError("serialize boom")

    async with SharedStreamManager(store) as manager:
        trigger = env.trigger()
        trigger.serialize = broken  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="serialize boom"):
            manager.subscribe(trigger_id=1, trigger=trigger)
        assert manager._streams == {}
        stream = manager.subscribe(trigger_id=1, trigger=env.trigger())
        assert await collect(stream, 1) == [{"region": "us"}]


@pytest.mark.parametrize("mode", MODES)
async def test_terminal_failure_reaches_every_subscriber_even_with_full_queues(
    store: OutboxStore, mode: str
) -> None:
    """Scenario 18 (``overflow="fail"``, bound 1): both subscribers hold event 1 with event 2
    filling their queues when the source dies. Each still fires event 1 (its filter had it),
    event 2 is discarded, and both then raise the source's error."""
    second, die = asyncio.Event(), asyncio.Event()

    async def source(kwargs: dict[str, Any], invocation: int) -> AsyncIterator[Any]:
        yield {"n": 1}
        await second.wait()
        yield {"n": 2}
        await die.wait()
        raise RuntimeError("upstream died")

    env = Env(mode, source)
    gates = [Gate(), Gate()]
    async with SharedStreamManager(store, max_subscriber_queue=1, overflow="fail") as manager:
        subs = [
            Background(manager.subscribe(trigger_id=i + 1, trigger=env.trigger(gate=g)))
            for i, g in enumerate(gates)
        ]
        for gate in gates:
            await asyncio.wait_for(gate.arrived(1), 10)
        second.set()
        stream = manager._streams[env.key]
        await wait_until(lambda: all(len(s.raw) == 1 for s in stream.subscribers.values()))
        die.set()
        await wait_until(lambda: env.key not in manager._streams)
        for gate in gates:
            gate.release()
        for sub in subs:
            await sub.finished()
            assert isinstance(sub.error, RuntimeError)
            assert str(sub.error) == "upstream died"
        if mode == "fast":
            assert [s.items for s in subs] == [[{"n": 1}], [{"n": 1}]]
        else:
            # Ack mode: the failure ended the stream; the held event was failed with it, so its
            # trigger event is not stored.
            assert [s.items for s in subs] == [[], []]
            assert {(r[0], r[2]) for r in await delivery_rows(store)} == {
                ("0-1", "failed"),
                ("0-2", "failed"),
            }


async def test_fail_overflowed_subscriber_drains_full_queue_before_putting_sentinel(
    store: OutboxStore,
) -> None:
    """Scenario 19 (white-box in Airflow), ack mode, ``overflow="fail"``, bound 3: five events
    reach the subscriber in one fan-out before it pulls any, so the fourth finds three stale
    items. Afterwards its queue holds only the overflow failure, and every event it owed is
    failed in the outbox (the fifth too: it was in that event's snapshot when it was pulled from
    the broker, a difference from Airflow, which would give the fifth an empty snapshot)."""
    producer = RecordingProducer([({"n": i}, f"p{i}") for i in range(5)])
    StreamTrigger.PRODUCERS["q"] = producer
    async with SharedStreamManager(store, max_subscriber_queue=3, overflow="fail") as manager:
        stream = manager.subscribe(trigger_id=1, trigger=StreamTrigger())
        key = ("queue", "q")
        await wait_until(lambda: manager._streams[key].subscribers["1"].failed)
        raw = manager._streams[key].subscribers["1"].raw
        assert len(raw) == 1
        item = raw.items[0]
        assert isinstance(item, _Failure) and isinstance(item.error, SubscriberOverflow)
        error = await next_error(stream)
        assert isinstance(error, SubscriberOverflow)
        await wait_until(lambda: len(producer.advanced) == 5)
        assert producer.advanced == [f"p{i}" for i in range(5)]
        assert [(o.acked, o.failed) for o in producer.outcomes] == [(0, 1)] * 5
    assert [(p, s, st) for p, s, st, _ in await delivery_rows(store)] == [
        (f"p{i}", "1", "failed") for i in range(5)
    ]
    assert await record_rows(store) == []


async def test_directory_file_delete_trigger_path_unchanged(store: OutboxStore) -> None:
    """Scenario 20: no producer override, so the fast path; the filter sees the raw dict."""

    async def source(kwargs: dict[str, Any], invocation: int) -> AsyncIterator[Any]:
        yield {"filename": "flag.txt"}
        await forever()

    FastTrigger.SOURCES["fast"] = source
    async with SharedStreamManager(store) as manager:
        stream = manager.subscribe(trigger_id=1, trigger=FastTrigger())
        assert not manager._streams[("fast", "fast")].ack_mode
        assert await collect(stream, 1) == [{"filename": "flag.txt"}]
    assert await record_rows(store) == [(None, "1", 0, {"filename": "flag.txt"})]
    assert await event_rows(store) == []


# -- 3.2 Ack-mode detection --------------------------------------------------------------


def _hierarchy(override_on: str | None) -> type[BaseEventTrigger]:
    def factory(cls: type[Any], kwargs: dict[str, Any]) -> SharedStreamProducer:
        return RecordingProducer([({"n": 1}, "p1")])

    async def source(cls: type[Any], kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        yield {"n": 1}
        await forever()

    def namespace(level: str) -> dict[str, Any]:
        ns: dict[str, Any] = {}
        if override_on == level:
            ns["create_shared_stream_producer"] = classmethod(factory)
        return ns

    parent = type(
        "Parent",
        (FastTrigger,),
        {"open_shared_stream": classmethod(source), **namespace("Parent")},
    )
    middle = type("Middle", (parent,), namespace("Middle"))
    return type("Grandchild", (middle,), namespace("Grandchild"))


@pytest.mark.parametrize(
    ("override_on", "expected"), [("Middle", True), (None, False), ("Grandchild", True)]
)
async def test_is_ack_required_multi_level_inheritance(
    store: OutboxStore, override_on: str | None, expected: bool
) -> None:
    """Scenario 21: ack mode is chosen by an override anywhere below BaseEventTrigger; the
    manager builds the stream accordingly and it fires either way."""
    grandchild = _hierarchy(override_on)
    assert is_ack_mode(grandchild) is expected
    async with SharedStreamManager(store) as manager:
        stream = manager.subscribe(trigger_id=1, trigger=grandchild())
        assert manager._streams[("fast", "fast")].ack_mode is expected
        assert await collect(stream, 1) == [{"n": 1}]
        assert (len(await event_rows(store)) == 1) is expected


async def test_create_shared_stream_producer_raises_by_default() -> None:
    """Scenario 22: the base hooks' defaults."""

    class Plain(BaseEventTrigger):
        def serialize(self) -> tuple[str, dict[str, Any]]:
            return ("Plain", {})

        async def run(self) -> AsyncIterator[TriggerEvent]:
            yield TriggerEvent({})

    with pytest.raises(NotImplementedError, match="create_shared_stream_producer"):
        Plain.create_shared_stream_producer({})
    assert Plain().shared_stream_key() is None
    with pytest.raises(NotImplementedError, match="open_shared_stream"):
        await anext(Plain.open_shared_stream({}))

    async def empty() -> AsyncIterator[Any]:
        return
        yield  # pragma: no cover

    with pytest.raises(NotImplementedError, match="filter_shared_stream"):
        await anext(Plain().filter_shared_stream(empty()))
    assert not is_ack_mode(Plain)

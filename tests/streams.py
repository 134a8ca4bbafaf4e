"""Test doubles for shared streams: a recording producer and triggers with controllable
filters, in the shape of Airflow's own test suite (``_RecordingProducer`` and friends)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any, ClassVar

import sqlalchemy as sa

from outbox import (
    AdvanceItem,
    AdvanceOutcome,
    BaseEventTrigger,
    LaneCommitter,
    OutboxStore,
    SharedStreamManager,
    SharedStreamProducer,
    TriggerEvent,
    reject_shared_stream_event,
)
from outbox.store import EventToRecord, ResolutionRow

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence


class RecordingProducer(SharedStreamProducer):
    """Yields the given ``(event, payload)`` pairs (each may wait on ``gate``), then blocks
    forever; records every advance."""

    def __init__(
        self,
        events: Sequence[tuple[Any, Any]],
        *,
        lane_for: Callable[[Any], Hashable] | None = None,
        key_for: Callable[[Any], str | None] | None = None,
        gate: asyncio.Event | None = None,
        advance_hook: Callable[[list[Any]], Awaitable[None]] | None = None,
    ) -> None:
        self.events = list(events)
        self.lane_for = lane_for
        self.key_for = key_for
        self.gate = gate
        self.advance_hook = advance_hook
        self.batches: list[list[Any]] = []
        self.advanced: list[Any] = []
        self.outcomes: list[AdvanceOutcome] = []
        self.aclose_calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.opened = 0

    async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
        self.opened += 1
        for event, payload in self.events:
            if self.gate is not None:
                await self.gate.wait()
            yield event, payload
        await asyncio.Event().wait()

    def get_advance_lane(self, broker_payload: Any) -> Hashable:
        return self.lane_for(broker_payload) if self.lane_for else None

    def get_event_key(self, broker_payload: Any) -> str | None:
        return self.key_for(broker_payload) if self.key_for else None

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            payloads = [payload for payload, _ in batch]
            if self.advance_hook is not None:
                await self.advance_hook(payloads)
            self.batches.append(payloads)
            self.advanced.extend(payloads)
            self.outcomes.extend(outcome for _, outcome in batch)
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        self.aclose_calls += 1


class Gate:
    """Lets a filter hold each raw event until the test releases it."""

    def __init__(self) -> None:
        self.pulled: list[Any] = []
        self._release = asyncio.Event()
        self._arrived = asyncio.Event()

    async def hold(self, raw: Any) -> None:
        self.pulled.append(raw)
        self._arrived.set()
        await self._release.wait()
        self._release.clear()

    def release(self) -> None:
        self._release.set()

    async def arrived(self, count: int, within: float = 30.0) -> None:
        """Wait until ``count`` events were pulled (failing after ``within`` seconds)."""
        async with asyncio.timeout(within):
            while len(self.pulled) < count:
                self._arrived.clear()
                await self._arrived.wait()


class StreamTrigger(BaseEventTrigger):
    """An ack-mode trigger on the shared producer ``PRODUCERS[name]``.

    The filter yields ``TriggerEvent(raw)`` for each raw event (``repeat`` times), rejects raw
    dicts with ``"reject"`` set, drops those whose ``"region"`` differs from its own, and waits on
    its ``gate`` (if any) after pulling each event.
    """

    PRODUCERS: ClassVar[dict[str, SharedStreamProducer]] = {}
    # Checked before PRODUCERS: a factory builds a fresh producer on each call.
    FACTORIES: ClassVar[dict[str, Callable[[dict[str, Any]], SharedStreamProducer]]] = {}
    factory_calls: ClassVar[list[dict[str, Any]]] = []

    def __init__(
        self,
        *,
        name: str = "q",
        region: str | None = None,
        gate: Gate | None = None,
        repeat: int = 1,
    ) -> None:
        super().__init__()
        self.name = name
        self.region = region
        self.gate = gate
        self.repeat = repeat

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"name": self.name, "region": self.region},
        )

    def shared_stream_key(self) -> Hashable:
        return ("queue", self.name)

    @classmethod
    def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> SharedStreamProducer:
        cls.factory_calls.append(kwargs)
        factory = cls.FACTORIES.get(kwargs["name"])
        if factory is not None:
            return factory(kwargs)
        return cls.PRODUCERS[kwargs["name"]]

    async def filter_shared_stream(
        self, shared_stream: AsyncIterator[Any]
    ) -> AsyncIterator[TriggerEvent]:
        async for raw in shared_stream:
            if self.gate is not None:
                await self.gate.hold(raw)
            if isinstance(raw, dict) and raw.get("reject"):
                reject_shared_stream_event()
                continue
            if (
                self.region is not None
                and isinstance(raw, dict)
                and raw.get("region") != self.region
            ):
                continue
            for _ in range(self.repeat):
                yield TriggerEvent(raw)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        yield TriggerEvent({})


async def collect(stream: AsyncIterator[TriggerEvent], count: int) -> list[Any]:
    """The payloads of the first ``count`` trigger events of ``stream``."""
    out: list[Any] = []
    async for event in stream:
        out.append(event.payload)
        if len(out) == count:
            break
    return out


async def wait_until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Wait for ``condition`` to hold, failing after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.005)


async def records(store: OutboxStore) -> list[tuple[str, Any]]:
    """Every stored trigger event as ``(subscriber, payload)``, in record order."""
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            sa.text("SELECT subscriber, payload FROM outbox_record ORDER BY id")
        )
        return [(r[0], r[1]) for r in rows]


async def deliveries(store: OutboxStore) -> list[tuple[int, str, str]]:
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT e.position, d.subscriber, d.state FROM outbox_delivery d "
                "JOIN outbox_event e ON e.id = d.event_id ORDER BY e.position, d.subscriber"
            )
        )
        return [(r[0], r[1], r[2]) for r in rows]


# -- additions for the ported Airflow reference scenarios --------------------------------------


class ScriptedProducer(RecordingProducer):
    """A ``RecordingProducer`` that, after its initial events, yields what the test pushes:
    ``push(event, payload)``, ``fail(exc)`` (``open_stream`` raises it) or ``finish()``
    (``open_stream`` returns)."""

    _FINISH: ClassVar[object] = object()

    def __init__(self, events: Sequence[tuple[Any, Any]] = (), **options: Any) -> None:
        super().__init__(events, **options)
        self._pushed: asyncio.Queue[Any] = asyncio.Queue()

    def push(self, event: Any, payload: Any) -> None:
        self._pushed.put_nowait((event, payload))

    def fail(self, error: BaseException) -> None:
        self._pushed.put_nowait(error)

    def finish(self) -> None:
        self._pushed.put_nowait(self._FINISH)

    async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
        self.opened += 1
        for event, payload in self.events:
            if self.gate is not None:
                await self.gate.wait()
            yield event, payload
        while True:
            item = await self._pushed.get()
            if item is self._FINISH:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


if TYPE_CHECKING:
    Script = Callable[["ScriptedTrigger", AsyncIterator[Any]], AsyncIterator[TriggerEvent]]
    FastSource = Callable[[dict[str, Any], int], AsyncIterator[Any]]


def producer_of(*pairs: tuple[Any, Any], **options: Any) -> ScriptedProducer:
    """A ``ScriptedProducer`` of ``pairs``, registered as the producer of stream "q"."""
    producer = ScriptedProducer(list(pairs), **options)
    StreamTrigger.PRODUCERS["q"] = producer
    return producer


class ScriptedTrigger(StreamTrigger):
    """A ``StreamTrigger`` whose filter is the async generator function ``script(self, raw)``."""

    def __init__(self, script: Script, *, name: str = "q", region: str | None = None) -> None:
        super().__init__(name=name, region=region)
        self.script = script

    async def filter_shared_stream(
        self, shared_stream: AsyncIterator[Any]
    ) -> AsyncIterator[TriggerEvent]:
        async for trigger_event in self.script(self, shared_stream):
            yield trigger_event


class FastTrigger(BaseEventTrigger):
    """A fast-path trigger (no producer override) fed by ``SOURCES[name](kwargs, invocation)``.

    Its filter is ``StreamTrigger``'s (gate, reject, region), or ``script(self, raw)`` if given.
    """

    SOURCES: ClassVar[dict[str, FastSource]] = {}
    invocations: ClassVar[list[int]] = []
    opened_with: ClassVar[list[dict[str, Any]]] = []

    def __init__(
        self,
        *,
        name: str = "fast",
        region: str | None = None,
        gate: Gate | None = None,
        script: Callable[[FastTrigger, AsyncIterator[Any]], AsyncIterator[TriggerEvent]]
        | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.region = region
        self.gate = gate
        self.script = script

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"name": self.name, "region": self.region},
        )

    def shared_stream_key(self) -> Hashable:
        return ("fast", self.name)

    @classmethod
    async def open_shared_stream(cls, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        invocation = len(cls.invocations)
        cls.invocations.append(invocation)
        cls.opened_with.append(dict(kwargs))
        async for raw in cls.SOURCES[kwargs["name"]](kwargs, invocation):
            yield raw

    async def filter_shared_stream(
        self, shared_stream: AsyncIterator[Any]
    ) -> AsyncIterator[TriggerEvent]:
        if self.script is not None:
            async for trigger_event in self.script(self, shared_stream):
                yield trigger_event
            return
        async for raw in shared_stream:
            if self.gate is not None:
                await self.gate.hold(raw)
            if isinstance(raw, dict) and raw.get("reject"):
                reject_shared_stream_event()
            if (
                self.region is not None
                and isinstance(raw, dict)
                and raw.get("region") != self.region
            ):
                continue
            yield TriggerEvent(raw)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        yield TriggerEvent({})


def reset_doubles() -> None:
    """Forget the producers, factories and sources an earlier test registered."""
    StreamTrigger.PRODUCERS.clear()
    StreamTrigger.FACTORIES.clear()
    StreamTrigger.factory_calls.clear()
    FastTrigger.SOURCES.clear()
    FastTrigger.invocations.clear()
    FastTrigger.opened_with.clear()


class FakeClock:
    """A settable clock that counts its readings, so a test can wait for the manager's
    ack-timeout task to have looked at it (instead of sleeping)."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.readings = 0

    def __call__(self) -> float:
        self.readings += 1
        return self.now

    async def passes(self, count: int = 2, within: float = 10.0) -> None:
        """Wait until the clock was read ``count`` more times (timeout passes ran)."""
        target = self.readings + count
        await wait_until(lambda: self.readings >= target, within)


class Background:
    """Consumes a subscriber's iterator in a task, recording payloads and the error (if any)
    instead of raising; Airflow's ``_consume_in_background``."""

    def __init__(self, stream: AsyncIterator[TriggerEvent]) -> None:
        self.items: list[Any] = []
        self.error: BaseException | None = None
        self.ended = False
        self.task = asyncio.get_running_loop().create_task(self._run(stream))

    async def _run(self, stream: AsyncIterator[TriggerEvent]) -> None:
        try:
            async for event in stream:
                self.items.append(event.payload)
        except Exception as exc:
            self.error = exc
        self.ended = True

    async def finished(self, within: float = 10.0) -> None:
        await asyncio.wait_for(asyncio.shield(self.task), within)


async def settle(manager: SharedStreamManager) -> None:
    """Commit everything the manager submitted, then advance everything resolved (in-process
    committer passes until one advances nothing): after this, what is not advanced is not
    advanceable."""
    await asyncio.sleep(0)  # let a scheduled flush of staged events submit them
    await manager._writer.barrier()
    committer = manager.committer
    assert committer is not None
    while await committer.run_once(stream_ids=committer.local_stream_ids()):
        pass


async def event_rows(store: OutboxStore) -> list[dict[str, Any]]:
    """Every recorded event with its lane, position, counts and snapshot (the names of the
    subscribers owing it, sorted), in id order."""
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT e.id, l.lane_key, e.position, e.payload, e.snapshot, e.pending, e.acked,"
                " e.failed, e.rejected FROM outbox_event e JOIN outbox_lane l ON l.id = e.lane_id"
                " ORDER BY e.id"
            )
        )
        return [{**r._mapping, "snapshot": sorted(r.snapshot)} for r in rows]


async def delivery_rows(store: OutboxStore) -> list[tuple[Any, str, str, str | None]]:
    """Every delivery as ``(event payload, subscriber, state, reason)``, by event id, subscriber."""
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT e.payload, d.subscriber, d.state, d.reason FROM outbox_delivery d "
                "JOIN outbox_event e ON e.id = d.event_id ORDER BY e.id, d.subscriber"
            )
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]


async def record_rows(store: OutboxStore) -> list[tuple[Any, str, int, Any]]:
    """Every stored trigger event as ``(event payload or None, subscriber, ordinal, payload)``."""
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT e.payload, r.subscriber, r.ordinal, r.payload FROM outbox_record r "
                "LEFT JOIN outbox_event e ON e.id = r.event_id ORDER BY r.id"
            )
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]


async def lane_rows(store: OutboxStore) -> list[dict[str, Any]]:
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT lane_key, next_position, advanced_through, attempts, last_error,"
                " stalled_since FROM outbox_lane ORDER BY lane_key"
            )
        )
        return [dict(r._mapping) for r in rows]


class Triggerers:
    """One stream key read by the triggerer whose manager ``triggerer 0`` runs (its
    ``ScriptedProducer`` is ``advancer``), and subscribers elsewhere: what they are owed is
    recorded through Postgres (as the reading triggerer records it for subscribers on other
    triggerers) and resolved when the test says, in any order. No in-process committer:
    ``committer`` (a separate ``LaneCommitter``) advances the stream with the reader's producer,
    pass by pass.

    Within one manager a subscriber resolves events in broadcast order; across triggerers the
    events of one lane can resolve in any order, which is what the lane scenarios need.
    """

    KEY: ClassVar[tuple[str, str]] = ("queue", "shared")

    def __init__(
        self,
        store: OutboxStore,
        *,
        lane_for: Callable[[Any], Hashable] | None = None,
        advance_hook: Callable[[list[Any]], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.lane_for = lane_for
        self.advancer = ScriptedProducer(lane_for=lane_for, advance_hook=advance_hook)
        StreamTrigger.PRODUCERS["t0"] = self.advancer
        self.manager = SharedStreamManager(store, run_committer=False)
        self.committer = LaneCommitter(store, producers={self.KEY: self.advancer})
        self._events: dict[Any, tuple[int, int]] = {}  # payload -> (stream id, event id)

    def subscribe(
        self, trigger_id: Any, *, gate: Gate | None = None
    ) -> AsyncIterator[TriggerEvent]:
        """A subscriber on the reading triggerer."""
        return self.manager.subscribe(
            trigger_id=trigger_id, trigger=StreamTrigger(name="t0", gate=gate), key=self.KEY
        )

    async def record_elsewhere(self, subscriber: str, *pushed: tuple[Any, Any]) -> None:
        """Record ``(event, payload)`` pairs owed only to ``subscriber``, on another
        triggerer (after everything the reader recorded so far)."""
        await self.manager._writer.barrier()
        from outbox.core import canonical_json

        async with self.store.engine.connect() as conn:
            stream_id = await conn.scalar(
                sa.text("SELECT id FROM outbox_stream WHERE key = :key"),
                {"key": canonical_json(self.KEY, what="key")},
            )
        assert stream_id is not None
        lanes = {
            canonical_json(self.lane_for(p) if self.lane_for else None, what="lane"): p
            for _, p in pushed
        }
        lane_ids = await self.store.ensure_lanes(stream_id, list(lanes))
        events = [
            EventToRecord(
                stream_id=stream_id,
                lane_id=lane_ids[
                    canonical_json(self.lane_for(p) if self.lane_for else None, what="lane")
                ],
                identity=None,
                raw_json=json.dumps(event),
                payload_json=json.dumps(p),
                snapshot=[subscriber],
            )
            for event, p in pushed
        ]
        for event in events:  # one at a time, so that their positions follow their order
            async with self.store.engine.begin() as conn:
                await self.store.record_events(conn, [event])
        for (_, p), event in zip(pushed, events, strict=True):
            self._events[p] = (stream_id, event.event_id)

    async def resolve_elsewhere(self, subscriber: str, *payloads: Any) -> None:
        """``subscriber`` (on another triggerer) resolves these events ``acked``."""
        async with self.store.engine.begin() as conn:
            await self.store.resolve(
                conn,
                [ResolutionRow(*self._events[p], subscriber, "acked", None) for p in payloads],
            )

    async def settle(self) -> int:
        """Commit what the manager submitted, then run committer passes until one advances
        nothing; returns how many events were advanced."""
        await asyncio.sleep(0)
        await self.manager._writer.barrier()
        total = 0
        while advanced := await self.committer.run_once():
            total += advanced
        return total

    async def aclose(self) -> None:
        await self.manager.stop_all()


async def wait_resolved(store: OutboxStore, payloads: Sequence[Any], within: float = 10.0) -> None:
    """Wait until the events with these broker payloads are fully resolved in the outbox."""
    deadline = time.monotonic() + within
    while True:
        resolved = {e["payload"] for e in await event_rows(store) if e["pending"] == 0}
        if set(payloads) <= resolved:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{list(payloads)} not resolved; resolved: {sorted(resolved)}")
        await asyncio.sleep(0.005)

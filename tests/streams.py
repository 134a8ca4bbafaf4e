"""Test doubles for shared streams: a recording producer and triggers with controllable
filters, in the shape of Airflow's own test suite (``_RecordingProducer`` and friends)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, ClassVar

import sqlalchemy as sa

from outbox import (
    AdvanceItem,
    AdvanceOutcome,
    BaseEventTrigger,
    OutboxStore,
    SharedStreamProducer,
    TriggerEvent,
    reject_shared_stream_event,
)

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

    async def arrived(self, count: int) -> None:
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

"""One subscriber of a shared stream: its queue of raw events, its binding window, and what it
has yielded but not yet seen committed.

A raw event reaches a subscriber's queue at fan-out; the subscriber's raw stream (``raw_events``)
opens the event's binding window as it hands the event to the filter, and closes it when the
filter asks for the next one (or the subscriber leaves). Trigger events the filter yields while
the window is open belong to that event.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from outbox.interop import open_airflow_reject_window

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from outbox.protocol import _Binding
    from outbox.triggers import ShareableTrigger, TriggerEvent

__all__ = ("End", "Failure", "PersistGate", "RawQueue", "Subscriber", "raw_events")


@dataclass(slots=True)
class Failure:
    """In a raw queue: the next pull raises ``error``."""

    error: BaseException


@dataclass(slots=True)
class End:
    """In an output queue: the subscriber's trigger events end (with ``error``, if any)."""

    error: BaseException | None


class RawQueue:
    """A subscriber's unconsumed raw events, ending in a failure once the subscriber fails."""

    __slots__ = ("items", "maxsize", "on_take", "waiter")

    def __init__(self, maxsize: int, on_take: Callable[[], None]) -> None:
        self.items: deque[tuple[Any, int] | Failure] = deque()
        self.maxsize = maxsize
        self.waiter: asyncio.Future[None] | None = None
        self.on_take = on_take

    def __len__(self) -> int:
        return len(self.items)

    def full(self) -> bool:
        return len(self.items) >= self.maxsize

    def put(self, item: tuple[Any, int] | Failure) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def fail(self, error: BaseException) -> None:
        """Drop what is queued and make the next pull raise ``error``."""
        self.items.clear()
        self.put(Failure(error))

    def get_nowait(self) -> tuple[Any, int] | None:
        """The next raw event, ``None`` if none is queued (a subscriber that keeps up pulls
        most events this way: no coroutine per pull; ``raw_events`` and ``fast_events`` pull
        with ``get_nowait() or await get()``). Measured with two changes to the writer: +2.4%
        events/s (sixth pass in bench/results/history.md)."""
        if not self.items:
            return None
        item = self.items[0]
        if isinstance(item, Failure):
            raise item.error
        self.items.popleft()
        self.on_take()
        return item

    async def get(self) -> tuple[Any, int]:
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        item = self.get_nowait()
        assert item is not None
        return item


@dataclass(slots=True, eq=False)
class PersistGate:
    """Inside Airflow's triggerer: an event the subscriber moved past resolves ``acked`` only
    once Airflow confirmed every trigger event bound to it (``confirm_persisted``)."""

    closed: bool = False
    unconfirmed: set[int] = field(default_factory=set)
    records: list[str] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class Subscriber:
    trigger_id: Any
    name: str
    trigger: ShareableTrigger
    raw: RawQueue
    # Identifies the subscriber in queued resolutions (the writer reports their commits by it):
    # a number, not a reference, so that a queued resolution holds no object the garbage
    # collector must keep visiting.
    serial: int = 0
    # The group it belongs to (a ``StreamGroup``).
    group: Any = None
    # Its registration (``outbox_subscriber.id``): it is handed only the events owed through it.
    registration: int | None = None
    output: deque[TriggerEvent | End] = field(default_factory=deque)
    output_waiter: asyncio.Future[None] | None = None
    task: asyncio.Task[None] | None = None
    window: int | None = None
    window_rejected: bool = False
    # The task that pulled the window's event: only it may reject it (None once the stream was
    # closed at the yield, where the window stays open but nothing can reject in it any more).
    window_task: asyncio.Task[Any] | None = None
    # The open window's trigger events and their JSON; emptied (not replaced) when it closes.
    window_events: list[TriggerEvent] = field(default_factory=list)
    window_records: list[str] = field(default_factory=list)
    # Trigger events of resolutions not yet committed, in resolution order: each commit hands
    # over the first ``len(records)`` of them.
    uncommitted: deque[TriggerEvent] = field(default_factory=deque)
    # Inside Airflow's triggerer, per event moved past (or open) and not yet resolved.
    gates: dict[int, PersistGate] | None = None
    # Inside Airflow: the registration of a subscriber that left while Airflow had not yet
    # confirmed events it moved past; removed once they resolve.
    leaving: int | None = None
    # Inside Airflow: trigger events bound and not yet confirmed, and how many may be before
    # the subscriber waits for Airflow's confirmations to pull its next event.
    unconfirmed: int = 0
    unconfirmed_cap: int | None = None
    confirmed: asyncio.Event | None = None
    failed: bool = False
    detached: bool = False
    ended: bool = False
    binding: _Binding | None = None
    what_trigger_event: str = ""

    def emit(self, item: TriggerEvent | End) -> None:
        if self.ended:
            return
        if isinstance(item, End):
            self.ended = True
        self.output.append(item)
        if self.output_waiter is not None and not self.output_waiter.done():
            self.output_waiter.set_result(None)


async def raw_events(
    subscriber: Subscriber, close_window: Callable[[Subscriber], None]
) -> AsyncIterator[Any]:
    """The raw events of an ack-mode subscriber, each bare, with its binding window open while
    the filter works on it; asking for the next one closes it (``close_window``)."""
    while True:
        if subscriber.window is not None:
            close_window(subscriber)
        cap = subscriber.unconfirmed_cap
        while cap is not None and subscriber.unconfirmed >= cap and not subscriber.failed:
            # Inside Airflow: what Airflow stored but has not confirmed yet is what a crash
            # hands out again; bounding it bounds the duplicates.
            if subscriber.confirmed is None:
                subscriber.confirmed = asyncio.Event()
            subscriber.confirmed.clear()
            await subscriber.confirmed.wait()
        raw, event_id = subscriber.raw.get_nowait() or await subscriber.raw.get()
        subscriber.window = event_id
        subscriber.window_rejected = False
        subscriber.window_task = asyncio.current_task()
        assert subscriber.binding is not None
        close_airflow_window = open_airflow_reject_window(
            subscriber.binding.reject, subscriber.trigger_id, event_id
        )
        try:
            yield raw
        except GeneratorExit:
            subscriber.window_task = None  # rule 16: closed at the yield
            raise
        finally:
            if close_airflow_window is not None:
                close_airflow_window()


async def fast_events(subscriber: Subscriber) -> AsyncIterator[Any]:
    """The raw events of a fast-path subscriber (no windows, no bookkeeping): ``raw_events``
    without the window, its event id (-1) dropped."""
    while True:
        raw, _ = subscriber.raw.get_nowait() or await subscriber.raw.get()
        yield raw


async def output_of(subscriber: Subscriber) -> AsyncIterator[TriggerEvent]:
    """The subscriber's committed trigger events, until its output ends."""
    while True:
        while subscriber.output:
            item = subscriber.output.popleft()
            if isinstance(item, End):
                if item.error is not None:
                    raise item.error
                return
            yield item
        subscriber.output_waiter = asyncio.get_running_loop().create_future()
        try:
            await subscriber.output_waiter
        finally:
            subscriber.output_waiter = None

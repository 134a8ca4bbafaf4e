"""``SharedStreamManager``: one producer per stream key, fanned out to many subscribers, with
every event recorded and every resolution committed together with its trigger events.

The shape follows Airflow's in-memory manager (groups, snapshot at fan-out, binding windows,
ack timeout, overflow); the state that must survive a crash lives in Postgres, written through
the group-committing ``Writer``. Advancing the broker is the ``LaneCommitter``'s job; the manager
runs one in-process by default, with its own producer instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from outbox._aio import wait_event
from outbox.codec import encode as encode_for_storage
from outbox.committer import LaneCommitter
from outbox.core import (
    ACKED,
    FAILED,
    REJECTED,
    canonical_json,
    is_expired,
    storable_key,
    timeout_cadence,
)
from outbox.errors import StreamTerminated
from outbox.interop import adapt_producer, open_airflow_reject_window
from outbox.protocol import AckTimeout, SharedStreamProducer, _Binding, _current_binding, to_json
from outbox.store import OWNER, RECORDS, EventToRecord, OutboxStore, holds_separator
from outbox.triggers import ShareableTrigger, TriggerEvent, is_ack_mode
from outbox.writer import Writer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Coroutine, Hashable, Sequence

    from outbox.store import Resolution

__all__ = ("SharedStreamManager", "SubscriberOverflow")

log = logging.getLogger("outbox.manager")

_T = TypeVar("_T")

DEFAULT_ACK_TIMEOUT = 300.0
DEFAULT_SUBSCRIBER_QUEUE_MAX = 1024


class SubscriberOverflow(Exception):
    """A subscriber's queue exceeded its bound (only with ``overflow="fail"``)."""


@dataclass(slots=True)
class _Failure:
    error: BaseException


@dataclass(slots=True)
class _End:
    error: BaseException | None


class _RawQueue:
    """A subscriber's unconsumed raw events, ending in a failure once the subscriber fails."""

    __slots__ = ("items", "maxsize", "on_take", "waiter")

    def __init__(self, maxsize: int, on_take: Callable[[], None]) -> None:
        self.items: deque[tuple[Any, int] | _Failure] = deque()
        self.maxsize = maxsize
        self.waiter: asyncio.Future[None] | None = None
        self.on_take = on_take

    def __len__(self) -> int:
        return len(self.items)

    def full(self) -> bool:
        return len(self.items) >= self.maxsize

    def put(self, item: tuple[Any, int] | _Failure) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def fail(self, error: BaseException) -> None:
        """Drop what is queued and make the next pull raise ``error``."""
        self.items.clear()
        self.put(_Failure(error))

    def get_nowait(self) -> tuple[Any, int] | None:
        """The next raw event, ``None`` if none is queued (a subscriber that keeps up pulls
        most events this way: no coroutine per pull)."""
        if not self.items:
            return None
        item = self.items[0]
        if isinstance(item, _Failure):
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
class _Subscriber:
    trigger_id: Any
    name: str
    trigger: ShareableTrigger
    raw: _RawQueue
    output: deque[TriggerEvent | _End] = field(default_factory=deque)
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
    # over the first ``len(records)`` of them. Resolutions name their subscriber by ``serial``,
    # not by reference, so that a queued resolution holds no object the garbage collector must
    # keep visiting (a full collection over a large heap was a fifth of the manager's time).
    uncommitted: deque[TriggerEvent] = field(default_factory=deque)
    serial: int = 0
    failed: bool = False
    ended: bool = False
    binding: _Binding | None = None
    what_trigger_event: str = ""

    def emit(self, item: TriggerEvent | _End) -> None:
        if self.ended:
            return
        if isinstance(item, _End):
            self.ended = True
        self.output.append(item)
        if self.output_waiter is not None and not self.output_waiter.done():
            self.output_waiter.set_result(None)


@dataclass(slots=True, eq=False)
class _Stream:
    key: Hashable
    key_json: str
    trigger_class: type[Any]
    class_path: str
    kwargs: dict[str, Any]
    kwargs_json: str
    ack_mode: bool
    where: str
    what_raw: str
    what_payload: str
    subscribers: dict[str, _Subscriber] = field(default_factory=dict)
    # Who an event recorded now goes to; reset whenever a subscriber joins, leaves or fails.
    snapshot: tuple[str, ...] | None = None
    # Events fanned out by this manager that some of its subscribers still owe: the names of
    # those subscribers (a dict used as a set: holding only strings and None, it is never tracked
    # by the cyclic GC, which a set always is), and when each event was broadcast.
    outstanding: dict[int, dict[str, None]] = field(default_factory=dict)
    broadcast_at: dict[int, float] = field(default_factory=dict)
    lane_ids: dict[str, int] = field(default_factory=dict)
    lane_cache: dict[tuple[type, Any], int] = field(default_factory=dict)
    stream_id: int = 0
    producer: SharedStreamProducer | None = None
    staged: list[EventToRecord] = field(default_factory=list)
    staged_raw: list[Any] = field(default_factory=list)
    flush_scheduled: bool = False
    in_flight: int = 0
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    poll_task: asyncio.Task[None] | None = None
    timeout_task: asyncio.Task[None] | None = None
    terminated: bool = False
    stopping: bool = False
    # Trigger events yielded outside any window before the stream row exists (a filter may
    # yield before it pulls): stored as soon as the stream has its id.
    early_unbound: list[tuple[_Subscriber, str, TriggerEvent]] = field(default_factory=list)


class SharedStreamManager:
    """Fans one producer per stream key out to its subscribers, durably.

    :param store: the ``OutboxStore`` that records events, resolutions and trigger events.
    :param ack_timeout: seconds from broadcast within which a subscriber must resolve an event;
        past it the subscriber is failed for that event and gets ``AckTimeout``.
    :param max_subscriber_queue: bound on a subscriber's unconsumed raw events.
    :param cohort_grace_period: seconds a new stream waits before polling, so triggers that
        subscribe together after a restart are all in the first event's snapshot.
    :param clock: monotonic seconds, injectable for tests.
    :param overflow: ``"pause"`` (default) stops pulling from the producer while a subscriber's
        queue is full; ``"fail"`` fails the subscriber instead (Airflow's behaviour).
    :param run_committer: run a ``LaneCommitter`` in-process that advances this manager's
        streams with its own producer instances (needed when acks must come from the consuming
        connection). Turn it off when a separate ``outbox committer`` advances them.
    :param write_batch: most items one group-committed transaction carries.
    :param max_trigger_events_per_event: most trigger events a subscriber may yield for one raw
        event (they commit in one transaction with its resolution); past it the subscriber
        fails for that event with a one-line error.
    :param outage_limit: seconds a write keeps retrying while the database is unreachable
        (backoff up to 2 s between attempts); past it the stream's subscribers get
        ``DatabaseUnavailable`` and may subscribe again.
    """

    def __init__(
        self,
        store: OutboxStore,
        *,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        max_subscriber_queue: int = DEFAULT_SUBSCRIBER_QUEUE_MAX,
        cohort_grace_period: float = 0.0,
        clock: Callable[[], float] | None = None,
        overflow: Literal["pause", "fail"] = "pause",
        run_committer: bool = True,
        write_batch: int = 4000,
        committer_options: dict[str, Any] | None = None,
        outage_limit: float = 60.0,
        max_trigger_events_per_event: int = 100_000,
    ) -> None:
        if ack_timeout <= 0:
            raise ValueError(f"ack_timeout must be positive, got {ack_timeout!r}")
        if max_subscriber_queue < 1:
            raise ValueError(
                f"max_subscriber_queue must be at least 1, got {max_subscriber_queue!r}"
            )
        if overflow not in ("pause", "fail"):
            raise ValueError(f"overflow must be 'pause' or 'fail', got {overflow!r}")
        self._store = store
        self.ack_timeout = ack_timeout
        self.max_subscriber_queue = max_subscriber_queue
        self.max_trigger_events_per_event = max_trigger_events_per_event
        self.cohort_grace_period = cohort_grace_period
        self._now = clock or time.monotonic
        self.overflow = overflow
        self._streams: dict[Hashable, _Stream] = {}
        self._serials = itertools.count(1)
        self._owners: dict[int, _Subscriber] = {}  # by serial, until their output ends
        self._committer_wakeup = asyncio.Event()
        self._writer = Writer(
            store,
            max_batch=write_batch,
            on_commit=self._committer_wakeup.set,
            on_resolved=self._deliver,
            outage_limit=outage_limit,
        )
        self._record_batch = max(1, min(1000, write_batch))
        self.committer: LaneCommitter | None = None
        if run_committer:
            options = {"sweep_timeouts": False, **(committer_options or {})}
            self.committer = LaneCommitter(store, **options)
        self._committer_task: asyncio.Task[None] | None = None
        # Which stream's producer the in-process committer holds for a stream id: a fresh stream
        # for a key can start while the old one is still finishing, and the old one must not
        # take the new producer away.

    # -- public API -------------------------------------------------------------------------

    def subscribe(
        self, *, trigger_id: Any, trigger: ShareableTrigger, key: Hashable | None = None
    ) -> AsyncIterator[TriggerEvent]:
        """Join ``trigger`` to the stream ``key`` (default ``trigger.shared_stream_key()``).

        Returns the subscriber's trigger events, each yielded only after it is committed to the
        outbox. The iterator ends after ``unsubscribe`` or ``stop_all``, and raises what failed
        the subscriber (``AckTimeout``, an overflow, the producer's error).
        """
        if key is None:
            key = trigger.shared_stream_key()
        if key is None:
            raise ValueError("shared stream key must not be None")
        name = str(trigger_id)
        if holds_separator(name):
            raise ValueError(
                f"trigger id {trigger_id!r} contains a control character (\\x1e or \\x1f) "
                "that outbox uses as a separator; use a trigger id without one"
            )
        stream = self._streams.get(key)
        if stream is not None and name in stream.subscribers:
            raise RuntimeError(f"Trigger {trigger_id} already subscribed to shared stream {key!r}")
        if stream is None:
            stream = self._new_stream(key, trigger)
        subscriber = _Subscriber(
            trigger_id=trigger_id,
            name=name,
            trigger=trigger,
            raw=_RawQueue(self.max_subscriber_queue, stream.resume.set),
            what_trigger_event=f"{stream.where}: trigger event of subscriber {trigger_id}",
            serial=next(self._serials),
        )
        self._owners[subscriber.serial] = subscriber
        subscriber.binding = _Binding(lambda: self._reject(stream, subscriber))
        stream.subscribers[name] = subscriber
        stream.snapshot = None
        self._streams[key] = stream
        self._ensure_background()
        if stream.poll_task is None:
            stream.poll_task = asyncio.get_running_loop().create_task(
                self._poll(stream), name=f"shared-stream-poll[{key!r}]"
            )
        subscriber.task = asyncio.get_running_loop().create_task(
            self._run_filter(stream, subscriber), name=f"shared-stream-filter[{key!r}:{name}]"
        )
        return self._output(subscriber)

    async def unsubscribe(self, trigger_id: Any, key: Hashable) -> None:
        """Leave the stream: an event the subscriber pulled resolves ``acked`` (with the trigger
        events it yielded), events it never pulled resolve ``failed``. The last subscriber to
        leave stops the stream, after its resolved events are advanced."""
        stream = self._streams.get(key)
        if stream is None:
            return
        subscriber = stream.subscribers.pop(str(trigger_id), None)
        stream.snapshot = None
        if subscriber is None:
            return
        last = not stream.subscribers
        if last:
            del self._streams[key]
        self._detach(stream, subscriber, classify=True)
        await self._await_task(subscriber.task)
        if last:
            await self._stop_stream(stream)

    async def stop_all(self) -> None:
        """Stop every stream: filters are cancelled, what is resolved is committed and advanced,
        unresolved events stay pending for redelivery, each producer is closed once."""
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            for subscriber in list(stream.subscribers.values()):
                self._detach(stream, subscriber, classify=False)
        for stream in streams:
            for subscriber in stream.subscribers.values():
                await self._await_task(subscriber.task)
            await self._stop_stream(stream)
        await self._writer.aclose()
        if self._committer_task is not None:
            self._committer_task.cancel()
            await self._await_task(self._committer_task)
            self._committer_task = None

    async def __aenter__(self) -> SharedStreamManager:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop_all()

    # -- streams ------------------------------------------------------------------------------

    def _new_stream(self, key: Hashable, trigger: ShareableTrigger) -> _Stream:
        key_json = storable_key(
            canonical_json(key, what="shared stream key"), what="shared stream key"
        )
        class_path, kwargs = trigger.serialize()
        storable_key(class_path, what=f"stream {key!r}: trigger class path")
        kwargs_json = to_json(kwargs, what=f"stream {key!r}: trigger kwargs of {class_path}")
        where = f"stream {key!r}"
        return _Stream(
            key=key,
            where=where,
            what_raw=f"{where}: raw event (override serialize_event)",
            what_payload=(
                f"{where}: broker payload (override serialize_payload/deserialize_payload)"
            ),
            key_json=key_json,
            trigger_class=type(trigger),
            class_path=class_path,
            kwargs=kwargs,
            kwargs_json=kwargs_json,
            ack_mode=is_ack_mode(type(trigger)),
        )

    def _ensure_background(self) -> None:
        self._writer.start()
        if self.committer is not None and self._committer_task is None:
            self._committer_task = asyncio.get_running_loop().create_task(
                self._run_committer(), name="outbox-in-process-committer"
            )

    async def _poll(self, stream: _Stream) -> None:
        error: BaseException | None = None
        cancelled = False
        source: AsyncIterator[Any] | None = None
        try:
            if self.cohort_grace_period > 0:
                await asyncio.sleep(self.cohort_grace_period)
            stream.stream_id = await self._writer.retry(
                lambda: self._uncancelled(
                    self._store.ensure_stream(
                        stream.key_json, stream.class_path, stream.kwargs_json, self.ack_timeout
                    )
                )
            )
            early, stream.early_unbound = stream.early_unbound, []
            for subscriber, payload_json, trigger_event in early:
                self._store_unbound(stream, subscriber, payload_json, trigger_event)
            if stream.ack_mode:
                producer = adapt_producer(
                    stream.trigger_class.create_shared_stream_producer(stream.kwargs)
                )
                stream.producer = producer
                if self.committer is not None:
                    self.committer.add_producer(stream.stream_id, producer)
                stream.timeout_task = asyncio.get_running_loop().create_task(
                    self._enforce_timeouts(stream),
                    name=f"shared-stream-ack-timeout[{stream.key!r}]",
                )
                source = producer.open_stream()
                async for item in source:
                    await self._stage(stream, producer, item)
            else:
                source = stream.trigger_class.open_shared_stream(stream.kwargs)
                async for raw in source:
                    await self._fan_out_fast(stream, raw)
            raise StreamTerminated(
                f"shared stream {stream.key!r} returned without raising; shared streams are "
                "expected to run for the lifetime of the group"
            )
        except asyncio.CancelledError:
            cancelled = True
            # The stop path: this cancellation asked the poll to end, not the finish below to be
            # skipped (``_await_task`` re-raises while the current task is cancelling).
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        except Exception as exc:
            error = exc
        finally:
            if error is not None:
                log.error(
                    "Shared stream poll failed; propagating to subscribers",
                    exc_info=error,
                    extra={"stream": repr(stream.key)},
                )
                self._fail_stream(stream, error)
            await self._finish_stream(stream, source)
        if cancelled:
            raise asyncio.CancelledError

    def _fail_stream(self, stream: _Stream, error: BaseException) -> None:
        if stream.terminated:
            return
        stream.terminated = True
        if self._streams.get(stream.key) is stream:
            del self._streams[stream.key]
        for subscriber in stream.subscribers.values():
            subscriber.raw.fail(error)
        # Nothing this stream fanned out will be finished: fail what is still owed, so the
        # broker redelivers it and the lanes (which a fresh stream for the key continues) move.
        reason = f"stream failed: {type(error).__name__}: {error}"
        for event_id, owed in list(stream.outstanding.items()):
            for name in sorted(owed):
                self._write_failure(stream, name, event_id, reason[:500])
        stream.outstanding.clear()
        stream.broadcast_at.clear()

    async def _finish_stream(self, stream: _Stream, source: AsyncIterator[Any] | None) -> None:
        stream.stopping = True
        if stream.timeout_task is not None:
            stream.timeout_task.cancel()
            await self._await_task(stream.timeout_task)
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:
                log.debug("closing the shared stream source failed", exc_info=True)
        await self._writer.barrier()
        if stream.producer is not None:
            if self.committer is not None:
                await self.committer.drain(stream.stream_id)
                # A newer stream of the same key may have registered its own producer.
                self.committer.remove_producer(stream.stream_id, stream.producer)
            try:
                await stream.producer.aclose()
            except Exception:
                log.warning("Producer aclose failed", exc_info=True)

    async def _stop_stream(self, stream: _Stream) -> None:
        if stream.poll_task is not None:
            stream.poll_task.cancel()
            await self._await_task(stream.poll_task)

    @staticmethod
    async def _uncancelled(operation: Coroutine[Any, Any, _T]) -> _T:
        """Await one database call that a stop must not interrupt (cancelling asyncpg in the
        middle of a statement loses the connection): on cancellation let it finish, then
        re-raise."""
        task = asyncio.ensure_future(operation)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await task
            raise

    @staticmethod
    async def _await_task(task: asyncio.Task[Any] | None) -> None:
        if task is None:
            return
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        except Exception:
            log.debug("background task ended with an error", exc_info=True)

    # -- recording and fan-out --------------------------------------------------------------

    def _must_pause(self, stream: _Stream) -> bool:
        if stream.in_flight >= 4 * self._record_batch:
            return True
        if self.overflow == "fail":
            return False
        bound = self.max_subscriber_queue - stream.in_flight
        for subscriber in stream.subscribers.values():
            if len(subscriber.raw.items) >= bound and not subscriber.failed:
                return True
        return False

    async def _wait_for_room(self, stream: _Stream) -> None:
        while self._must_pause(stream):
            if stream.staged:
                self._flush_staged(stream)
            stream.resume.clear()
            await stream.resume.wait()

    async def _stage(self, stream: _Stream, producer: SharedStreamProducer, item: Any) -> None:
        raw, payload = item
        where = stream.where
        lane = producer.get_advance_lane(payload)
        # Most lanes are ints or strings (a partition, a message group): their lane ids are
        # looked up by value, without serialising the lane for every event. (1, True and 1.0
        # are equal but serialise differently: hence the type in the key.)
        lane_id = stream.lane_cache.get((type(lane), lane)) if type(lane) in (int, str) else None
        identity = producer.get_event_key(payload)
        if identity is not None:
            if not isinstance(identity, str):
                raise TypeError(
                    f"{where}: get_event_key returned {type(identity).__name__}, "
                    "expected str or None"
                )
            storable_key(identity, what=f"{where}: get_event_key returned")
        raw_json = encode_for_storage(producer.serialize_event(raw), what=stream.what_raw)
        payload_json = encode_for_storage(
            producer.serialize_payload(payload), what=stream.what_payload
        )
        if lane_id is None:
            lane_json = storable_key(
                canonical_json(lane, what=f"{where}: lane"), what=f"{where}: lane"
            )
            lane_id = stream.lane_ids.get(lane_json)
            if lane_id is None:
                stream.lane_ids.update(
                    await self._writer.retry(
                        lambda: self._store.ensure_lanes(stream.stream_id, [lane_json])
                    )
                )
                lane_id = stream.lane_ids[lane_json]
            if type(lane) in (int, str):
                stream.lane_cache[(type(lane), lane)] = lane_id
        snapshot = stream.snapshot
        if snapshot is None:
            snapshot = stream.snapshot = tuple(
                s.name for s in stream.subscribers.values() if not s.failed
            )
        stream.staged.append(
            EventToRecord(
                stream_id=stream.stream_id,
                lane_id=lane_id,
                identity=identity,
                raw_json=raw_json,
                payload_json=payload_json,
                snapshot=snapshot,
            )
        )
        stream.staged_raw.append(raw)
        stream.in_flight += 1
        if len(stream.staged) >= self._record_batch:
            self._flush_staged(stream)
        elif not stream.flush_scheduled:
            stream.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_staged, stream)
        await self._wait_for_room(stream)

    def _flush_staged(self, stream: _Stream) -> None:
        stream.flush_scheduled = False
        if not stream.staged or stream.terminated:
            return
        events, raws = stream.staged, stream.staged_raw
        stream.staged, stream.staged_raw = [], []
        self._writer.record_events(
            events, lambda result: self._on_recorded(stream, events, raws, result)
        )

    def _on_recorded(
        self, stream: _Stream, events: list[EventToRecord], raws: list[Any], result: Any
    ) -> None:
        stream.in_flight -= len(events)
        stream.resume.set()
        if isinstance(result, BaseException):
            if not stream.terminated:
                self._fail_stream(stream, result)
            return
        if stream.terminated:
            # The stream failed (the database was away longer than outage_limit, say): leave
            # these pending. The broker never advanced past them, so the stream that replaces
            # this one reads them again and reuses these occurrences for its subscribers (the
            # committer's ack-timeout sweep fails them if none comes). Failing them here could
            # land after a fresh stream already re-opened them, and fail its subscribers.
            return
        if stream.stopping:
            # Nobody will be handed these events any more: fail them now rather than leave them
            # pending in the outbox, where they would hold up their lanes (a fresh stream for the
            # key continues the same lanes) until a timeout sweep.
            reason = "stream stopped before broadcast"
            for event in events:
                for name in event.deliver_to:
                    self._write_failure(stream, name, event.event_id, reason)
            return
        now = self._now()
        may_overflow = self.overflow == "fail"
        for event, raw in zip(events, raws, strict=True):
            if not event.deliver_to:
                continue
            # A redelivered identity may reuse an occurrence this stream still tracks.
            owed = stream.outstanding.get(event.event_id)
            if owed is None:
                owed = stream.outstanding[event.event_id] = {}
            stream.broadcast_at[event.event_id] = now
            # The whole snapshot is pending before anyone is handed the event, so that one
            # subscriber overflowing on it cannot empty (and drop) the entry the others owe.
            targets: list[_Subscriber] = []
            for name in event.deliver_to:
                subscriber = stream.subscribers.get(name)
                if subscriber is None or subscriber.failed:
                    reason = (
                        "unsubscribed before broadcast"
                        if subscriber is None
                        else "subscriber failed before broadcast"
                    )
                    self._write_failure(stream, name, event.event_id, reason)
                    continue
                owed[name] = None
                targets.append(subscriber)
            delivery = (raw, event.event_id)  # one tuple, handed to every subscriber
            for subscriber in targets:
                if may_overflow and self._overflowed(stream, subscriber):
                    continue
                subscriber.raw.put(delivery)
            if not owed:
                self._settled(stream, event.event_id)

    @staticmethod
    def _settled(stream: _Stream, event_id: int) -> None:
        """Nobody here owes ``event_id`` any more."""
        stream.outstanding.pop(event_id, None)
        stream.broadcast_at.pop(event_id, None)

    async def _fan_out_fast(self, stream: _Stream, raw: Any) -> None:
        for subscriber in list(stream.subscribers.values()):
            if subscriber.failed:
                continue
            if self._overflowed(stream, subscriber):
                continue
            subscriber.raw.put((raw, -1))
        await self._wait_for_room(stream)

    # -- subscribers ----------------------------------------------------------------------------

    async def _output(self, subscriber: _Subscriber) -> AsyncIterator[TriggerEvent]:
        while True:
            while subscriber.output:
                item = subscriber.output.popleft()
                if isinstance(item, _End):
                    if item.error is not None:
                        raise item.error
                    return
                yield item
            subscriber.output_waiter = asyncio.get_running_loop().create_future()
            try:
                await subscriber.output_waiter
            finally:
                subscriber.output_waiter = None

    async def _run_filter(self, stream: _Stream, subscriber: _Subscriber) -> None:
        if stream.ack_mode:
            # Set once, in this task's own context (tasks it starts inherit it): whether a reject
            # falls inside a window is the subscriber's state to tell, and the task that pulled
            # the window's event, not a per-event setting.
            _current_binding.set(subscriber.binding)
        raw_stream = (
            self._ack_stream(stream, subscriber)
            if stream.ack_mode
            else self._fast_stream(subscriber)
        )
        try:
            async for trigger_event in subscriber.trigger.filter_shared_stream(raw_stream):
                self._on_trigger_event(stream, subscriber, trigger_event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
            if stream.ack_mode and subscriber.window is not None and not subscriber.failed:
                self._resolve(
                    stream, subscriber, subscriber.window, FAILED, f"filter raised: {exc!r}"
                )
                subscriber.window = None
            self._writer.after_pending(lambda _: self._end(subscriber, error))
            return
        self._writer.after_pending(lambda _: self._end(subscriber, None))

    async def _fast_stream(self, subscriber: _Subscriber) -> AsyncIterator[Any]:
        while True:
            raw, _ = subscriber.raw.get_nowait() or await subscriber.raw.get()
            yield raw

    async def _ack_stream(self, stream: _Stream, subscriber: _Subscriber) -> AsyncIterator[Any]:
        while True:
            if subscriber.window is not None:
                self._close_window(stream, subscriber)
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

    def _close_window(self, stream: _Stream, subscriber: _Subscriber) -> None:
        event_id = subscriber.window
        assert event_id is not None
        subscriber.window = None
        events, records = subscriber.window_events, subscriber.window_records
        if not subscriber.window_rejected:
            self._resolve(stream, subscriber, event_id, ACKED, None, records, events)
        if records:
            records.clear()
            events.clear()

    def _reject(self, stream: _Stream, subscriber: _Subscriber) -> None:
        event_id = subscriber.window
        if (
            event_id is None
            or subscriber.window_rejected
            or asyncio.current_task() is not subscriber.window_task
        ):
            log.warning(
                "reject_shared_stream_event called outside an ack-mode binding window; ignored"
            )
            return
        log.info(
            "Rejecting shared-stream event",
            extra={"trigger_id": subscriber.trigger_id, "event_id": event_id},
        )
        subscriber.window_rejected = True
        subscriber.window_events.clear()
        subscriber.window_records.clear()
        self._resolve(stream, subscriber, event_id, REJECTED, "rejected by the filter")

    def _on_trigger_event(
        self, stream: _Stream, subscriber: _Subscriber, trigger_event: TriggerEvent
    ) -> None:
        # Airflow's own TriggerEvent (a pydantic model) is welcome too: only .payload is used.
        if not isinstance(trigger_event, TriggerEvent) and not hasattr(trigger_event, "payload"):
            raise TypeError(
                f"stream {stream.key!r}: subscriber {subscriber.trigger_id} yielded "
                f"{type(trigger_event).__name__}, expected TriggerEvent"
            )
        payload_json = encode_for_storage(trigger_event.payload, what=subscriber.what_trigger_event)
        if subscriber.failed:
            return
        if stream.ack_mode and subscriber.window is not None:
            if subscriber.window_rejected:
                log.warning(
                    "trigger event yielded after reject_shared_stream_event; not stored",
                    extra={"trigger_id": subscriber.trigger_id, "event_id": subscriber.window},
                )
                return
            if len(subscriber.window_records) >= self.max_trigger_events_per_event:
                # They all commit in one transaction with the event's resolution: bound it.
                raise RuntimeError(
                    f"stream {stream.key!r}: subscriber {subscriber.trigger_id} yielded more than "
                    f"{self.max_trigger_events_per_event} trigger events for one raw event; "
                    "raise max_trigger_events_per_event or split the work"
                )
            subscriber.window_events.append(trigger_event)
            subscriber.window_records.append(payload_json)
            return
        if not stream.stream_id:
            stream.early_unbound.append((subscriber, payload_json, trigger_event))
            return
        self._store_unbound(stream, subscriber, payload_json, trigger_event)

    def _store_unbound(
        self,
        stream: _Stream,
        subscriber: _Subscriber,
        payload_json: str,
        trigger_event: TriggerEvent,
    ) -> None:
        self._writer.store_unbound(
            stream.stream_id,
            subscriber.name,
            payload_json,
            lambda result: self._hand_over(subscriber, (trigger_event,), result),
        )

    def _deliver(self, resolution: Resolution, result: Any) -> None:
        """The writer's report on a resolution with trigger events: hand them to their
        subscriber if it won, or end its stream if the write failed."""
        owner = resolution[OWNER]
        subscriber = self._owners.get(owner) if owner is not None else None
        if subscriber is None:
            return  # its output ended already
        uncommitted = subscriber.uncommitted
        if isinstance(result, BaseException):
            uncommitted.clear()
            self._end(subscriber, result)
        elif result is False:
            for _ in resolution[RECORDS]:
                uncommitted.popleft()
        else:
            emit = subscriber.emit
            for _ in resolution[RECORDS]:
                emit(uncommitted.popleft())

    def _end(self, subscriber: _Subscriber, error: BaseException | None) -> None:
        """End the subscriber's output (with ``error``, if any): nothing is handed to it after."""
        self._owners.pop(subscriber.serial, None)
        subscriber.emit(_End(error))

    @staticmethod
    def _hand_over(subscriber: _Subscriber, events: Sequence[TriggerEvent], result: Any) -> None:
        if isinstance(result, BaseException):
            subscriber.emit(_End(result))
        elif result is not False:
            for trigger_event in events:
                subscriber.emit(trigger_event)

    def _resolve(
        self,
        stream: _Stream,
        subscriber: _Subscriber,
        event_id: int,
        state: str,
        reason: str | None,
        records: list[str] | None = None,
        events: list[TriggerEvent] | None = None,
    ) -> None:
        """Queue ``subscriber``'s resolution of ``event_id`` unless it resolved it already;
        ``events`` (with their JSON ``records``) are handed over once it commits."""
        owed = stream.outstanding.get(event_id)
        if owed is None or subscriber.name not in owed:
            return
        del owed[subscriber.name]
        if not owed:
            self._settled(stream, event_id)
        if events and records:  # one JSON record per trigger event
            subscriber.uncommitted.extend(events)
            # A plain tuple (see ``outbox.store.Resolution``), fields as in ``ResolutionRow``.
            self._writer.resolve(
                (
                    stream.stream_id,
                    event_id,
                    subscriber.name,
                    state,
                    reason,
                    tuple(records),
                    subscriber.serial,
                )
            )
        else:
            self._writer.resolve(
                (stream.stream_id, event_id, subscriber.name, state, reason, (), None)
            )

    def _write_failure(self, stream: _Stream, name: str, event_id: int, reason: str) -> None:
        """Fail ``name``'s delivery of an event it will never be handed (or never finish)."""
        self._writer.resolve((stream.stream_id, event_id, name, FAILED, reason, (), None))

    def _overflowed(self, stream: _Stream, subscriber: _Subscriber) -> bool:
        """With ``overflow="fail"``, fail a subscriber whose queue is full (Airflow's rule)."""
        if self.overflow != "fail" or not subscriber.raw.full():
            return False
        self._force_fail(
            stream,
            subscriber,
            SubscriberOverflow(
                f"shared stream {stream.key!r} fell behind for trigger {subscriber.trigger_id}: "
                f"subscriber queue exceeded maxsize={self.max_subscriber_queue}"
            ),
            "subscriber queue overflow",
        )
        return True

    def _force_fail(
        self, stream: _Stream, subscriber: _Subscriber, error: BaseException, reason: str
    ) -> None:
        """Fail the subscriber in every event it owes and make its next pull raise ``error``."""
        subscriber.failed = True
        stream.snapshot = None
        subscriber.raw.fail(error)
        subscriber.window_events.clear()
        subscriber.window_records.clear()
        for event_id in [e for e, owed in stream.outstanding.items() if subscriber.name in owed]:
            self._resolve(stream, subscriber, event_id, FAILED, reason)
        stream.resume.set()

    def _detach(self, stream: _Stream, subscriber: _Subscriber, *, classify: bool) -> None:
        if subscriber.task is not None:
            subscriber.task.cancel()
        if classify and stream.ack_mode:
            for event_id in [
                e for e, owed in stream.outstanding.items() if subscriber.name in owed
            ]:
                if event_id == subscriber.window:
                    self._close_window(stream, subscriber)
                else:
                    self._resolve(
                        stream, subscriber, event_id, FAILED, "unsubscribed before pulling"
                    )
        subscriber.raw.items.clear()
        stream.resume.set()
        self._writer.after_pending(lambda _: self._end(subscriber, None))

    async def _enforce_timeouts(self, stream: _Stream) -> None:
        cadence = timeout_cadence(self.ack_timeout)
        while True:
            await asyncio.sleep(cadence)
            now = self._now()
            for event_id, owed in list(stream.outstanding.items()):
                if not is_expired(now, stream.broadcast_at[event_id], self.ack_timeout):
                    continue
                for name in list(owed):
                    subscriber = stream.subscribers.get(name)
                    if subscriber is None or subscriber.failed:
                        owed.pop(name, None)
                        self._write_failure(stream, name, event_id, "ack timeout")
                        continue
                    log.warning(
                        "Ack timeout; force-failing subscriber",
                        extra={"trigger_id": subscriber.trigger_id, "event_id": event_id},
                    )
                    self._force_fail(
                        stream,
                        subscriber,
                        AckTimeout(
                            f"shared stream {stream.key!r} trigger {subscriber.trigger_id} did not "
                            f"finish processing event {event_id} within {self.ack_timeout}s (still "
                            "on the event, or its trigger events not yet committed)"
                        ),
                        "ack timeout",
                    )
                if not owed:
                    self._settled(stream, event_id)

    # -- in-process committer -----------------------------------------------------------------

    async def _run_committer(self) -> None:
        assert self.committer is not None
        committer = self.committer
        while True:
            await wait_event(self._committer_wakeup, committer.poll_interval)
            self._committer_wakeup.clear()
            try:
                await committer.run_once(stream_ids=committer.local_stream_ids())
                while committer.more_ready():
                    await committer.run_once(stream_ids=committer.local_stream_ids())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("in-process committer pass failed")

"""``StreamGroup``: one shared stream key inside a manager — its subscribers, the events fanned out
to them and still owed, their binding windows, timeouts, and how its events arrive.

Events arrive one of two ways. The triggerer whose session holds the stream's consumer (the
*leader*) runs the producer: it records each event (Postgres takes the snapshot: every live
registration of the stream, on any triggerer) and hands it to its own subscribers. Any other
triggerer with subscribers on the stream (a *follower*) reads the events owed to its subscribers
from Postgres, as they are recorded, and hands them out the same way; it takes over the
producer when the leader's session ends. Resolutions are written by whichever triggerer runs the
subscriber. (Airflow's ``_SharedStreamGroup`` is the in-memory model of this class.)

Here: the group's state and lifecycle (joining, leaving, failures, timeouts, stopping). Per event,
as functions of the group bound as its methods: ``fanout`` (recorded events to the subscribers'
queues, flow control) and ``delivery`` (filters, windows, trigger events, resolutions).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from outbox import delivery, fanout
from outbox.codec import Codec
from outbox.core import FAILED, canonical_json, is_expired, storable_key, timeout_cadence
from outbox.errors import OutboxError
from outbox.protocol import AckTimeout, _Binding, to_json
from outbox.subscriber import RawQueue

if TYPE_CHECKING:
    from collections.abc import Hashable, Sequence

    from outbox.committer import LaneCommitter
    from outbox.protocol import SharedStreamProducer
    from outbox.store import EventToRecord, OutboxStore
    from outbox.subscriber import Subscriber
    from outbox.triggers import ShareableTrigger, TriggerEvent
    from outbox.writer import Writer

__all__ = ("GroupHost", "StreamGroup", "SubscriberOverflow")

log = logging.getLogger("outbox.manager")


class SubscriberOverflow(Exception):
    """A subscriber's queue exceeded its bound (only with ``overflow="fail"``)."""


class LostProducer(OutboxError):
    """Another triggerer runs the stream's producer now (this one's session lapsed)."""


class GroupHost(Protocol):
    """What a group needs from the manager that owns it."""

    @property
    def store(self) -> OutboxStore: ...

    @property
    def writer(self) -> Writer: ...

    committer: LaneCommitter | None
    ack_timeout: float
    max_subscriber_queue: int
    max_trigger_events_per_event: int
    cohort_grace_period: float
    overflow: Literal["pause", "fail"]
    record_batch: int
    follow_interval: float
    persist_gated: bool

    def now(self) -> float: ...

    @property
    def session_id(self) -> int | None: ...

    async def session(self) -> int: ...

    def group_ended(self, group: StreamGroup) -> None: ...

    def release(self, subscriber: Subscriber, error: BaseException | None) -> None:
        """End the subscriber's output (with ``error``): nothing is handed to it after."""

    def holds_elsewhere(self, group: StreamGroup) -> bool:
        """Whether another group of this manager has the same stream (a fresh one for the key
        started while this one finishes)."""


@dataclass(slots=True, eq=False)
class StreamGroup:
    host: GroupHost
    key: Hashable
    key_json: str
    trigger_class: type[Any]
    class_path: str
    kwargs: dict[str, Any]
    kwargs_json: str
    ack_mode: bool
    where: str
    subscribers: dict[str, Subscriber] = field(default_factory=dict)
    # Events handed to subscribers here that some of them still owe: the names of those
    # subscribers (a dict used as a set: holding only strings and None, it is never tracked by
    # the cyclic GC, which a set always is: fewer collections, end to end within noise, fifth
    # pass in bench/results/history.md), and when each event was broadcast.
    outstanding: dict[int, dict[str, None]] = field(default_factory=dict)
    broadcast_at: dict[int, float] = field(default_factory=dict)
    lane_ids: dict[str, int] = field(default_factory=dict)
    lane_cache: dict[tuple[type, Any], int] = field(default_factory=dict)
    stream_id: int = 0
    producer: SharedStreamProducer | None = None
    # Whether the in-process committer advances through ``producer``: from its stream's first
    # item on (a producer may open its broker connection in ``open_stream``).
    advancing: bool = False
    role: Literal["leader", "follower"] | None = None
    staged: list[EventToRecord] = field(default_factory=list)
    staged_raw: list[Any] = field(default_factory=list)
    flush_scheduled: bool = False
    in_flight: int = 0
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when another triggerer recorded events for this stream, or released its producer.
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    poll_task: asyncio.Task[None] | None = None
    timeout_task: asyncio.Task[None] | None = None
    # Tells the producer where the committer recorded the stream held (``describe_hold``).
    hold_reports: asyncio.Task[None] | None = None
    catching_up: asyncio.Task[None] | None = None
    # What the next catch-up looks for: events up to this id, and these redelivered ones.
    catch_up_upto: int | None = None
    catch_up_events: set[int] = field(default_factory=set)
    # The highest event id this group recorded and handed out.
    last_recorded: int = 0
    # Whether what this group records is owed to subscribers on other triggerers too.
    owed_elsewhere: bool = False
    codec: Codec | None = None
    terminated: bool = False
    stopping: bool = False
    registering: bool = False
    # What was handed out from Postgres (a follower's events, catch-ups): the highest event id
    # read as a follower, the events handed out so and still owed here, and the deliveries of
    # those resolved here whose commit has not been seen yet (Postgres still shows them
    # pending: a look now must not hand them out again).
    followed_through: int = 0
    last_seen: int = 0
    from_postgres: set[int] = field(default_factory=set)
    settling: set[tuple[int, str]] = field(default_factory=set)
    # While something here reads what is owed from Postgres (a follower, a catch-up), every
    # resolution is remembered as settling: its commit may come after the read.
    looking: int = 0
    consumer_released: bool = False
    # Registrations of subscribers that left, until they are removed: events recorded for them
    # meanwhile are failed at once rather than left for the sweep.
    departed: dict[int, str] = field(default_factory=dict)
    # Trigger events yielded outside any window before the stream row exists (a filter may
    # yield before it pulls): stored as soon as the stream has its id.
    early_unbound: list[tuple[Subscriber, str, TriggerEvent]] = field(default_factory=list)

    @classmethod
    def build(cls, host: GroupHost, key: Hashable, trigger: ShareableTrigger) -> StreamGroup:
        from outbox.triggers import is_ack_mode

        key_json = storable_key(
            canonical_json(key, what="shared stream key"), what="shared stream key"
        )
        class_path, kwargs = trigger.serialize()
        storable_key(class_path, what=f"stream {key!r}: trigger class path")
        kwargs_json = to_json(kwargs, what=f"stream {key!r}: trigger kwargs of {class_path}")
        return cls(
            host=host,
            key=key,
            key_json=key_json,
            trigger_class=type(trigger),
            class_path=class_path,
            kwargs=kwargs,
            kwargs_json=kwargs_json,
            ack_mode=is_ack_mode(type(trigger)),
            where=f"stream {key!r}",
        )

    # -- subscribers joining and leaving ------------------------------------------------------

    def add(self, subscriber: Subscriber) -> None:
        subscriber.raw = RawQueue(self.host.max_subscriber_queue, self.resume.set)
        subscriber.what_trigger_event = f"{self.where}: trigger event of subscriber "
        subscriber.what_trigger_event += str(subscriber.trigger_id)
        subscriber.binding = _Binding(lambda: self.reject(subscriber))
        if self.host.persist_gated:
            subscriber.gates = {}
        self.subscribers[subscriber.name] = subscriber
        if self.registering:
            self._register_later(subscriber)
        if self.poll_task is None:
            self.poll_task = asyncio.get_running_loop().create_task(
                self._run(), name=f"shared-stream-poll[{self.key!r}]"
            )

    def _register_later(self, subscriber: Subscriber) -> None:
        """Register a subscriber that joins a running stream, in order with the recordings: the
        events staged before it joined are not owed to it, those staged after are."""

        def registered(result: Any) -> None:
            if isinstance(result, BaseException):
                self.force_fail(subscriber, result, "could not register")
                return
            ids, moved = result
            if subscriber.detached or subscriber.failed or self.terminated:
                self.host.writer.unregister(list(ids.values()))
                return
            subscriber.registration = ids.get(subscriber.name)
            if moved:
                self.catch_up()

        self.host.writer.register(self.stream_id, [subscriber.name], registered)

    def catch_up(self, event_ids: Sequence[int] | None = None) -> None:
        """Hand out, from Postgres, what these subscribers are owed and not handed yet: what an
        earlier registration of theirs was owed, moved to them as they joined again (recorded
        before now: what this group records from now on it hands out as it records it), or
        the given redelivered events."""
        from outbox.feed import catch_up

        if event_ids is None:
            self.catch_up_upto = max(self.catch_up_upto or 0, self.last_recorded)
            # (A follower records nothing: for it the bound leaves nothing out.)
        else:
            self.catch_up_events.update(event_ids)
            # Resolved from now on, they are known as settling until the commit shows.
            self.from_postgres.update(event_ids)
        if self.catching_up is None or self.catching_up.done():
            self.catching_up = asyncio.get_running_loop().create_task(
                catch_up(self), name=f"shared-stream-catch-up[{self.key!r}]"
            )

    def decode_raw(self, text: str | None) -> Any:
        """A raw event as stored (for a follower, which did not read it from the broker):
        classes in it are rebuilt from the modules of the stream's trigger and producer."""
        if text is None:
            return None
        if self.codec is None:
            modules = [self.trigger_class.__module__]
            if self.producer is not None:
                inner = getattr(self.producer, "inner", self.producer)
                modules.append(type(inner).__module__)
            self.codec = Codec(modules)
        return self.codec.decode(text)

    def detach(self, subscriber: Subscriber, *, classify: bool) -> None:
        """The subscriber stops here. With ``classify`` it leaves the stream (unsubscribe): an
        event it pulled resolves ``acked`` (once its trigger events commit), events it never
        pulled ``failed``; it is in no later snapshot, and its registration goes once its
        resolutions are committed. Without (the triggerer stops, or the subscriber joined on
        another one), what it owes stays owed to it: it may join again, here or elsewhere."""
        subscriber.detached = True
        if self.subscribers.get(subscriber.name) is subscriber:
            del self.subscribers[subscriber.name]
        if subscriber.task is not None:
            subscriber.task.cancel()
        if classify and self.ack_mode:
            gates = subscriber.gates or {}
            for event_id in [e for e, owed in self.outstanding.items() if subscriber.name in owed]:
                if event_id == subscriber.window:
                    self.close_window(subscriber)
                elif event_id not in gates:
                    self.resolve(subscriber, event_id, FAILED, "unsubscribed before pulling")
                # else pulled, its trigger events not yet confirmed: acked once they are
        subscriber.raw.items.clear()
        self.resume.set()
        if classify:
            self._retire(subscriber, end_output=not self.host.persist_gated)
        elif not self.host.persist_gated:
            self.host.writer.after_pending(lambda _: self.host.release(subscriber, None))

    def _retire(self, subscriber: Subscriber, *, end_output: bool) -> None:
        """Keep the subscriber's registration out of new snapshots now, and remove it once its
        resolutions are committed (what it still owes then is failed by the sweep)."""
        registration = subscriber.registration
        writer = self.host.writer
        if registration is not None and not subscriber.failed:
            writer.exclude([registration])
        if registration is not None:
            self.departed[registration] = subscriber.name
        subscriber.registration = None

        def after_resolutions(_: Any) -> None:
            if end_output:
                self.host.release(subscriber, None)
            if registration is None:
                return
            if subscriber.gates:
                # Inside Airflow: events it moved past resolve once Airflow confirms them;
                # the registration stays until then (or until they time out).
                subscriber.leaving = registration
                return
            writer.unregister([registration])
            self.departed.pop(registration, None)

        writer.after_pending(after_resolutions)

    # -- a subscriber's deliveries: its filter, binding windows, trigger events, resolutions ------
    # (``outbox/delivery.py``: functions bound as methods, a call costs what a method's does)
    raw_stream = delivery.raw_stream
    run_filter = delivery.run_filter
    close_window = delivery.close_window
    complete = delivery.complete
    can_bind = delivery.can_bind
    reject = delivery.reject
    bind = delivery.bind
    log_unkept = delivery.log_unkept
    on_trigger_event = delivery.on_trigger_event
    _store_unbound = delivery._store_unbound
    resolve = delivery.resolve
    write_failure = delivery.write_failure
    settled = delivery.settled
    delivered = delivery.delivered

    # -- failures ----------------------------------------------------------------------------

    def overflowed(self, subscriber: Subscriber) -> bool:
        """With ``overflow="fail"``, fail a subscriber whose queue is full (Airflow's rule)."""
        if self.host.overflow != "fail" or not subscriber.raw.full():
            return False
        self.force_fail(
            subscriber,
            SubscriberOverflow(
                f"shared stream {self.key!r} fell behind for trigger {subscriber.trigger_id}: "
                f"subscriber queue exceeded maxsize={self.host.max_subscriber_queue}"
            ),
            "subscriber queue overflow",
        )
        return True

    def force_fail(self, subscriber: Subscriber, error: BaseException, reason: str) -> None:
        """Fail the subscriber in every event it owes, keep it out of later snapshots, and make
        its next pull raise ``error`` (its output ends with it). The same trigger id may then
        subscribe again."""
        if subscriber.failed:
            return
        subscriber.failed = True
        subscriber.raw.fail(error)
        if subscriber.confirmed is not None:
            subscriber.confirmed.set()
        subscriber.window_events.clear()
        subscriber.window_records.clear()
        if subscriber.gates is not None:
            subscriber.gates.clear()
        for event_id in [e for e, owed in self.outstanding.items() if subscriber.name in owed]:
            self.resolve(subscriber, event_id, FAILED, reason or "subscriber failed")
        if subscriber.registration is not None and self.stream_id:
            self.host.writer.exclude([subscriber.registration])
        self.resume.set()

    def fail(self, error: BaseException) -> None:
        """The stream ends for a failure: every subscriber gets ``error`` on its next pull, and
        what they still owe is failed (the broker redelivers it; a fresh group for the key
        continues the same lanes)."""
        if self.terminated:
            return
        self.terminated = True
        self.host.group_ended(self)
        if self.poll_task is not None and self.poll_task is not asyncio.current_task():
            # Its producer is closed (a consumer left in its group would keep its partitions
            # from the stream that replaces this one).
            self.poll_task.cancel()
        for subscriber in self.subscribers.values():
            subscriber.raw.fail(error)
            if self.stream_id:
                self._retire(subscriber, end_output=False)
        reason = f"stream failed: {type(error).__name__}: {error}"[:500]
        for event_id, owed in list(self.outstanding.items()):
            for name in sorted(owed):
                self.write_failure(name, event_id, reason)
        self.outstanding.clear()
        self.broadcast_at.clear()

    async def enforce_timeouts(self) -> None:
        ack_timeout = self.host.ack_timeout
        cadence = timeout_cadence(ack_timeout)
        while True:
            await asyncio.sleep(cadence)
            now = self.host.now()
            for event_id, owed in list(self.outstanding.items()):
                if not is_expired(now, self.broadcast_at[event_id], ack_timeout):
                    continue
                for name in list(owed):
                    subscriber = self.subscribers.get(name)
                    if subscriber is None or subscriber.failed:
                        owed.pop(name, None)
                        self.write_failure(name, event_id, "ack timeout")
                        continue
                    log.warning(
                        "Ack timeout; force-failing subscriber",
                        extra={"trigger_id": subscriber.trigger_id, "event_id": event_id},
                    )
                    self.force_fail(
                        subscriber,
                        AckTimeout(
                            f"shared stream {self.key!r} trigger {subscriber.trigger_id} did not "
                            f"finish processing event {event_id} within {ack_timeout}s (still on "
                            "the event, or its trigger events not yet committed)"
                        ),
                        "ack timeout",
                    )
                if not owed:
                    self.settled(event_id)

    # -- how events arrive ---------------------------------------------------------------------

    async def _run(self) -> None:
        from outbox.feed import run_group

        await run_group(self)

    # Fan-out and flow control (``outbox/fanout.py``, bound the same way).
    flush_staged = fanout.flush_staged
    on_recorded = fanout.on_recorded
    broadcast = fanout.broadcast
    fan_out_fast = fanout.fan_out_fast
    must_pause = fanout.must_pause
    room = fanout.room
    wait_for_room = fanout.wait_for_room

    async def stop(self) -> None:
        if self.poll_task is not None:
            self.poll_task.cancel()
            await await_task(self.poll_task)


async def await_task(task: asyncio.Task[Any] | None) -> None:
    """Wait for ``task`` to end, whatever it ended with (a cancellation of the waiter itself
    propagates)."""
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


async def uncancelled(operation: Any) -> Any:
    """Await one database call that a stop must not interrupt (cancelling asyncpg in the middle
    of a statement loses the connection): on cancellation let it finish, then re-raise."""
    task = asyncio.ensure_future(operation)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise

"""``StreamGroup``: one shared stream key inside a manager — its subscribers, the events fanned out
to them and still owed, their binding windows, timeouts, and how its events arrive.

Events arrive one of two ways. The triggerer whose session holds the stream's consumer (the
*leader*) runs the producer: it records each event (Postgres takes the snapshot: every live
registration of the stream, on any triggerer) and hands it to its own subscribers. Any other
triggerer with subscribers on the stream (a *follower*) reads the events owed to its subscribers
from Postgres, as they are recorded, and hands them out the same way; it takes over the
producer when the leader's session ends. Resolutions are written by whichever triggerer runs the
subscriber. (Airflow's ``_SharedStreamGroup`` is the in-memory model of this class.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from outbox.codec import Codec, encode
from outbox.core import (
    ACKED,
    BROKER_REDELIVERS,
    FAILED,
    REGISTRATION_GONE,
    REJECTED,
    canonical_json,
    is_expired,
    storable_key,
    timeout_cadence,
)
from outbox.errors import OutboxError
from outbox.protocol import AckTimeout, _Binding, _current_binding, to_json
from outbox.subscriber import PersistGate, RawQueue, Subscriber, fast_events, raw_events
from outbox.triggers import TriggerEvent

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Hashable, Sequence

    from outbox.committer import LaneCommitter
    from outbox.protocol import SharedStreamProducer
    from outbox.store import EventToRecord, OutboxStore
    from outbox.triggers import ShareableTrigger
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
    # the cyclic GC, which a set always is), and when each event was broadcast.
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

    def raw_stream(self, subscriber: Subscriber) -> AsyncIterator[Any]:
        """What the subscriber's filter reads."""
        if self.ack_mode:
            return raw_events(subscriber, self.close_window)
        return fast_events(subscriber)

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

    # -- binding windows and resolution ------------------------------------------------------

    def close_window(self, subscriber: Subscriber) -> None:
        event_id = subscriber.window
        assert event_id is not None
        subscriber.window = None
        if subscriber.gates is not None:
            gate = subscriber.gates.get(event_id)
            if gate is not None:
                gate.closed = True
                self.complete(subscriber, event_id, gate)
            elif not subscriber.window_rejected:
                self.resolve(subscriber, event_id, ACKED, None)  # it bound nothing: filtered
            subscriber.window_records.clear()
            subscriber.window_events.clear()
            return
        events, records = subscriber.window_events, subscriber.window_records
        if not subscriber.window_rejected:
            self.resolve(subscriber, event_id, ACKED, None, records, events)
        if records:
            records.clear()
            events.clear()

    def complete(self, subscriber: Subscriber, event_id: int, gate: PersistGate) -> None:
        """Inside Airflow: resolve ``acked`` once moved past and every bound event confirmed."""
        if gate.closed and not gate.unconfirmed:
            assert subscriber.gates is not None
            subscriber.gates.pop(event_id, None)
            self.resolve(subscriber, event_id, ACKED, None, gate.records)
            if subscriber.leaving is not None and not subscriber.gates:
                registration, subscriber.leaving = subscriber.leaving, None
                writer = self.host.writer
                writer.after_pending(lambda _: writer.unregister([registration]))

    def can_bind(self, subscriber: Subscriber) -> bool:
        """Inside Airflow: whether a trigger event yielded now binds to an event (the open
        window's, while the subscriber still owes it)."""
        event_id = subscriber.window
        if event_id is None or subscriber.window_rejected or subscriber.gates is None:
            return False
        owed = self.outstanding.get(event_id)
        return owed is not None and subscriber.name in owed

    def reject(self, subscriber: Subscriber) -> None:
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
        if subscriber.gates is not None:
            subscriber.gates.pop(event_id, None)
        self.resolve(subscriber, event_id, REJECTED, "rejected by the filter")

    def bind(self, subscriber: Subscriber, seq: int) -> None:
        """Inside Airflow: bind a trigger event (Airflow's ``seq``) to the open window's event
        (``can_bind`` said there is one), with what the filter yielded since the last bind."""
        event_id = subscriber.window
        assert event_id is not None and subscriber.gates is not None
        gate = subscriber.gates.get(event_id)
        if gate is None:
            gate = subscriber.gates[event_id] = PersistGate()
        gate.unconfirmed.add(seq)
        subscriber.unconfirmed += 1
        if subscriber.window_records:
            gate.records.extend(subscriber.window_records)
            subscriber.window_records.clear()
            subscriber.window_events.clear()

    def log_unkept(self, subscriber: Subscriber, error: Exception) -> None:
        """Inside Airflow: a trigger event that outbox cannot keep as a record (Airflow stores
        it all the same)."""
        log.warning(
            "trigger event not kept in the outbox (%s); Airflow stores it",
            str(error).splitlines()[0][:300] if str(error) else type(error).__name__,
            extra={"trigger_id": subscriber.trigger_id, "stream": repr(self.key)},
        )

    def on_trigger_event(self, subscriber: Subscriber, trigger_event: Any) -> None:
        """A trigger event the subscriber's filter yielded (outbox's API, or Airflow's runner
        seen through the filter): kept with the open window's event, or stored on its own."""
        # Airflow's own TriggerEvent (a pydantic model) is welcome too: only .payload is used.
        if not isinstance(trigger_event, TriggerEvent) and not hasattr(trigger_event, "payload"):
            raise TypeError(
                f"{self.where}: subscriber {subscriber.trigger_id} yielded "
                f"{type(trigger_event).__name__}, expected TriggerEvent"
            )
        payload_json = encode(trigger_event.payload, what=subscriber.what_trigger_event)
        if subscriber.failed:
            return
        if self.ack_mode and subscriber.window is not None:
            if subscriber.window_rejected:
                if subscriber.gates is None:
                    log.warning(
                        "trigger event yielded after reject_shared_stream_event; not stored",
                        extra={"trigger_id": subscriber.trigger_id, "event_id": subscriber.window},
                    )
                return
            if len(subscriber.window_records) >= self.host.max_trigger_events_per_event:
                # They all commit in one transaction with the event's resolution: bound it.
                raise RuntimeError(
                    f"{self.where}: subscriber {subscriber.trigger_id} yielded more than "
                    f"{self.host.max_trigger_events_per_event} trigger events for one raw event; "
                    "raise max_trigger_events_per_event or split the work"
                )
            subscriber.window_events.append(trigger_event)
            subscriber.window_records.append(payload_json)
            return
        if subscriber.gates is not None:
            return  # inside Airflow, Airflow stores what is not bound to an event
        if not self.stream_id:
            self.early_unbound.append((subscriber, payload_json, trigger_event))
            return
        self._store_unbound(subscriber, payload_json, trigger_event)

    def _store_unbound(
        self, subscriber: Subscriber, payload_json: str, trigger_event: TriggerEvent
    ) -> None:
        def stored(result: Any) -> None:
            if isinstance(result, BaseException):
                self.force_fail(subscriber, _one_line(self.where, subscriber, result), "")
            elif result is not False:
                subscriber.emit(trigger_event)

        self.host.writer.store_unbound(self.stream_id, subscriber.name, payload_json, stored)

    def resolve(
        self,
        subscriber: Subscriber,
        event_id: int,
        state: str,
        reason: str | None,
        records: Sequence[str] | None = None,
        events: list[TriggerEvent] | None = None,
    ) -> None:
        """Queue ``subscriber``'s resolution of ``event_id`` unless it resolved it already;
        ``events`` (with their JSON ``records``) are handed over once it commits."""
        owed = self.outstanding.get(event_id)
        if owed is None or subscriber.name not in owed:
            return
        del owed[subscriber.name]
        if self.looking or event_id in self.from_postgres:
            self.settling.add((event_id, subscriber.name))
        if not owed:
            self.settled(event_id)
        if records:
            if events:
                subscriber.uncommitted.extend(events)
            # A plain tuple (see ``outbox.store.Resolution``), fields as in ``ResolutionRow``.
            self.host.writer.resolve(
                (
                    self.stream_id,
                    event_id,
                    subscriber.name,
                    state,
                    reason,
                    tuple(records),
                    subscriber.serial if events else None,
                )
            )
        else:
            self.host.writer.resolve(
                (self.stream_id, event_id, subscriber.name, state, reason, (), None)
            )

    def write_failure(self, name: str, event_id: int, reason: str) -> None:
        """Fail ``name``'s delivery of an event it will never be handed (or never finish)."""
        self.host.writer.resolve((self.stream_id, event_id, name, FAILED, reason, (), None))

    def settled(self, event_id: int) -> None:
        """Nobody here owes ``event_id`` any more."""
        self.outstanding.pop(event_id, None)
        self.broadcast_at.pop(event_id, None)
        self.from_postgres.discard(event_id)

    def delivered(self, subscriber: Subscriber, resolution: Any, result: Any, n: int) -> None:
        """The writer's report on a resolution of ``subscriber`` carrying ``n`` trigger events:
        hand them over if it won; if another resolution of the delivery won (the ack timeout by
        the database clock, or its triggerer's session ended), the subscriber gets
        ``AckTimeout``; if it could not be stored, the subscriber fails with that error."""
        uncommitted = subscriber.uncommitted
        if result is True:
            emit = subscriber.emit
            for _ in range(n):
                emit(uncommitted.popleft())
            return
        for _ in range(min(n, len(uncommitted))):
            uncommitted.popleft()
        event_id = resolution[1]
        if isinstance(result, BaseException):
            # Still pending in the outbox: fail it, so that its lane moves on.
            self.write_failure(subscriber.name, event_id, "its trigger events could not be stored")
            self.force_fail(subscriber, _one_line(self.where, subscriber, result), "")
            return
        asyncio.get_running_loop().create_task(
            self._lost(subscriber, event_id), name=f"shared-stream-lost[{subscriber.name}]"
        )

    async def _lost(self, subscriber: Subscriber, event_id: int) -> None:
        """Another resolution of a delivery won over the subscriber's: it joined on another
        triggerer meanwhile (it has moved: it leaves this one, quietly), or its delivery was
        failed by the ack timeout by the database clock or with this triggerer's session (it
        gets ``AckTimeout``), or failed because the broker delivers it again (it goes on)."""
        registration = subscriber.registration
        store = self.host.store
        try:
            current = await store.registration_of(self.stream_id, subscriber.name)
            reason = await store.failure_reason(event_id, subscriber.name)
        except Exception:
            current, reason = registration, None
        if registration is not None and current is not None and current != registration:
            log.info(
                "subscriber joined the stream on another triggerer; it leaves this one",
                extra={"trigger_id": subscriber.trigger_id, "stream": repr(self.key)},
            )
            if self.subscribers.get(subscriber.name) is subscriber:
                subscriber.registration = None  # no longer this triggerer's to remove
                self.detach(subscriber, classify=False)
            return
        if reason == BROKER_REDELIVERS or (
            reason == REGISTRATION_GONE and current is not None and current == registration
        ):
            # Not this subscriber's failure (``BROKER_REDELIVERS``, ``REGISTRATION_GONE``).
            log.info(
                "event %s was failed for trigger %s (%s); it goes on",
                event_id,
                subscriber.trigger_id,
                reason,
                extra={"stream": repr(self.key)},
            )
            return
        self.force_fail(
            subscriber,
            AckTimeout(
                f"shared stream {self.key!r} trigger {subscriber.trigger_id} did not finish "
                f"processing event {event_id} in time: its delivery was failed first "
                f"({reason or 'by the ack timeout of the database clock'}); its trigger events "
                "were not stored"
            ),
            "ack timeout",
        )

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

    def must_pause(self) -> bool:
        if self.in_flight >= 4 * self.host.record_batch:
            return True
        if self.host.overflow == "fail":
            return False
        bound = self.host.max_subscriber_queue - self.in_flight
        for subscriber in self.subscribers.values():
            if len(subscriber.raw.items) >= bound and not subscriber.failed:
                return True
        return False

    def room(self) -> int:
        """How many more events every healthy subscriber's queue can take."""
        queued = [len(s.raw.items) for s in self.subscribers.values() if not s.failed]
        return self.host.max_subscriber_queue - max(queued, default=0)

    async def wait_for_room(self) -> None:
        while self.must_pause():
            if self.staged:
                self.flush_staged()
            self.resume.clear()
            await self.resume.wait()

    def flush_staged(self) -> None:
        self.flush_scheduled = False
        if not self.staged or self.terminated:
            return
        events, raws = self.staged, self.staged_raw
        self.staged, self.staged_raw = [], []
        self.host.writer.record_events(
            events, lambda result: self.on_recorded(events, raws, result)
        )

    def on_recorded(self, events: list[EventToRecord], raws: list[Any], result: Any) -> None:
        self.in_flight -= len(events)
        self.resume.set()
        if isinstance(result, BaseException):
            if not self.terminated:
                self.fail(result)
            return
        if self.terminated:
            # The stream failed (the database was away longer than outage_limit, say): leave
            # these pending. The broker never advanced past them, so the stream that replaces
            # this one reads them again; what this one's registrations were owed is failed by
            # the sweep.
            return
        if self.stopping:
            # Nobody will be handed these events any more: fail them now rather than leave them
            # pending in the outbox, where they would hold up their lanes until a sweep.
            for event in events:
                for name in event.deliver_to:
                    subscriber = self.subscribers.get(name)
                    if subscriber is not None and subscriber.registration == event.owners.get(name):
                        self.write_failure(name, event.event_id, "stream stopped before broadcast")
            return
        if events:
            # Owed to subscribers elsewhere: their resolutions (which wake this committer by
            # notification) may be what completes an event.
            owners = events[-1].owners
            self.owed_elsewhere = any(
                (s := self.subscribers.get(name)) is None or s.registration != registration
                for name, registration in owners.items()
            )
        fresh = []
        reused = []
        for event, raw in zip(events, raws, strict=True):
            if event.event_id > self.last_recorded:
                self.last_recorded = event.event_id
            if event.reused:
                reused.append(event.event_id)
            else:
                fresh.append((event.event_id, raw, event.deliver_to, event.owners))
        self.broadcast(fresh)
        if reused:
            # A redelivery of an event still pending: whoever here owes it may have resolved it
            # a moment ago (not committed yet); handed out once what is queued has committed,
            # to those Postgres then says still owe it.
            self.catch_up(reused)

    def broadcast(self, events: Sequence[tuple[int, Any, Sequence[str], Any]]) -> None:
        """Hand recorded events ``(event id, raw, owed by, owners)`` to the subscribers here
        that are owed them through their own registration."""
        now = self.host.now()
        may_overflow = self.host.overflow == "fail"
        subscribers = self.subscribers
        outstanding = self.outstanding
        for event_id, raw, owed_by, owners in events:
            if not owed_by:
                continue
            owed = outstanding.get(event_id)
            targets: list[Subscriber] = []
            for name in owed_by:
                subscriber = subscribers.get(name)
                if subscriber is None or subscriber.registration != owners.get(name):
                    if self.departed.get(owners.get(name, -1)) == name:
                        self.write_failure(name, event_id, "unsubscribed before broadcast")
                    continue  # owed through another registration: another triggerer's
                if owed is not None and name in owed:
                    continue  # handed out already (a redelivery while it is still on it)
                if subscriber.failed:
                    self.write_failure(name, event_id, "subscriber failed before broadcast")
                    continue
                if owed is None:
                    owed = outstanding[event_id] = {}
                owed[name] = None
                targets.append(subscriber)
            if not targets:
                continue
            self.broadcast_at[event_id] = now
            delivery = (raw, event_id)  # one tuple, handed to every subscriber
            for subscriber in targets:
                if may_overflow and self.overflowed(subscriber):
                    continue
                subscriber.raw.put(delivery)
            if not owed:
                self.settled(event_id)

    async def fan_out_fast(self, raw: Any) -> None:
        for subscriber in list(self.subscribers.values()):
            if subscriber.failed:
                continue
            if self.overflowed(subscriber):
                continue
            subscriber.raw.put((raw, -1))
        await self.wait_for_room()

    async def run_filter(self, subscriber: Subscriber) -> None:
        """Run the subscriber's filter (outbox's API): trigger events are kept with their
        windows; a filter that raises fails the subscriber alone."""
        if self.ack_mode:
            # Set once, in this task's own context (tasks it starts inherit it): whether a reject
            # falls inside a window is the subscriber's state to tell.
            _current_binding.set(subscriber.binding)
        try:
            async for trigger_event in subscriber.trigger.filter_shared_stream(
                self.raw_stream(subscriber)
            ):
                self.on_trigger_event(subscriber, trigger_event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
            if self.ack_mode and subscriber.window is not None and not subscriber.failed:
                self.resolve(subscriber, subscriber.window, FAILED, f"filter raised: {exc!r}"[:500])
                subscriber.window = None
            self.force_fail(subscriber, error, "its filter raised")
            self.host.writer.after_pending(lambda _: self.host.release(subscriber, error))
            return
        self.host.writer.after_pending(lambda _: self.host.release(subscriber, None))

    async def stop(self) -> None:
        if self.poll_task is not None:
            self.poll_task.cancel()
            await await_task(self.poll_task)


def _one_line(where: str, subscriber: Subscriber, error: BaseException) -> BaseException:
    """What a subscriber is told when its trigger events could not be stored: one line, no SQL,
    no payload."""
    if isinstance(error, OutboxError):
        return error
    reason = str(getattr(error, "orig", None) or error).strip().splitlines()
    first = reason[0][:300] if reason else type(error).__name__
    return OutboxError(
        f"{where}: trigger events of subscriber {subscriber.trigger_id} could not be stored "
        f"({type(error).__name__}: {first}); its delivery failed, the event goes to the others"
    )


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

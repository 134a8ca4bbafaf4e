"""``SharedStreamManager``: one producer per stream key, fanned out to many subscribers, with
every event recorded and every resolution committed together with its trigger events.

The manager routes (one ``StreamGroup`` per stream key, as Airflow's manager keeps one group per
key); the group holds the stream's state. The manager owns what its groups share: the
group-committing ``Writer``, the triggerer's session (renewed while the process lives: who is
owed an event is decided from the sessions and registrations Postgres holds), a listener for
other triggerers' recordings, and, by default, an in-process ``LaneCommitter`` that advances the
streams whose producer this process runs.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

from outbox._aio import wait_event
from outbox.committer import LaneCommitter
from outbox.errors import OutboxError
from outbox.group import LostProducer, StreamGroup, SubscriberOverflow, await_task
from outbox.store import OWNER, RECORDS, holds_separator
from outbox.subscriber import End, RawQueue, Subscriber, output_of
from outbox.writer import Writer, error_line

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Hashable

    from outbox.store import OutboxStore, Resolution
    from outbox.triggers import ShareableTrigger, TriggerEvent

__all__ = ("SessionLost", "SharedStreamManager", "SubscriberOverflow")

log = logging.getLogger("outbox.manager")

DEFAULT_ACK_TIMEOUT = 300.0
DEFAULT_SUBSCRIBER_QUEUE_MAX = 1024


class SessionLost(OutboxError):
    """This triggerer's session ended (no heartbeat reached the database in time): what its
    subscribers were owed was failed; subscribe again."""


class SharedStreamManager:
    """Fans one producer per stream key out to its subscribers, durably.

    :param store: the ``OutboxStore`` that records events, resolutions and trigger events.
    :param ack_timeout: seconds from broadcast within which a subscriber must resolve an event;
        past it the subscriber is failed for that event and gets ``AckTimeout`` (a delivery it
        took over by joining again, whose ack timeout counted from the recording ran out, fails
        without failing it: ``outbox.core.after_lost_delivery``).
    :param max_subscriber_queue: bound on a subscriber's unconsumed raw events.
    :param cohort_grace_period: seconds a new stream waits before polling, so triggers that
        subscribe together after a restart (on any triggerer) are all in the first event's
        snapshot.
    :param clock: monotonic seconds, injectable for tests.
    :param overflow: ``"pause"`` (default) stops pulling from the producer while a subscriber's
        queue is full; ``"fail"`` fails the subscriber instead (Airflow's behaviour).
    :param run_committer: run a ``LaneCommitter`` in-process that advances the streams whose
        producer this manager runs, with those producer instances (needed when acks must come
        from the consuming connection), and fails deliveries nobody can make any more. Turn it
        off when a separate ``outbox committer`` advances them.
    :param write_batch: most items one group-committed transaction carries.
    :param max_trigger_events_per_event: most trigger events a subscriber may yield for one raw
        event (they commit in one transaction with its resolution); past it the subscriber
        fails for that event with a one-line error.
    :param outage_limit: seconds a write keeps retrying while the database is unreachable
        (backoff up to 2 s between attempts); past it the stream's subscribers get
        ``DatabaseUnavailable`` and may subscribe again.
    :param session_ttl: seconds this triggerer stays live in Postgres without a heartbeat
        (default: ``outage_limit``, at least 10); when it dies, what its subscribers were owed is
        failed, and another triggerer may take its producers over.
    :param follow_interval: seconds between looks at Postgres for events another triggerer
        recorded, when no notification comes.
    """

    persist_gated = False

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
        session_ttl: float | None = None,
        follow_interval: float = 1.0,
    ) -> None:
        if ack_timeout <= 0:
            raise ValueError(f"ack_timeout must be positive, got {ack_timeout!r}")
        if max_subscriber_queue < 1:
            raise ValueError(
                f"max_subscriber_queue must be at least 1, got {max_subscriber_queue!r}"
            )
        if overflow not in ("pause", "fail"):
            raise ValueError(f"overflow must be 'pause' or 'fail', got {overflow!r}")
        if session_ttl is not None and session_ttl <= 0:
            raise ValueError(f"session_ttl must be positive, got {session_ttl!r}")
        self._store = store
        self.ack_timeout = ack_timeout
        self.max_subscriber_queue = max_subscriber_queue
        self.max_trigger_events_per_event = max_trigger_events_per_event
        self.cohort_grace_period = cohort_grace_period
        self._now = clock or time.monotonic
        self.overflow: Literal["pause", "fail"] = overflow
        self.session_ttl = session_ttl if session_ttl is not None else max(10.0, outage_limit)
        self.follow_interval = follow_interval
        self._streams: dict[Hashable, StreamGroup] = {}
        self._serials = itertools.count(1)
        self._owners: dict[int, Subscriber] = {}  # by serial, until their output ends
        self._committer_wakeup = asyncio.Event()
        self._writer = Writer(
            store,
            max_batch=write_batch,
            on_commit=self._committer_wakeup.set,
            on_resolved=self._deliver,
            on_lost=self._on_lost_write,
            outage_limit=outage_limit,
        )
        self.record_batch = max(1, min(1000, write_batch))
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.committer: LaneCommitter | None = None
        if run_committer:
            options = {"owner": f"{self.owner}:committer", **(committer_options or {})}
            self.committer = LaneCommitter(store, **options)
        self._committer_task: asyncio.Task[None] | None = None
        self._session_id: int | None = None
        self._session_lock = asyncio.Lock()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._listener_task: asyncio.Task[None] | None = None

    # -- what groups use --------------------------------------------------------------------

    @property
    def store(self) -> OutboxStore:
        return self._store

    @property
    def writer(self) -> Writer:
        return self._writer

    def now(self) -> float:
        return self._now()

    @property
    def session_id(self) -> int | None:
        """This triggerer's session, if it has one now."""
        return self._session_id

    async def session(self) -> int:
        """This triggerer's session in Postgres (started on first use, renewed from then on)."""
        if self._session_id is not None:
            return self._session_id
        async with self._session_lock:
            if self._session_id is None:
                self._session_id = await self._writer.retry(
                    lambda: self._store.create_session(self.owner, self.session_ttl)
                )
                self._writer.session_id = self._session_id
                loop = asyncio.get_running_loop()
                if self._heartbeat_task is None or self._heartbeat_task.done():
                    self._heartbeat_task = loop.create_task(
                        self._heartbeat(), name="outbox-session-heartbeat"
                    )
                if self._listener_task is None or self._listener_task.done():
                    self._listener_task = loop.create_task(
                        self._listen(), name="outbox-triggerer-listener"
                    )
            return self._session_id

    def group_ended(self, group: StreamGroup) -> None:
        if self._streams.get(group.key) is group:
            del self._streams[group.key]

    def release(self, subscriber: Subscriber, error: BaseException | None) -> None:
        self._owners.pop(subscriber.serial, None)
        subscriber.emit(End(error))

    def holds_elsewhere(self, group: StreamGroup) -> bool:
        current = self._streams.get(group.key)
        return current is not None and current is not group and current.stream_id == group.stream_id

    # -- public API -------------------------------------------------------------------------

    def subscribe(
        self, *, trigger_id: Any, trigger: ShareableTrigger, key: Hashable | None = None
    ) -> AsyncIterator[TriggerEvent]:
        """Join ``trigger`` to the stream ``key`` (default ``trigger.shared_stream_key()``).

        Returns the subscriber's trigger events, each yielded only after it is committed to the
        outbox. The iterator ends after ``unsubscribe`` or ``stop_all``, and raises what failed
        the subscriber (``AckTimeout``, an overflow, the producer's error, its own filter's).
        A subscriber that failed may subscribe again with the same trigger id.
        """
        group, subscriber = self._join(trigger_id, trigger, key)
        subscriber.task = asyncio.get_running_loop().create_task(
            group.run_filter(subscriber),
            name=f"shared-stream-filter[{group.key!r}:{subscriber.name}]",
        )
        return output_of(subscriber)

    def _join(
        self, trigger_id: Any, trigger: ShareableTrigger, key: Hashable | None
    ) -> tuple[StreamGroup, Subscriber]:
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
        group = self._streams.get(key)
        if group is not None:
            existing = group.subscribers.get(name)
            if existing is not None:
                if not (existing.failed or existing.ended):
                    raise RuntimeError(
                        f"Trigger {trigger_id} already subscribed to shared stream {key!r}"
                    )
                group.detach(existing, classify=True)  # a failed subscriber comes back
        else:
            group = StreamGroup.build(self, key, trigger)
        subscriber = Subscriber(
            trigger_id=trigger_id,
            name=name,
            trigger=trigger,
            raw=RawQueue(self.max_subscriber_queue, group.resume.set),
            serial=next(self._serials),
            group=group,
        )
        self._owners[subscriber.serial] = subscriber
        self._streams[key] = group
        self._ensure_background()
        group.add(subscriber)
        return group, subscriber

    async def unsubscribe(self, trigger_id: Any, key: Hashable) -> None:
        """Leave the stream: an event the subscriber pulled resolves ``acked`` (with the trigger
        events it yielded), events it never pulled resolve ``failed``. The last subscriber to
        leave stops the stream, after its resolved events are advanced."""
        group = self._streams.get(key)
        if group is None:
            return
        subscriber = group.subscribers.get(str(trigger_id))
        if subscriber is None:
            return
        group.detach(subscriber, classify=True)
        last = not group.subscribers
        if last:
            del self._streams[key]
        await await_task(subscriber.task)
        if last:
            await group.stop()

    async def stop_all(self) -> None:
        """Stop every stream: filters are cancelled, what is resolved is committed and advanced,
        each producer is closed once; this triggerer's session ends, so that what its
        subscribers still owe fails at the next sweep (the broker redelivers it)."""
        groups = list(self._streams.values())
        self._streams.clear()
        for group in groups:
            for subscriber in list(group.subscribers.values()):
                group.detach(subscriber, classify=False)
        for group in groups:
            for subscriber in list(group.subscribers.values()):
                await await_task(subscriber.task)
            await group.stop()
        await self._writer.aclose()
        for task in (self._committer_task, self._listener_task, self._heartbeat_task):
            if task is not None:
                task.cancel()
                await await_task(task)
        self._committer_task = self._listener_task = self._heartbeat_task = None
        session, self._session_id = self._session_id, None
        if session is not None:
            try:
                await self._store.end_session(session)
            except Exception as exc:  # it expires by itself
                log.warning("could not end the triggerer session (%s)", error_line(exc))

    async def __aenter__(self) -> SharedStreamManager:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop_all()

    # -- background ---------------------------------------------------------------------------

    def _ensure_background(self) -> None:
        self._writer.start()
        if self.committer is not None and self._committer_task is None:
            self._committer_task = asyncio.get_running_loop().create_task(
                self._run_committer(), name="outbox-in-process-committer"
            )

    async def _heartbeat(self) -> None:
        """Renew the session a quarter of its life apart; if it ended (a sweeper found it
        expired), fail every stream: their deliveries were failed. Leading groups whose stream
        this session no longer holds fail too: another triggerer runs the producer now."""
        while True:
            await asyncio.sleep(self.session_ttl / 4)
            session = self._session_id
            if session is None:
                return
            try:
                held = await self._store.renew_session(session, self.session_ttl)
            except Exception as exc:
                log.warning("could not renew the triggerer session (%s)", error_line(exc))
                continue
            if held is None:
                self._session_id = None
                error = SessionLost(
                    f"triggerer session {session} ended: no heartbeat reached the database "
                    f"within session_ttl={self.session_ttl:g}s; what its subscribers were owed "
                    "was failed; subscribe again"
                )
                for group in list(self._streams.values()):
                    group.fail(error)
                return
            for group in list(self._streams.values()):
                if group.role == "leader" and group.stream_id not in held:
                    group.fail(
                        LostProducer(
                            f"shared stream {group.key!r}: another triggerer runs its producer "
                            "now; subscribe again"
                        )
                    )

    async def _listen(self) -> None:
        """Wake followers when another triggerer records events for them or releases a
        producer, and the in-process committer when a lane's next event is resolved (by a
        subscriber on another triggerer, say). Without the notifications (a lost connection),
        followers look every ``follow_interval`` seconds anyway, the committer every
        ``poll_interval``."""

        def wake(channel: str, payload: str) -> None:
            if channel == "outbox_resolved":
                # A lane's next event resolved (elsewhere, maybe): this committer's own writer
                # wakes it for its own resolutions, so only streams owed elsewhere need this.
                if any(g.owed_elsewhere and g.role == "leader" for g in self._streams.values()):
                    self._committer_wakeup.set()
                return
            ids = {int(p) for p in payload.split(",") if p.isdigit()}
            for group in self._streams.values():
                if group.stream_id in ids:
                    if channel == "outbox_consumer":
                        group.consumer_released = True
                    elif channel == "outbox_moved":
                        group.catch_up()  # a delivery moved to a registration of ours
                    group.wakeup.set()

        while True:
            try:
                async with self._store.listen_triggerer(wake) as lost:
                    await lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("triggerer listener lost (%s)", error_line(exc))
            await asyncio.sleep(self.follow_interval)

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
            except Exception as exc:
                log.warning("in-process committer pass failed (%s)", error_line(exc))

    # -- the writer's reports ---------------------------------------------------------------

    def _deliver(self, resolution: Resolution, result: Any) -> None:
        """A resolution carrying trigger events committed (or failed, or lost to another)."""
        owner = resolution[OWNER]
        subscriber = self._owners.get(owner) if owner is not None else None
        if subscriber is None:
            return  # its output ended already
        subscriber.group.delivered(subscriber, resolution, result, len(resolution[RECORDS]))

    def _on_lost_write(self, stream_id: int, error: BaseException) -> None:
        """A write of the stream failed for good (the database away past ``outage_limit``):
        every subscriber of the stream hears of it."""
        group = self._group_of(stream_id)
        if group is not None and not group.terminated:
            group.fail(error)

    def _group_of(self, stream_id: int) -> StreamGroup | None:
        for group in self._streams.values():
            if group.stream_id == stream_id:
                return group
        return None

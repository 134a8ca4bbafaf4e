"""``LaneCommitter``: advances each lane's contiguous resolved prefix on the broker, in order.

One pass: fail deliveries whose ack timeout passed by the database clock, find lanes whose next
event is resolved, lease each (fencing token), read the prefix after the cursor, await
``producer.advance(batch)``, then move the cursor in a statement that checks the lease (and
records where the producer says the lane's broker acknowledgement is held, if anywhere). A crash
between the advance and the cursor update advances the batch again: advance is at-least-once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import TYPE_CHECKING

from outbox._aio import wait_event
from outbox.builders import rebuild_producer
from outbox.codec import Codec
from outbox.core import backoff_delay, canonical_json, contiguous_resolved_prefix
from outbox.errors import ConfigurationError, UndecodableValue
from outbox.interop import adapt_producer
from outbox.protocol import AdvanceItem, AdvanceOutcome, SharedStreamProducer
from outbox.store import AdvancedBatch
from outbox.writer import error_line, is_transient

if TYPE_CHECKING:
    from outbox.metrics import CommitterMetrics
    from outbox.store import LaneLease, OutboxStore, ReadyLane

__all__ = ("LaneCommitter",)

log = logging.getLogger("outbox.committer")

ProducerSource = SharedStreamProducer | Callable[[], SharedStreamProducer]

MAX_LANES_PER_PASS = 1000


@functools.lru_cache(maxsize=4096)
def _outcome(acked: int, failed: int, rejected: int) -> AdvanceOutcome:
    """One shared (immutable) outcome per count triple: a batch repeats a few of them."""
    return AdvanceOutcome(acked=acked, failed=failed, rejected=rejected)


class LaneCommitter:
    """Advances resolved events to the broker, lane by lane, in position order.

    :param store: the ``OutboxStore``.
    :param allowed_modules: module prefixes whose trigger classes may be imported to rebuild a
        stream's producer from the class path and kwargs stored with the stream, and whose
        NamedTuple and Enum classes may be imported to rebuild stored broker payloads (classes
        this process encoded itself, as an in-process committer's manager did, need none).
    :param producers: producer instances or factories by stream key (``shared_stream_key()``),
        used instead of rebuilding.
    :param batch_size: most events one ``advance`` call carries.
    :param lease_seconds: how long a lane lease lasts; a committer paused longer loses it and
        cannot move that lane's cursor.
    :param poll_interval: seconds between passes when nothing wakes the committer.
    :param sweep_timeouts: fail, at most once per ``poll_interval``, the deliveries nobody can
        make any more (their triggerer's session ended, or the subscriber left or joined again)
        and those past their stream's ack timeout by the database clock.
    :param metrics: ``CommitterMetrics`` to count advances in and refresh from the database.
    :param prune_retention: when set, ``run()`` also deletes advanced events and dispatched
        records older than this many seconds, a batch at a time (keep it longer than the
        broker's redelivery horizon: deduplication needs the events).
    :param housekeeping_interval: seconds between metric refreshes and prune batches.
    """

    def __init__(
        self,
        store: OutboxStore,
        *,
        allowed_modules: Iterable[str] = (),
        producers: Mapping[Hashable, ProducerSource] | None = None,
        batch_size: int = 1000,
        lease_seconds: float = 30.0,
        poll_interval: float = 1.0,
        sweep_timeouts: bool = True,
        timeout_grace: float = 0.0,
        retry_base: float = 0.5,
        retry_cap: float = 60.0,
        owner: str | None = None,
        metrics: CommitterMetrics | None = None,
        prune_retention: float | None = None,
        housekeeping_interval: float = 15.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds!r}")
        self._store = store
        self.allowed_modules = tuple(m.rstrip(".") for m in allowed_modules)
        self._codec = Codec(self.allowed_modules)
        self._by_key: dict[str, ProducerSource] = {
            canonical_json(key, what="producer key"): source
            for key, source in (producers or {}).items()
        }
        self._local: dict[int, SharedStreamProducer] = {}
        self._rebuilt: dict[int, SharedStreamProducer] = {}
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.sweep_timeouts = sweep_timeouts
        self.timeout_grace = timeout_grace
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lock = asyncio.Lock()
        self.passes = 0
        self.listening = False
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._leases: dict[int, tuple[LaneLease, float]] = {}
        self._more_ready = False
        self.metrics = metrics
        self.prune_retention = prune_retention
        self.housekeeping_interval = housekeeping_interval
        self._next_housekeeping = 0.0
        self._next_sweep = 0.0
        self._left_to_triggerer: set[int] = set()

    # -- producers handed in by an in-process manager ------------------------------------------

    def add_producer(
        self, stream_id: int, producer: SharedStreamProducer, *, modules: Iterable[str] = ()
    ) -> None:
        """Advance ``stream_id`` with ``producer`` (an in-process manager's): classes in its
        stored payloads may come from the producer's module and ``modules`` (its trigger's),
        after a restart too, when this process has not encoded one yet."""
        self._local[stream_id] = producer
        inner = getattr(producer, "inner", producer)
        trusted = {type(inner).__module__, *modules} - set(self._codec.allowed_modules)
        if trusted:
            self._codec = Codec((*self._codec.allowed_modules, *sorted(trusted)))

    def remove_producer(self, stream_id: int, producer: SharedStreamProducer | None = None) -> None:
        """Forget the producer of ``stream_id`` (only if it is still ``producer``, when given)."""
        if producer is None or self._local.get(stream_id) is producer:
            self._local.pop(stream_id, None)

    def local_stream_ids(self) -> list[int] | None:
        """The streams this committer serves when it only has handed-in producers."""
        if self._by_key or self.allowed_modules:
            return None
        return sorted(self._local)

    async def _producer_for(self, stream_id: int) -> SharedStreamProducer:
        producer = self._local.get(stream_id) or self._rebuilt.get(stream_id)
        if producer is not None:
            return producer
        key_json, class_path, kwargs = await self._store.stream_builder(stream_id)
        source = self._by_key.get(key_json)
        if source is not None:
            producer = adapt_producer(
                source if isinstance(source, SharedStreamProducer) else source()
            )
        else:
            producer = rebuild_producer(
                key_json, class_path, kwargs, allowed_modules=self.allowed_modules
            )
        self._rebuilt[stream_id] = producer
        return producer

    async def _discard_rebuilt(self, stream_id: int) -> None:
        producer = self._rebuilt.pop(stream_id, None)
        if producer is not None:
            try:
                await producer.aclose()
            except Exception:
                log.warning("Producer aclose failed", exc_info=True)

    # -- passes ------------------------------------------------------------------------------

    async def run_once(self, *, stream_ids: list[int] | None = None, sweep: bool = True) -> int:
        """One pass over the lanes that are ready; returns how many events it advanced.

        At most once per ``poll_interval`` (and unless ``sweep`` is off) it first fails the
        deliveries nobody can make any more and those past their ack timeout, on the lanes of
        ``stream_ids`` (every stream when ``None``) that no other committer holds.

        Every ready lane's resolved prefix comes in one read; each lane is advanced in turn;
        the cursors of the lanes advanced move together in one statement at the end of the
        pass (sooner when the pass runs long, well within the leases; and before an error
        ends the pass, so that what went out is not sent again).
        """
        async with self._lock:
            self._more_ready = False
            loop = asyncio.get_running_loop()
            now = loop.time()
            if sweep and self.sweep_timeouts and now >= self._next_sweep:
                # Once per poll interval, not per pass: the sweep reads each lane's events after
                # its cursor, so a long resolved backlog drained pass after pass was read again
                # on every one (on a used database, most of a 20,000-event drain's time).
                self._next_sweep = now + self.poll_interval
                await self._store.fail_expired(
                    grace=self.timeout_grace, owner=self.owner, stream_ids=stream_ids
                )
            max_rows = max(10_000, self.batch_size)
            ready = await self._store.ready_prefixes(
                self.owner,
                stream_ids=stream_ids,
                batch=self.batch_size,
                max_lanes=MAX_LANES_PER_PASS,
                max_rows=max_rows,
            )
            if (
                len(ready) >= MAX_LANES_PER_PASS
                or sum(len(lane.events) for lane in ready) >= max_rows
                or any(len(lane.events) >= self.batch_size for lane in ready)
            ):
                self._more_ready = True  # the read was cut short
            move_by = loop.time() + self.lease_seconds / 4
            advanced: list[AdvancedBatch] = []
            moved = 0
            try:
                for lane in ready:
                    done = await self._advance_lane(lane)
                    if done is not None:
                        advanced.append(done)
                    if advanced and loop.time() >= move_by:
                        moved += await self._move_cursors(advanced)
                        advanced = []
                        move_by = loop.time() + self.lease_seconds / 4
            except Exception:
                if advanced:
                    with contextlib.suppress(Exception):
                        await self._move_cursors(advanced)
                raise
            moved += await self._move_cursors(advanced)
            self.passes += 1
            return moved

    def more_ready(self) -> bool:
        """Whether the last pass may have left ready events behind (its read was cut short, or
        a cursor move was refused and the batch must go out again): run another at once. Other
        passes advanced all that was ready when they read; what became ready since wakes the
        committer again."""
        return self._more_ready

    async def drain(self, stream_id: int) -> int:
        """Advance everything of ``stream_id`` that is resolved, pass after pass (what is not
        resolved stays as it is: a stopping stream leaves it for its next reader)."""
        total = 0
        while True:
            advanced = await self.run_once(stream_ids=[stream_id], sweep=False)
            if not advanced:
                return total
            total += advanced

    async def run(self) -> None:
        """Run passes until ``request_stop()`` (then finish the pass in flight and release the
        leases) or cancellation: when a lane's next event resolves (``LISTEN``), and every
        ``poll_interval`` seconds (lease expiries, retries, timeouts, a lost listener)."""
        try:
            while not self._stopping:
                try:
                    async with self._store.listen_resolved(self._wakeup.set) as lost:
                        self.listening = True
                        await self._passes(lost=lost)
                    if lost.is_set():
                        self.listening = False
                        log.warning(
                            "committer lost its LISTEN connection; polling, listening again"
                        )
                        await self._passes(until_listening_again=True)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.listening = False
                    log.warning(
                        "committer cannot listen for resolutions (%s); polling", error_line(exc)
                    )
                    await self._passes(until_listening_again=True)
            await self._release_when_possible()
        finally:
            self.listening = False
            for stream_id in list(self._rebuilt):
                await self._discard_rebuilt(stream_id)

    def request_stop(self) -> None:
        """Make ``run()`` return after the pass in flight (its advance finishes first)."""
        self._stopping = True
        self._wakeup.set()

    async def _passes(
        self, *, until_listening_again: bool = False, lost: asyncio.Event | None = None
    ) -> None:
        while not self._stopping:
            self._wakeup.clear()
            try:
                await self.run_once()
                while self.more_ready() and not self._stopping:
                    await self.run_once()
                await self._housekeeping()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_transient(exc):  # the database is away: the next pass tries again
                    log.warning("committer pass failed (%s); retrying", error_line(exc))
                else:
                    log.exception("committer pass failed")
            if self._stopping or (lost is not None and lost.is_set()):
                return
            if not await wait_event(self._wakeup, self.poll_interval) and until_listening_again:
                return

    async def _housekeeping(self) -> None:
        now = asyncio.get_running_loop().time()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + self.housekeeping_interval
        for stream_id, key, reader in await self._store.consumer_only_streams():
            if stream_id not in self._left_to_triggerer:
                self._left_to_triggerer.add(stream_id)
                log.info(
                    "stream %s is advanced by the triggerer that reads it (%s): its producer "
                    "acks through the consuming connection; this committer leaves it",
                    key,
                    reader or "none running now",
                )
        if self.prune_retention is not None:
            records, events = await self._store.prune(self.prune_retention)
            if records or events:
                log.info("pruned", extra={"records": records, "events": events})
                self._next_housekeeping = now  # more may be due: another batch next time
        if self.metrics is not None:
            await self.metrics.refresh(self._store)

    async def _release_when_possible(self) -> None:
        try:
            await self.release()
        except Exception as exc:  # the leases expire by themselves
            log.warning("committer could not release its leases (%s)", error_line(exc))

    async def release(self) -> None:
        """Give up every lease this committer holds (on a graceful stop)."""
        self._leases.clear()
        await self._store.release_leases(self.owner)

    async def _lease(self, lane_id: int) -> LaneLease | None:
        """Our lease on the lane: the one held, while well inside its term (it is fenced by
        its token anyway), else a new one from the database."""
        now = asyncio.get_running_loop().time()
        held = self._leases.get(lane_id)
        if held is not None and held[1] > now:
            return held[0]
        lease = await self._store.take_lease(lane_id, self.owner, self.lease_seconds)
        if lease is None:
            self._leases.pop(lane_id, None)
        else:
            self._leases[lane_id] = (lease, now + self.lease_seconds / 2)
        return lease

    async def _advance_lane(self, lane: ReadyLane) -> AdvancedBatch | None:
        """Advance the lane's resolved prefix on the broker; the lease and the events advanced,
        for their cursor move, or ``None`` when nothing was advanced."""
        lease = await self._lease(lane.lane_id)
        if lease is not None and lease.advanced_through != lane.advanced_through:
            # The lease held is older than what was read (another committer had the lane
            # meanwhile): take it afresh; if the lane moved on since the read, next pass.
            self._leases.pop(lane.lane_id, None)
            lease = await self._lease(lane.lane_id)
        if lease is None or lease.advanced_through != lane.advanced_through:
            return None
        try:
            producer = await self._producer_for(lease.stream_id)
        except ConfigurationError as exc:
            await self._failed(lease, str(exc))
            return None
        prefix = contiguous_resolved_prefix(lane.events, lease.advanced_through)
        if not prefix:
            return None
        sent = [e for e in prefix if not e.superseded]
        if not sent:  # only superseded events: the cursor passes over them, nothing is sent
            return AdvancedBatch(lease, lane.rewrites, prefix, None)
        started = time.perf_counter()
        try:
            deserialize = producer.deserialize_payload
            decode = self._codec.decode_parsed  # the store hands over JSON with its tags
            batch = [
                AdvanceItem(deserialize(decode(e.payload)), _outcome(e.acked, e.failed, e.rejected))
                for e in sent
            ]
            await producer.advance(batch)
            held = producer.describe_hold(producer.get_advance_lane(batch[0].broker_payload))
            if held is not None and not isinstance(held, str):
                raise TypeError(
                    f"describe_hold returned {type(held).__name__}, expected str or None; "
                    "return the held event's identity"
                )
        except UndecodableValue as exc:  # nothing was sent; the producer is fine
            log.error(
                "A stored broker payload cannot be decoded; lane stays unadvanced: %s",
                exc,
                extra={"stream_id": lease.stream_id, "lane": lease.lane_key},
            )
            await self._failed(lease, f"{type(exc).__name__}: {exc}")
            return None
        except Exception as exc:
            if self.metrics is not None:
                self.metrics.failed(time.perf_counter() - started)
            log.error(
                "Producer advance raised; lane stays unadvanced and will be retried",
                exc_info=exc,
                extra={
                    "stream_id": lease.stream_id,
                    "lane": lease.lane_key,
                    "batch_size": len(prefix),
                },
            )
            self._leases.pop(lane.lane_id, None)
            await self._failed(lease, f"{type(exc).__name__}: {exc}")
            await self._discard_rebuilt(lease.stream_id)
            return None
        if self.metrics is not None:
            self.metrics.advanced([item.outcome for item in batch], time.perf_counter() - started)
        return AdvancedBatch(lease, lane.rewrites, prefix, held)

    async def _move_cursors(self, advanced: list[AdvancedBatch]) -> int:
        """Move the cursors over what was advanced; how many events they moved over."""
        if not advanced:
            return 0
        moved = await self._store.move_cursors(self.owner, advanced)
        total = 0
        for lease, _, prefix, _ in advanced:
            if lease.lane_id not in moved:
                self._leases.pop(lease.lane_id, None)
                self._more_ready = True
                log.warning(
                    "cursor not moved (lease lost, or a redelivery changed an event of the "
                    "batch); the batch goes out again",
                    extra={"stream_id": lease.stream_id, "lane": lease.lane_key},
                )
                continue
            total += len(prefix)
            held = self._leases.get(lease.lane_id)
            if held is not None:
                through = prefix[-1].position
                moved_lease = dataclasses.replace(lease, advanced_through=through, attempts=0)
                self._leases[lease.lane_id] = (moved_lease, held[1])
        return total

    async def _failed(self, lease: LaneLease, error: str) -> None:
        retry_in = backoff_delay(lease.attempts + 1, base=self.retry_base, cap=self.retry_cap)
        await self._store.record_advance_failure(lease, self.owner, error, retry_in)

"""Group commit: many recordings and resolutions per statement, each still atomic.

Work is submitted without waiting. Two queues, each with its own task, commit concurrently: one
records new events, the other stores resolutions (and fast-path trigger events), so that recording
the next events never waits behind a large batch of resolutions. Each task takes everything queued
(up to ``max_batch`` items), commits it, then runs each item's callback in submission order; while
a batch is in flight the next one gathers, so the batch size follows the load. A batch whose writes
are each a single statement (resolutions; events without identities) runs outside a transaction
block, one statement per write kind; any other commits as one transaction. A large batch of
resolutions is cut by event into up to ``parallel`` transactions committed concurrently (Postgres
then works on them on several cores); an item still commits in exactly one transaction. (A later
part may commit first: ``OutboxReader`` hands a subscriber's records out in event order all the
same, holding back those after an event the subscriber still owes.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from bisect import bisect_right
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from outbox.core import backoff_delay
from outbox.dburl import scrub, shown_url
from outbox.errors import DatabaseUnavailable
from outbox.store import EVENT_ID, OWNER, STATE, STREAM_ID, SUBSCRIBER

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from outbox.store import EventToRecord, OutboxStore, Resolution

__all__ = ("Writer", "error_line", "is_transient")

log = logging.getLogger("outbox.writer")

Callback = Callable[[Any], None]
T = TypeVar("T")

# SQLSTATE classes worth retrying: connection exceptions, serialization failure, deadlock,
# lock timeout, server shutdown, too many connections.
_TRANSIENT_SQLSTATES = ("08", "40001", "40P01", "55P03", "57P01", "57P02", "57P03", "53300")


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is (for now) unreachable or busy, rather than that the
    statement is wrong: worth retrying the same work later."""
    if isinstance(exc, OSError | ConnectionError | asyncio.TimeoutError | PoolTimeout):
        return True  # PoolTimeout: every pooled connection busy (for now)
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(
            getattr(exc.orig, "__cause__", None), "sqlstate", None
        )
        return isinstance(sqlstate, str) and sqlstate.startswith(_TRANSIENT_SQLSTATES)
    return False


_is_transient = is_transient


def error_line(exc: BaseException) -> str:
    """The first line of what the driver said, without SQL or SQLAlchemy's background link."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def unavailable(store: OutboxStore, exc: BaseException, elapsed: float, limit: float) -> Exception:
    """``DatabaseUnavailable`` for an outage that outlasted ``limit``: one line naming the
    database (password hidden) and what to do."""
    url = store.engine.url
    return DatabaseUnavailable(
        f"database {shown_url(url)} unreachable for {elapsed:.1f}s, longer than "
        f"outage_limit={limit:g}s ({scrub(error_line(exc), url)}); the stream stopped: "
        "subscribe again once the database is back"
    )


@dataclass(slots=True)
class _Item:
    # "events" | "resolution" | "unbound" | "barrier", or a change of membership that commits
    # in a batch of its own: "register" | "exclude" | "unregister"
    kind: str
    value: Any
    callback: Callback | None


_MEMBERSHIP = frozenset({"register", "exclude", "unregister"})


# A resolution without a callback of its own is queued as itself: the hot path makes no item,
# closure or bound method per resolution (``on_resolved`` is told of those with an ``owner``).
# Measured together with the reject binding set once per filter task: 6,134-6,658 -> 6,899-8,585
# events/s, cyclic GC 1.56 -> 0.66 s per 40,000 events (fourth pass in bench/results/history.md).
_Queued: TypeAlias = "_Item | Resolution"


class _Queue:
    """One stream of work committed by its own task, one batch at a time."""

    __slots__ = ("items", "task", "wakeup")

    def __init__(self) -> None:
        self.items: deque[_Queued] = deque()
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class Writer:
    """Batches the manager's writes into group-committed transactions."""

    def __init__(
        self,
        store: OutboxStore,
        *,
        max_batch: int = 4000,
        outage_limit: float = 60.0,
        on_commit: Callable[[], None] | None = None,
        on_resolved: Callable[[Resolution, Any], None] | None = None,
        on_lost: Callable[[int, BaseException], None] | None = None,
        parallel: int = 2,
        min_split: int = 500,
    ) -> None:
        self._store = store
        self._max_batch = max_batch
        self._parallel = max(1, parallel)
        self._min_split = max(1, min_split)
        self._outage_limit = outage_limit
        self._on_commit = on_commit
        self._on_resolved = on_resolved
        self._on_lost = on_lost
        # The session of the triggerer whose writes these are (set once it has one).
        self.session_id = 0
        self._recording = _Queue()
        self._resolving = _Queue()
        self._queues = (self._recording, self._resolving)
        self.transactions = 0

    async def retry(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run ``operation`` (one database call of the caller's), retrying transient failures
        with backoff for up to ``outage_limit`` seconds; then raise ``DatabaseUnavailable``."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        attempts = 0
        while True:
            try:
                return await operation()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not _is_transient(exc):
                    raise
                attempts += 1
                elapsed = loop.time() - started
                if elapsed >= self._outage_limit:
                    raise unavailable(self._store, exc, elapsed, self._outage_limit) from None
                delay = backoff_delay(attempts, base=0.05, cap=2.0)
                log.warning(
                    "outbox database call failed (%s); retrying in %.2fs", error_line(exc), delay
                )
                await asyncio.sleep(delay)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for name, queue in (("record", self._recording), ("resolve", self._resolving)):
            if queue.task is None or queue.task.done():
                queue.task = loop.create_task(self._run(queue), name=f"outbox-writer-{name}")

    async def aclose(self) -> None:
        """Commit what is queued, then stop."""
        if all(queue.task is None for queue in self._queues):
            return
        await self.barrier()
        for queue in self._queues:
            if queue.task is not None:
                queue.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await queue.task
                queue.task = None

    @staticmethod
    def _submit(queue: _Queue, item: _Queued) -> None:
        queue.items.append(item)
        queue.wakeup.set()

    def record_events(self, events: Sequence[EventToRecord], callback: Callback) -> None:
        """Record ``events``; ``callback(events or exception)`` runs after the commit."""
        self._submit(self._recording, _Item("events", events, callback))

    def resolve(self, resolution: Resolution, callback: Callback | None = None) -> None:
        """Store ``resolution``; after the commit, ``callback(result)`` runs, or else
        ``on_resolved(resolution, result)`` if the resolution has an ``owner``. The result is
        True if it won, False if an earlier resolution of the same delivery won, or an
        exception."""
        if callback is None:
            self._submit(self._resolving, resolution)
        else:
            self._submit(self._resolving, _Item("resolution", resolution, callback))

    def store_unbound(
        self, stream_id: int, subscriber: str, payload_json: str, callback: Callback
    ) -> None:
        """Store a trigger event not tied to a raw event (fast path)."""
        self._submit(
            self._resolving, _Item("unbound", (stream_id, subscriber, payload_json), callback)
        )

    def register(self, stream_id: int, names: Sequence[str], callback: Callback) -> None:
        """Register subscribers of a stream in this triggerer's session, in order with the
        recordings (events recorded before are not owed to them, events after are);
        ``callback(registration ids by name, or exception)``."""
        self._submit(self._recording, _Item("register", (stream_id, list(names)), callback))

    def exclude(self, registrations: Sequence[int]) -> None:
        """Keep these registrations out of the snapshots of events recorded from now on."""
        self._submit(self._recording, _Item("exclude", list(registrations), None))

    def unregister(self, registrations: Sequence[int]) -> None:
        """Remove these registrations (what they are still owed is failed by the sweep)."""
        self._submit(self._resolving, _Item("unregister", list(registrations), None))

    def after_pending(self, callback: Callback) -> None:
        """Run ``callback(None)`` once everything submitted before it is committed."""
        remaining = len(self._queues)

        def passed(_: Any) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                callback(None)

        for queue in self._queues:
            self._submit(queue, _Item("barrier", None, passed))

    async def barrier(self) -> None:
        """Wait until everything submitted so far is committed (or failed)."""
        done = asyncio.get_running_loop().create_future()

        def release(_: Any) -> None:
            if not done.done():
                done.set_result(None)

        self.after_pending(release)
        self.start()
        tasks = {queue.task for queue in self._queues if queue.task is not None}
        # If a writer task is cancelled first (the loop shutting down), nothing more commits.
        await asyncio.wait({done, *tasks}, return_when=asyncio.FIRST_COMPLETED)

    async def _run(self, queue: _Queue) -> None:
        while True:
            if not queue.items:
                queue.wakeup.clear()
                await queue.wakeup.wait()
            batch: list[_Queued] = []
            while queue.items and len(batch) < self._max_batch:
                head = queue.items[0]
                if isinstance(head, _Item) and head.kind in _MEMBERSHIP:
                    if not batch:
                        batch.append(queue.items.popleft())
                    break
                batch.append(queue.items.popleft())
            if isinstance(batch[0], _Item) and batch[0].kind in _MEMBERSHIP:
                self._finish(batch, [await self._membership(batch[0])])
                continue
            parts = self._partition(batch)
            if len(parts) == 1:
                results = await self._commit_with_retry(batch)
            else:
                # Disjoint sets of events, so the transactions touch disjoint rows; each item
                # still commits in exactly one transaction. Callbacks wait for all of them.
                done = await asyncio.gather(
                    *(self._commit_with_retry([batch[i] for i in part]) for part in parts)
                )
                results = [None] * len(batch)
                for part, part_results in zip(parts, done, strict=True):
                    for i, result in zip(part, part_results, strict=True):
                        results[i] = result
            self._finish(batch, results)

    def _partition(self, batch: Sequence[_Queued]) -> list[list[int]]:
        """Split a large batch into up to ``parallel`` groups of item indexes, one transaction
        each, run concurrently. Resolutions are cut by contiguous event-id ranges, so every
        resolution of one event (and so every contender for one delivery) stays in one group,
        in submission order; everything that is not a resolution goes to the first group."""
        if len(batch) < 2 * self._min_split:
            return [list(range(len(batch)))]
        event_ids = [
            None if (row := _resolution_of(item)) is None else row[EVENT_ID] for item in batch
        ]
        n_res = len(event_ids) - event_ids.count(None)
        groups = min(self._parallel, n_res // self._min_split)
        if groups < 2:
            return [list(range(len(batch)))]
        distinct = sorted({event_id for event_id in event_ids if event_id is not None})
        # Cut by events (each has about as many resolutions as the next): group g starts at
        # the event ``cuts[g - 1]``.
        cuts = [distinct[len(distinct) * g // groups] for g in range(1, groups)]
        parts: list[list[int]] = [[] for _ in range(groups)]
        for i, event_id in enumerate(event_ids):
            parts[0 if event_id is None else bisect_right(cuts, event_id)].append(i)
        return [part for part in parts if part]

    async def _commit_with_retry(
        self,
        batch: list[_Queued],
        *,
        after_failure: bool = False,
    ) -> list[Any]:
        """Commit ``batch``; the result of each item, or the exception that failed it.
        ``after_failure``: an earlier attempt at these items failed (and may have stored some)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        attempts = 0
        while True:
            try:
                return await self._commit(batch, after_failure=after_failure or attempts > 0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempts += 1
                transient = _is_transient(exc)
                elapsed = loop.time() - started
                if transient and elapsed < self._outage_limit:
                    delay = backoff_delay(attempts, base=0.05, cap=2.0)
                    log.warning(
                        "outbox write failed (%s); retrying in %.2fs", error_line(exc), delay
                    )
                    await asyncio.sleep(delay)
                    continue
                if len(batch) > 1 and not transient:
                    # Isolate the item the database refuses; the others commit. (Written one
                    # statement at a time, some may have committed already: the halves then
                    # check what they find stored.)
                    middle = len(batch) // 2
                    partial = _each_alone(batch)
                    first = await self._commit_with_retry(batch[:middle], after_failure=partial)
                    return first + await self._commit_with_retry(
                        batch[middle:], after_failure=partial
                    )
                if transient:
                    exc = unavailable(self._store, exc, elapsed, self._outage_limit)
                log.error("outbox write failed: %s", error_line(exc)[:500])
                return [exc] * len(batch)

    async def _membership(self, item: _Item) -> Any:
        """Commit a change of membership; its result, or the exception that failed it."""
        store = self._store
        value = item.value
        try:
            if item.kind == "register":
                stream_id, names = value
                session = self.session_id
                return await self.retry(lambda: store.register(stream_id, names, session))
            if item.kind == "exclude":
                await self.retry(lambda: store.exclude(value))
            else:
                await self.retry(lambda: store.unregister(value))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Not registered: the subscriber fails. Not excluded or not removed: its registration
            # ends with its session (what it is owed meanwhile is failed by the sweep then).
            log.warning("outbox could not %s subscribers (%s)", item.kind, error_line(exc))
            return exc
        return None

    def _finish(self, batch: list[_Queued], results: list[Any]) -> None:
        on_resolved = self._on_resolved
        for item, result in zip(batch, results, strict=True):
            try:
                if not isinstance(item, _Item):
                    if item[OWNER] is not None and on_resolved is not None:
                        on_resolved(item, result)
                    elif isinstance(result, BaseException) and self._on_lost is not None:
                        # No one waits on this one (no trigger events): its stream hears of it.
                        self._on_lost(item[STREAM_ID], result)
                elif item.callback is not None:
                    item.callback(result)
            except Exception:  # a callback bug must not stop the writer
                log.exception("outbox writer callback failed")

    async def _commit(self, batch: list[_Queued], *, after_failure: bool = False) -> list[Any]:
        events, resolutions, unbound = _classify(batch)
        lost: set[int] = set()  # indexes in ``resolutions``
        if events or resolutions or unbound:
            lanes_may_be_ready = bool(resolutions)
            connection = (
                self._store.autocommit()
                if _one_statement_each(events, resolutions, unbound)
                else self._store.engine.begin()
            )
            async with connection as conn:
                if events and await self._store.record_events(
                    conn, events, session_id=self.session_id
                ):
                    lanes_may_be_ready = True
                if resolutions:
                    lost = await self._store.resolve(conn, resolutions)
                    if after_failure and lost:
                        lost = await self._won_before(conn, resolutions, lost)
                if unbound:
                    await self._store.insert_unbound_records(conn, unbound)
            self.transactions += 1
            if self._on_commit is not None and lanes_may_be_ready:
                self._on_commit()
        if len(resolutions) == len(batch) and not lost:
            return [True] * len(batch)  # the common batch: resolutions only, every one won
        results: list[Any] = []
        index = 0
        for item in batch:
            if _resolution_of(item) is not None:
                results.append(index not in lost)
                index += 1
            elif isinstance(item, _Item) and item.kind == "events":
                results.append(item.value)
            else:
                results.append(None)
        return results

    async def _won_before(
        self, conn: AsyncConnection, resolutions: list[Resolution], lost: set[int]
    ) -> set[int]:
        """``lost`` without the resolutions that the failed attempt stored: that attempt may
        have committed before its connection broke, and a delivery stored in the very state
        asked for is this batch's own (the first of it in the batch, if it is there twice)."""
        stored = await self._store.resolved_as(conn, [resolutions[i] for i in sorted(lost)])
        firsts: set[tuple[int, str]] = set()
        for i, r in enumerate(resolutions):
            key = (r[EVENT_ID], r[SUBSCRIBER])
            if key in firsts:
                continue  # a later one of a delivery never wins over the batch's first
            firsts.add(key)
            if (r[EVENT_ID], r[SUBSCRIBER], r[STATE]) in stored:
                lost.discard(i)
        return lost


def _classify(
    batch: Sequence[_Queued],
) -> tuple[list[EventToRecord], list[Resolution], list[tuple[int, str, str]]]:
    """The batch's events to record, resolutions and fast-path trigger events, in order."""
    events: list[EventToRecord] = []
    resolutions: list[Resolution] = []
    unbound: list[tuple[int, str, str]] = []
    for item in batch:
        if not isinstance(item, _Item):
            resolutions.append(item)
        elif item.kind == "resolution":
            resolutions.append(item.value)
        elif item.kind == "events":
            events.extend(item.value)
        elif item.kind == "unbound":
            unbound.append(item.value)
    return events, resolutions, unbound


def _one_statement_each(
    events: Sequence[EventToRecord],
    resolutions: Sequence[Resolution],
    unbound: Sequence[tuple[int, str, str]],
) -> bool:
    """Whether these writes are of one kind whose writes are each one statement (resolutions;
    events without identities): they then run outside a transaction block, each committing on
    its own, one round trip instead of three. Anything else, and any mix, commits as one
    transaction."""
    if unbound or (resolutions and events):
        return False
    return all(event.identity is None for event in events)


def _each_alone(batch: Sequence[_Queued]) -> bool:
    """Whether ``batch`` commits outside a transaction block (see ``_one_statement_each``)."""
    return _one_statement_each(*_classify(batch))


def _resolution_of(item: _Queued) -> Resolution | None:
    if isinstance(item, _Item):
        return item.value if item.kind == "resolution" else None
    return item

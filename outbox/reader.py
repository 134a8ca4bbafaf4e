"""``OutboxReader``: hands stored trigger events to a consumer, exactly once when the consumer
writes to the same database.

A claim locks a stream (one reader at a time) and its oldest undispatched records in event order
(``FOR UPDATE SKIP LOCKED``) inside the caller's own transaction, holding back a subscriber's
records of an event after one it still owes: each subscriber gets its records in event order,
however the writers batched them. Marking them dispatched in that transaction makes the hand-off
and the caller's own writes commit, or roll back, together. Several readers share the streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DBAPIError

from outbox._aio import wait_event
from outbox.codec import Codec
from outbox.core import backoff_delay, canonical_json
from outbox.writer import error_line, is_transient

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from outbox.store import OutboxStore

__all__ = ("OutboxReader", "OutboxRecord")

log = logging.getLogger("outbox.reader")

# Subscribers remembered per stream before the reader forgets them all (and reads further back
# once): a bound on memory with subscribers coming and going.
_MOST_SETTLED = 10_000


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """One stored trigger event; ``payload`` as the trigger yielded it (bytes, tuples,
    datetimes and the other types ``outbox.codec`` stores come back as they were)."""

    id: int
    stream_id: int
    event_id: int | None
    subscriber: str
    ordinal: int
    payload: Any


Handler = Callable[["AsyncConnection", list[OutboxRecord]], Awaitable[None]]


class _HandlerError(Exception):
    """What the handler raised (not a database outage), carried out of ``process``."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


class OutboxReader:
    """Claims undispatched outbox records for a consumer.

    :param store: the ``OutboxStore``.
    :param streams: only records of these stream keys (``shared_stream_key()`` values).
    :param subscribers: only records of these subscribers (``str(trigger_id)``).
    :param batch_size: most records one claim returns.
    :param poll_interval: seconds ``run`` waits for a notification before looking anyway.
    :param allowed_modules: module prefixes whose NamedTuple and Enum classes may be imported
        to rebuild stored payloads (classes this process encoded itself need none); a payload
        of any other class fails the claim with ``UndecodableValue``.
    """

    def __init__(
        self,
        store: OutboxStore,
        *,
        streams: Sequence[Hashable] | None = None,
        subscribers: Sequence[str] | None = None,
        batch_size: int = 100,
        poll_interval: float = 1.0,
        allowed_modules: Sequence[str] = (),
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
        self._store = store
        self._stream_keys = (
            None if streams is None else [canonical_json(k, what="stream key") for k in streams]
        )
        self._subscribers = None if subscribers is None else [str(s) for s in subscribers]
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self._wakeup = asyncio.Event()
        self._codec = Codec(allowed_modules)
        # By stream: {subscriber: event id} before which the subscriber owes nothing, so that
        # a claim need not read those events again to hold back records (``claim_records``).
        self._settled: dict[int, dict[str, int]] = {}

    async def claim(self, conn: AsyncConnection, *, limit: int | None = None) -> list[OutboxRecord]:
        """Lock and return the oldest undispatched records of one stream that no other reader
        holds, in event order (each subscriber's records after those of every event it owes), within
        the caller's transaction on ``conn``."""
        rows = await self._store.claim_records(
            conn,
            stream_keys=self._stream_keys,
            subscribers=self._subscribers,
            limit=limit or self.batch_size,
            settled=self._settled,
        )
        if rows:
            # Seen to owe nothing before these events (whether or not this claim commits).
            settled = self._settled.setdefault(rows[0][1], {})
            if len(settled) > _MOST_SETTLED:
                settled.clear()
            for _, _, event_id, subscriber, _, _ in rows:
                if event_id is not None and event_id > settled.get(subscriber, 0):
                    settled[subscriber] = event_id
        decode = self._codec.decode_parsed
        return [
            OutboxRecord(record_id, stream_id, event_id, subscriber, ordinal, decode(payload))
            for record_id, stream_id, event_id, subscriber, ordinal, payload in rows
        ]

    async def mark_dispatched(self, conn: AsyncConnection, records: Sequence[OutboxRecord]) -> None:
        """Mark ``records`` dispatched in the caller's transaction on ``conn``."""
        await self._store.mark_dispatched(conn, [r.id for r in records])

    async def process(self, handler: Handler, *, limit: int | None = None) -> int:
        """One transaction: claim, ``await handler(conn, records)``, mark dispatched, commit.
        If the handler raises, nothing is marked and its writes roll back. Returns how many
        records were handed over."""
        async with self._store.engine.begin() as conn:
            records = await self.claim(conn, limit=limit)
            if not records:
                return 0
            await handler(conn, records)
            await self.mark_dispatched(conn, records)
        return len(records)

    async def run(self, handler: Handler) -> None:
        """Hand records to ``handler`` until cancelled, waking on new records (``LISTEN``) and
        every ``poll_interval`` seconds. While the database is unreachable, ``run`` retries
        with backoff and then listens again (what was handed over in a transaction that did
        not commit is handed over again); any other exception, from ``handler`` too, ends
        ``run``."""

        async def guarded(conn: AsyncConnection, records: list[OutboxRecord]) -> None:
            try:
                await handler(conn, records)
            except DBAPIError:
                raise  # the database went away under the handler: retried like our own calls
            except Exception as exc:
                raise _HandlerError(exc) from exc

        failures = 0
        while True:
            async with self._listening() as lost:
                while not lost.is_set():
                    self._wakeup.clear()
                    try:
                        while await self.process(guarded):
                            pass
                    except _HandlerError as failed:
                        raise failed.error from None
                    except Exception as exc:
                        if not is_transient(exc):
                            raise
                        failures += 1
                        delay = backoff_delay(failures, base=0.05, cap=2.0)
                        log.warning(
                            "outbox reader cannot reach the database (%s); retrying in %.2fs",
                            error_line(exc),
                            delay,
                        )
                        await asyncio.sleep(delay)
                        break
                    failures = 0
                    await wait_event(self._wakeup, self.poll_interval)

    @contextlib.asynccontextmanager
    async def _listening(self) -> AsyncIterator[asyncio.Event]:
        """The ``lost`` event of a ``LISTEN`` for new records; without one (the database is
        unreachable, say) an event set soon (after a poll, at most a second), so that ``run``
        tries to listen again."""
        try:
            listener = self._store.listen_records(self._wakeup.set)
            lost = await listener.__aenter__()
        except Exception as exc:
            log.warning("outbox reader cannot listen for new records (%s); polling", exc)
            retry = asyncio.Event()

            def listen_again() -> None:
                retry.set()
                self._wakeup.set()

            timer = asyncio.get_running_loop().call_later(
                min(self.poll_interval, 1.0), listen_again
            )
            try:
                yield retry
            finally:
                timer.cancel()
            return
        try:
            yield lost
        finally:
            await listener.__aexit__(None, None, None)

"""Postgres restarts under a busy stream (issue 7, faults).

Each test runs a Postgres server of its own (the session's shared one is never touched), a
``SharedStreamManager`` with its in-process committer and a separate ``LaneCommitter`` (its own
engine, woken by ``LISTEN``) on one in-memory log with event identities, fed at a steady rate.
Mid-run the server is stopped (``pg_ctl stop -m fast``) and started again on the same port.

- An outage shorter than the manager's ``outage_limit``: nobody sees an error, and afterwards
  every message's trigger events are stored and yielded exactly once per accepting subscriber,
  no delivery failed, every lane is committed to its end without a gap.
- An outage longer than ``outage_limit``: the subscribers get ``DatabaseUnavailable`` (one line,
  naming the database, no password); once the server is back they subscribe again and the same
  invariants hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from outbox import LaneCommitter, OutboxStore, SharedStreamManager
from outbox.errors import DatabaseUnavailable
from outbox.migrate import migrate
from tests.faults import PASSWORD, FakeLog, FakeLogProducer, LogTrigger, PgServer, accepts
from tests.invariants import settled, tally
from tests.polling import eventually

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import pytest

    from outbox import TriggerEvent

MODES = ("all", "picky")
LANES = 4  # a fifth lane first appears while the database is down
RATE = 300.0  # messages per second


class Feeder:
    """Appends ``{"n": n}`` to the log at ``RATE`` per second, lane ``n % LANES`` (every fifth
    message to lane ``LANES`` once ``extra_lane`` is set), until ``stop``."""

    def __init__(self, log: FakeLog) -> None:
        self.log = log
        self.n = 0
        self.extra_lane = False
        self.lane_of: dict[int, int] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        began = time.monotonic()
        while True:
            due = int((time.monotonic() - began) * RATE)
            while self.n < due:
                lane = LANES if self.extra_lane and self.n % 5 == 0 else self.n % LANES
                self.lane_of[self.n] = lane
                self.log.append(lane, self.n)
                self.n += 1
            await asyncio.sleep(0.01)

    async def stop(self) -> int:
        if self._task is None:
            return self.n
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return self.n


class Subscribers:
    """The triggerer side: one drain task per mode, counting what each subscriber is handed and
    keeping the error that ended it."""

    def __init__(self, manager: SharedStreamManager, name: str) -> None:
        self.manager = manager
        self.name = name
        self.seen: Counter[tuple[int, str]] = Counter()
        self.errors: dict[str, BaseException] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.first_after: float | None = None
        self.mark: float | None = None

    def subscribe(self) -> None:
        for mode in MODES:
            events = self.manager.subscribe(
                trigger_id=mode, trigger=LogTrigger(name=self.name, mode=mode)
            )
            self.tasks[mode] = asyncio.get_running_loop().create_task(self._drain(mode, events))

    async def _drain(self, mode: str, events: AsyncIterator[TriggerEvent]) -> None:
        try:
            async for event in events:
                self.seen[int(event.payload["n"]), mode] += 1
                if self.mark is not None and self.first_after is None:
                    self.first_after = time.monotonic() - self.mark
        except Exception as exc:
            self.errors[mode] = exc

    def ended(self) -> list[str]:
        return [mode for mode, task in self.tasks.items() if task.done()]

    async def close(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


async def describe(store: OutboxStore, log: FakeLog) -> str:
    """What is owed: each lane's commit against its end, and the events not settled."""
    async with store.engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.text(
                    """
                    SELECT e.identity, e.position, l.advanced_through, e.pending, e.acked,
                           e.failed, e.rejected,
                           (SELECT string_agg(d.subscriber || '=' || d.state || ':' ||
                                              coalesce(d.reason, ''), ', ')
                            FROM outbox_delivery AS d WHERE d.event_id = e.id)
                    FROM outbox_event AS e JOIN outbox_lane AS l ON l.id = e.lane_id
                    WHERE e.pending > 0 OR e.failed > 0 OR e.position > l.advanced_through
                    ORDER BY e.id LIMIT 20
                    """
                )
            )
        ).all()
    ends = [len(m) for m in log.messages]
    return f"committed {log.committed} of {ends}; opened {log.opened}; owed: {rows}"


async def check_invariants(
    store: OutboxStore, log: FakeLog, total: int, *, failures_allowed: bool
) -> dict[str, Any]:
    """Nothing lost, nothing stored twice, every lane committed to its end without a gap."""
    expected = {(n, mode) for n in range(total) for mode in MODES if accepts(mode, n)}
    counted = await tally(store)
    rows, failed, occurrences = counted.records, counted.failed, counted.occurrences
    stored = counted.assert_each_stored_once()
    assert stored == expected, (sorted(expected - stored)[:10], sorted(stored - expected)[:10])
    for identity, _, n, _ in rows:
        lane, offset = map(int, identity.split(":"))
        assert log.messages[lane][offset] == n
    if not failures_allowed:
        assert failed == 0
    # Every lane committed exactly to its end, never backwards, and (with nothing held) every
    # batch starts at most one past what was advanced before: no message skipped.
    assert log.fully_committed(), (log.committed, [len(m) for m in log.messages])
    for lane, previous, new in log.commits:
        assert new > previous, lane
    if not failures_allowed:
        through = [-1] * log.lanes
        for lane, offsets, _ in log.batches:
            assert offsets == list(range(offsets[0], offsets[0] + len(offsets))), offsets
            assert offsets[0] <= through[lane] + 1, (lane, offsets[0], through[lane])
            through[lane] = max(through[lane], offsets[-1])
        assert through == [len(m) - 1 for m in log.messages]
    return {"failed": failed, "occurrences": occurrences, "records": len(rows)}


async def _run_outage(
    server: PgServer,
    caplog: pytest.LogCaptureFixture,
    *,
    outage: float,
    outage_limit: float,
) -> tuple[dict[str, Any], Subscribers]:
    caplog.set_level(logging.INFO)
    await migrate(server.url)
    name = f"pg-outage-{outage}"
    log = FakeLog(lanes=LANES + 1)
    LogTrigger.LOGS[name] = log
    figures: dict[str, float] = {}
    store = OutboxStore.from_url(server.url)
    other_store = OutboxStore.from_url(server.url)
    manager = SharedStreamManager(
        store,
        outage_limit=outage_limit,
        committer_options={"poll_interval": 0.5, "lease_seconds": 2.0, "retry_cap": 1.0},
    )
    committer = LaneCommitter(
        other_store,
        producers={("fake-log", name): lambda: FakeLogProducer(log)},
        poll_interval=0.5,
        lease_seconds=2.0,
        retry_cap=1.0,
        sweep_timeouts=False,
    )
    committer_task = asyncio.create_task(committer.run())
    subscribers = Subscribers(manager, name)
    feeder = Feeder(log)
    try:
        subscribers.subscribe()
        feeder.start()
        await eventually(lambda: _true(committer.listening and len(log.commits) > 20), within=30)
        # The outage: the server goes down mid-stream, a new lane appears meanwhile.
        before = len(log.commits)
        server.stop()
        feeder.extra_lane = True
        await asyncio.sleep(outage)
        # Nothing advances while the server is down, except what each committer (the manager's
        # and the separate one) had read before it went: the pass in flight, one batch a lane.
        assert len(log.commits) - before <= 2 * LANES
        server.start()
        back = time.monotonic()
        subscribers.mark = back
        if outage > outage_limit:
            await eventually(lambda: _true(len(subscribers.ended()) == len(MODES)), within=30)
            figures["error_after"] = time.monotonic() - back
            subscribers.subscribe()  # the triggerer subscribes again
        else:
            assert not subscribers.ended(), subscribers.errors
        await eventually(lambda: _true(len(log.commits) > before + 5), within=30)
        figures["commits_after"] = time.monotonic() - back
        await eventually(lambda: _true(committer.listening), within=30)
        figures["listening_after"] = time.monotonic() - back
        fed = feeder.n  # the stream stays busy for a while after the recovery
        await eventually(lambda: _true(feeder.n >= fed + int(2 * RATE)), within=30)
        total = await feeder.stop()
        try:
            await eventually(lambda: _true(log.fully_committed()), within=40, interval=0.1)
        except AssertionError:
            raise AssertionError(await describe(store, log)) from None
        await eventually(lambda: settled(store), within=20, interval=0.1)
        figures["drained_after"] = time.monotonic() - back
        if subscribers.first_after is not None:
            figures["first_event_after"] = subscribers.first_after
        figures["total"] = total
        stats = await check_invariants(store, log, total, failures_allowed=outage > outage_limit)
        figures.update(stats)
        assert any(lane == LANES for lane, _, _ in log.commits)
    finally:
        await feeder.stop()
        await subscribers.close()
        await manager.stop_all()
        committer.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(committer_task, 10)
        committer_task.cancel()
        await asyncio.gather(committer_task, return_exceptions=True)
        await store.aclose()
        await other_store.aclose()
        LogTrigger.LOGS.pop(name, None)
    assert PASSWORD not in caplog.text
    return figures, subscribers


async def _true(value: bool) -> bool:
    return value


async def test_short_postgres_outage_is_invisible_to_subscribers(
    pg_server: PgServer, caplog: pytest.LogCaptureFixture
) -> None:
    figures, subscribers = await _run_outage(pg_server, caplog, outage=5.0, outage_limit=30.0)
    assert not subscribers.errors
    # Each subscriber was handed each of its trigger events exactly once, including those
    # whose commit was in flight when the server went down (the retry finds them stored).
    expected = Counter(
        {(n, mode): 1 for n in range(figures["total"]) for mode in MODES if accepts(mode, n)}
    )
    assert subscribers.seen == expected, (
        sorted((expected - subscribers.seen).items())[:10],
        sorted((subscribers.seen - expected).items())[:10],
    )
    print(f"short outage (5 s, limit 30 s): {figures}")


async def test_long_postgres_outage_fails_subscribers_clearly_then_resumes(
    pg_server: PgServer, caplog: pytest.LogCaptureFixture
) -> None:
    figures, subscribers = await _run_outage(pg_server, caplog, outage=6.0, outage_limit=2.0)
    assert set(subscribers.errors) == set(MODES)
    for error in subscribers.errors.values():
        assert isinstance(error, DatabaseUnavailable), repr(error)
        text = str(error)
        assert "\n" not in text and PASSWORD not in text, text
        assert f"127.0.0.1:{pg_server.port}/postgres" in text, text
    # Handed over at most once each. A commit in flight when the server went down that then
    # failed for good is stored but was reported to its subscriber as the error: the outbox,
    # not the iterator, is the record of what was stored.
    expected = {(n, mode) for n in range(figures["total"]) for mode in MODES if accepts(mode, n)}
    assert max(subscribers.seen.values()) == 1
    assert set(subscribers.seen) <= expected
    print(f"long outage (6 s, limit 2 s): {figures}; error: {subscribers.errors['all']}")


async def test_reader_rides_out_a_postgres_restart(
    pg_server: PgServer, caplog: pytest.LogCaptureFixture
) -> None:
    """``OutboxReader.run`` retries while the server is down, listens again once it is back
    (its poll interval is an hour: only a notification can wake it), and hands over what was
    stored before and after, each record once."""
    from outbox.reader import OutboxReader
    from tests.test_reader import SINK, fill, sink_into, sink_rows

    await migrate(pg_server.url)
    store = OutboxStore.from_url(pg_server.url)
    async with store.engine.begin() as conn:
        await conn.execute(sa.text(SINK))
    await fill(store, "before", 3)
    reader = OutboxReader(store, poll_interval=3600.0)
    task = asyncio.create_task(reader.run(sink_into("r")))

    async def handed_over(n: int) -> bool:
        assert not task.done(), task.exception() if task.done() else None
        try:
            return len(await sink_rows(store)) == n
        except sa.exc.DBAPIError:  # our own probe on a connection from before the restart
            return False

    try:
        await eventually(lambda: handed_over(6), within=20)
        with caplog.at_level(logging.WARNING, logger="outbox.reader"):
            await asyncio.to_thread(pg_server.stop)
            await eventually(
                lambda: _true("outbox reader cannot reach the database" in caplog.text), within=20
            )
            await asyncio.to_thread(pg_server.start)
        await eventually(lambda: _fill_when_back(store), within=20)
        await eventually(lambda: handed_over(10), within=20)
        await fill(store, "later", 1)  # only a notification wakes the reader for these
        await eventually(lambda: handed_over(12), within=10)
        ids = [row[0] for row in await sink_rows(store)]
        assert len(ids) == len(set(ids)) == 12
        assert PASSWORD not in caplog.text
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.aclose()


async def _fill_when_back(store: OutboxStore) -> bool:
    from tests.test_reader import fill

    try:
        await fill(store, "after", 2)
    except sa.exc.DBAPIError:
        return False
    return True

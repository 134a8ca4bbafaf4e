"""Every delivery ends, in the default configuration (issue 15): the manager with its in-process
committer, the design's Kafka example as its producer (``tests.seed_kafka``: no event identity,
bytes from the broker, a plain tuple as broker payload), a real broker and a real Postgres.

Each case ends with the partitions committed to their ends within the ack timeout plus a margin
(far sooner, in fact: the deadlines here are shorter than the default ack timeout of 300 s), no
trigger event lost, none stored twice but where the README says a producer without identity may
store one twice (a message whose trigger events were stored, but not yet committed to Kafka,
when its triggerer was killed), and ``outbox status`` telling the truth each time it is asked.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlalchemy.exc import TimeoutError as PoolTimeout

from outbox import AckTimeout, OutboxStore, SharedStreamManager
from outbox.errors import DatabaseUnavailable, OutboxError
from outbox.migrate import migrate
from tests.faults import PASSWORD, PgServer
from tests.invariants import assert_status_true, settled
from tests.polling import eventually
from tests.seed_kafka import BAD_N, SeedTrigger, fires, forget_huge_text, huge_text
from tests.test_e2e_kafka import Proc
from tests.test_kafka import create_topic

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    import pytest

    from outbox import TriggerEvent

PARTITIONS = 4
# How long past its ack timeout a delivery may stay pending: the sweep runs every poll interval
# (1 s by default) and the status read takes its time.
SWEEP_MARGIN = 5.0
# The default ack timeout is 300 s: every case here must end well within it.
DEADLINE = 60.0


class Topic:
    """A fresh topic of ``PARTITIONS`` partitions read by a fresh consumer group; message
    ``{"n": n}`` goes to partition ``n % PARTITIONS`` at offset ``n // PARTITIONS``."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.name = ""
        self.group = f"g-{uuid.uuid4().hex[:8]}"
        self.counts: Counter[int] = Counter()
        self.produced = 0

    async def create(self) -> Topic:
        self.name = await create_topic(self.bootstrap, partitions=PARTITIONS)
        return self

    def trigger(self, mode: str, **options: Any) -> SeedTrigger:
        return SeedTrigger(
            topics=[self.name],
            bootstrap_servers=self.bootstrap,
            group_id=self.group,
            mode=mode,
            **options,
        )

    async def produce(self, count: int) -> None:
        first, last = self.produced, self.produced + count
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5)
        await producer.start()
        try:
            for n in range(first, last):
                await producer.send(self.name, f'{{"n": {n}}}'.encode(), partition=n % PARTITIONS)
            await producer.flush()
        finally:
            await producer.stop()
        self.counts.update(n % PARTITIONS for n in range(first, last))
        self.produced = last

    async def committed(self) -> dict[int, int]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=self.group, enable_auto_commit=False
        )
        await consumer.start()
        try:
            out = {}
            for p in range(PARTITIONS):
                value = await consumer.committed(TopicPartition(self.name, p))
                out[p] = 0 if value is None else value
            return out
        finally:
            await consumer.stop()

    async def at_the_end(self) -> bool:
        return await self.committed() == {p: self.counts[p] for p in range(PARTITIONS)}

    async def wait_for_the_end(self, store: OutboxStore, within: float = DEADLINE) -> float:
        """Seconds until every partition is committed to its end."""
        began = time.monotonic()
        try:
            await eventually(self.at_the_end, within=within, interval=0.25)
        except AssertionError:
            lanes = await store.lane_status()
            raise AssertionError(
                f"committed {await self.committed()} of {dict(self.counts)} after {within:g}s; "
                f"lanes: {lanes}"
            ) from None
        return time.monotonic() - began


async def stored(store: OutboxStore, topic: Topic | None = None) -> Counter[tuple[int, str]]:
    """How many times each ``(n, subscriber)`` trigger event is in the outbox (of ``topic``'s
    stream only, when given)."""
    async with store.engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.text(
                    "SELECT (payload->>'n')::int, subscriber FROM outbox_record WHERE"
                    " CAST(:topic AS text) IS NULL OR stream_id IN"
                    " (SELECT id FROM outbox_stream WHERE strpos(key, :topic) > 0)"
                ),
                {"topic": topic.name if topic is not None else None},
            )
        ).all()
    return Counter((int(n), subscriber) for n, subscriber in rows)


def expected(modes: tuple[str, ...], total: int) -> set[tuple[int, str]]:
    return {(n, mode) for n in range(total) for mode in modes if fires(mode, n)}


class Subscribers:
    """Subscribers in this process: what each was handed, and the error that ended it."""

    def __init__(self, manager: SharedStreamManager, topic: Topic) -> None:
        self.manager = manager
        self.topic = topic
        self.handed: Counter[tuple[int, str]] = Counter()
        self.handed_at: dict[str, list[float]] = {}
        self.errors: dict[str, BaseException] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def subscribe(self, mode: str, **options: Any) -> None:
        events = self.manager.subscribe(
            trigger_id=mode, trigger=self.topic.trigger(mode, **options)
        )
        self.errors.pop(mode, None)
        self.tasks[mode] = asyncio.get_running_loop().create_task(self._drain(mode, events))

    async def _drain(self, mode: str, events: AsyncIterator[TriggerEvent]) -> None:
        times = self.handed_at.setdefault(mode, [])
        try:
            async for event in events:
                self.handed[int(event.payload["n"]), mode] += 1
                times.append(time.monotonic())
        except Exception as exc:
            self.errors[mode] = exc

    async def ended(self, mode: str) -> bool:
        return self.tasks[mode].done()

    async def wait_ended(self, mode: str, within: float = 30.0) -> BaseException | None:
        """Wait for ``mode``'s iterator to end; the error it ended with."""

        async def ended() -> bool:
            return self.tasks[mode].done()

        await eventually(ended, within=within)
        return self.errors.get(mode)

    async def wait_handed(self, n: int, mode: str, within: float = 10.0) -> None:
        async def handed() -> bool:
            return (n, mode) in self.handed

        await eventually(handed, within=within)

    async def wait_for_the_end_resubscribing(
        self, modes: tuple[str, ...], store: OutboxStore, within: float = DEADLINE
    ) -> tuple[float, list[BaseException]]:
        """What a triggerer does (Airflow's runs a failed trigger again): subscribe again each
        subscriber whose iterator ended, until the partitions are committed to their ends.
        Seconds it took, and the errors the subscribers ended with meanwhile."""
        errors: list[BaseException] = []

        async def at_the_end() -> bool:
            for mode in modes:
                if self.tasks[mode].done():
                    errors.append(self.errors.get(mode) or AssertionError(f"{mode} ended"))
                    self.subscribe(mode)
            return await self.topic.at_the_end()

        began = time.monotonic()
        try:
            await eventually(at_the_end, within=within, interval=0.25)
        except AssertionError:
            raise AssertionError(
                f"committed {await self.topic.committed()} of {dict(self.topic.counts)} after "
                f"{within:g}s; subscribers ended with {errors}; lanes: {await store.lane_status()}"
            ) from None
        return time.monotonic() - began, errors

    async def close(self) -> None:
        await self.manager.stop_all()
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


def redelivered_twice(
    counted: Counter[tuple[int, str]], uncommitted_from: dict[int, int]
) -> list[tuple[int, str]]:
    """The trigger events stored twice; each must be of a message the broker delivered again
    because it was not committed when its stream failed (from offset ``uncommitted_from``)."""
    twice = sorted(k for k, v in counted.items() if v > 1)
    assert max(counted.values()) <= 2, counted.most_common(3)
    committed = [(n, m) for n, m in twice if n // PARTITIONS < uncommitted_from[n % PARTITIONS]]
    assert not committed, f"stored twice though committed before the failure: {committed[:10]}"
    return twice


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text, text
    assert "SELECT" not in text and "INSERT" not in text, text
    return text


# -- restarts ----------------------------------------------------------------------------------


def _progress(proc: Proc, mode: str) -> int:
    found = re.findall(rf"progress .*\b{mode}=(\d+)", proc.current_run())
    return int(found[-1]) if found else 0


async def test_a_producer_without_identity_restarted_and_killed_reaches_the_end(
    kafka_bootstrap: str, store: OutboxStore, database_url: str, tmp_path: Path
) -> None:
    """The design's Kafka example in a triggerer process: stopped gracefully mid-stream and
    started again, then SIGKILLed mid-stream and started again. After each start the
    partitions reach their ends long before the ack timeout; every trigger event is stored, and
    only those of messages not committed when the process stopped or was killed are stored
    twice (at a graceful stop, only messages some subscriber had not finished yet)."""
    modes = ("all", "even")
    topic = await Topic(kafka_bootstrap).create()
    proc = Proc(
        "triggerer",
        [
            *(sys.executable, "-m", "tests.seed_triggerer"),
            *("--database-url", database_url, "--bootstrap", kafka_bootstrap),
            *("--topic", topic.name, "--group", topic.group, "--modes", ",".join(modes)),
            # A millisecond per message: a thousand a second, so that the stop and the kill
            # come in the middle of the stream.
            *("--delay", "0.001"),
        ],
        tmp_path / "triggerer.log",
    )
    figures: dict[str, float] = {}
    try:
        await topic.produce(5000)
        proc.start()
        await eventually(lambda: _true(_progress(proc, "all") >= 1000), within=60)
        assert proc.stop() == 0, proc.tail()
        assert "subscriber failed" not in proc.current_run(), proc.tail()
        at_stop = await topic.committed()
        figures["committed at the stop"] = sum(at_stop.values())
        await assert_status_true(store, sweep_margin=SWEEP_MARGIN)
        proc.start()
        figures["after graceful restart"] = await topic.wait_for_the_end(store)
        await assert_status_true(store, sweep_margin=SWEEP_MARGIN)
        # Now killed mid-stream.
        handed = _progress(proc, "all")
        await topic.produce(5000)
        await eventually(lambda: _true(_progress(proc, "all") >= handed + 1000), within=60)
        proc.kill()
        at_kill = await topic.committed()
        assert sum(at_kill.values()) < topic.produced, "killed after the end"
        await assert_status_true(store, sweep_margin=SWEEP_MARGIN)
        proc.start()
        figures["after SIGKILL restart"] = await topic.wait_for_the_end(store)
        await assert_status_true(store, sweep_margin=SWEEP_MARGIN)
        assert proc.stop() == 0, proc.tail()
        assert "subscriber failed" not in proc.log_path.read_text(), proc.tail()
    finally:
        proc.ensure_dead()
    await eventually(lambda: settled(store), within=SWEEP_MARGIN)
    counted = await stored(store)
    want = expected(modes, topic.produced)
    assert set(counted) == want, (
        sorted(want - set(counted))[:10],
        sorted(set(counted) - want)[:10],
    )
    # Without identity a message the broker delivers again is a new event for every subscriber:
    # those that had stored its trigger events store them again. The broker delivers again only
    # what was not committed: at the stop (messages whose subscribers had not all resolved them
    # yet) for the first 5000, at the kill for the rest.
    first_batch = topic.produced // 2
    twice = sorted(k for k, v in counted.items() if v > 1)
    redelivered = [
        (n, mode)
        for n, mode in twice
        if n // PARTITIONS >= (at_stop if n < first_batch else at_kill)[n % PARTITIONS]
    ]
    if twice != redelivered:
        async with store.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.text(
                        "SELECT (r.payload->>'n')::int, r.subscriber, e.id, e.position,"
                        " e.recorded_by, e.created_at FROM outbox_record r"
                        " JOIN outbox_event e ON e.id = r.event_id"
                        " WHERE (r.payload->>'n')::int = ANY(:ns) ORDER BY 1, 2, 3"
                    ),
                    {"ns": sorted({n for n, m in twice if (n, m) not in redelivered})[:5]},
                )
            ).all()
        raise AssertionError(
            f"stored twice though committed (at the stop {at_stop}, at the kill {at_kill}): "
            f"{rows}\n{proc.tail(80)}"
        )
    after_stop = sum(1 for n, _ in twice if n < first_batch)
    print(
        f"no identity, default configuration: {topic.produced} messages, committed to the end "
        f"{figures['after graceful restart']:.1f}s after a graceful restart (stopped at "
        f"{figures['committed at the stop']:.0f} of 5000; {after_stop} trigger events stored "
        f"twice, of messages in progress at the stop) and "
        f"{figures['after SIGKILL restart']:.1f}s after a SIGKILL restart "
        f"({len(twice) - after_stop} trigger events stored twice, all of messages not "
        f"committed at the kill)"
    )


async def _true(value: bool) -> bool:
    return value


# -- the database: pool held empty, server stopped ---------------------------------------------


async def test_a_pool_held_empty_is_ridden_out_then_fails_subscribers_clearly(
    kafka_bootstrap: str, database_url: str
) -> None:
    """The manager's pool (two connections, one of them its ``LISTEN`` connection) is held
    empty by someone else in the process: for less than ``outage_limit``
    nobody notices; for longer, the subscribers that were waiting on the database get
    ``DatabaseUnavailable`` (one line), subscribe again with the same trigger ids, and nothing
    is lost or stored twice."""
    modes = ("all", "quiet")
    topic = await Topic(kafka_bootstrap).create()
    store = OutboxStore.from_url(database_url, pool_size=2, max_overflow=0, pool_timeout=0.5)
    other = OutboxStore.from_url(database_url)
    manager = SharedStreamManager(store, outage_limit=4.0)
    subscribers = Subscribers(manager, topic)
    try:
        for mode in modes:
            subscribers.subscribe(mode)
        await topic.produce(200)
        await topic.wait_for_the_end(other)

        async def hold_the_pool(seconds: float, during: int) -> None:
            began = time.monotonic()
            while True:  # the manager's connection comes back to the pool between its uses
                try:
                    held = await store.engine.connect()
                    break
                except PoolTimeout:
                    assert time.monotonic() - began < 10, "the pool never had a connection free"
            try:
                await held.execute(sa.text("SELECT 1"))
                await topic.produce(during)
                await asyncio.sleep(seconds)  # the outage itself, not a wait for a condition
            finally:
                await held.close()

        await hold_the_pool(2.0, 100)  # shorter than outage_limit
        await topic.wait_for_the_end(other)
        assert not subscribers.errors

        await hold_the_pool(8.0, 100)  # longer
        for mode in modes:
            error = await subscribers.wait_ended(mode)
            assert isinstance(error, DatabaseUnavailable), repr(error)
            one_line(error)
        at_failure = await topic.committed()
        await topic.produce(100)
        took, errors = await subscribers.wait_for_the_end_resubscribing(modes, other)
        for error in errors:
            assert isinstance(error, OutboxError), repr(error)
            one_line(error)
        await assert_status_true(other, sweep_margin=SWEEP_MARGIN)
    finally:
        await subscribers.close()
        await store.aclose()
    await eventually(lambda: settled(other), within=SWEEP_MARGIN)
    counted = await stored(other)
    await other.aclose()
    want = expected(modes, topic.produced)
    assert set(counted) == want, sorted(want - set(counted))[:10]
    twice = redelivered_twice(counted, at_failure)
    print(
        f"pool held empty past outage_limit: committed to the end {took:.1f}s after; "
        f"{len(twice)} trigger events stored twice (of messages in progress at the failure)"
    )


async def test_postgres_down_past_outage_limit_with_a_quiet_broker(
    kafka_bootstrap: str, pg_server: PgServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A subscriber is working on an event (it fires no trigger event for it) when Postgres
    stops; nothing else arrives. Its resolution cannot be stored: past ``outage_limit`` it gets
    ``DatabaseUnavailable``, one line, no password. Postgres comes back, it subscribes again,
    the event is handed to it again, and the partitions reach their ends."""
    caplog.set_level(logging.WARNING)
    await migrate(pg_server.url)
    topic = await Topic(kafka_bootstrap).create()
    store = OutboxStore.from_url(pg_server.url)
    # The session outlives the outage (an outage past ``session_ttl`` also ends the session:
    # every subscriber then gets ``SessionLost`` and subscribes again).
    manager = SharedStreamManager(store, outage_limit=2.0, session_ttl=30.0)
    subscribers = Subscribers(manager, topic)
    try:
        subscribers.subscribe("all")
        subscribers.subscribe("quiet", delay=3.0)
        await topic.produce(1)

        async def recorded() -> bool:
            async with store.engine.connect() as conn:
                return bool(await conn.scalar(sa.text("SELECT count(*) FROM outbox_event")))

        await eventually(recorded, within=30)
        await asyncio.to_thread(pg_server.stop)  # while "quiet" works on it
        error = await subscribers.wait_ended("quiet")
        assert isinstance(error, DatabaseUnavailable), repr(error)
        assert PASSWORD not in one_line(error)
        at_failure = await topic.committed()
        await asyncio.to_thread(pg_server.start)
        await topic.produce(20)
        took, errors = await subscribers.wait_for_the_end_resubscribing(("all", "quiet"), store)
        for error in errors:
            assert isinstance(error, OutboxError), repr(error)
            assert PASSWORD not in one_line(error)
        await assert_status_true(store, sweep_margin=SWEEP_MARGIN)
        await eventually(lambda: settled(store), within=SWEEP_MARGIN)
        counted = await stored(store)
        want = expected(("all", "quiet"), topic.produced)
        assert set(counted) == want, sorted(want - set(counted))[:10]
        twice = redelivered_twice(counted, at_failure)
    finally:
        await subscribers.close()
        await store.aclose()
    assert PASSWORD not in caplog.text
    print(
        f"Postgres down past outage_limit, quiet broker: committed {took:.1f}s after restart; "
        f"subscribers ended meanwhile with {[type(e).__name__ for e in errors]}; "
        f"{len(twice)} trigger events stored twice (of messages in progress at the failure)"
    )


# -- subscribers that fail ---------------------------------------------------------------------


def _healthy_rate(subscribers: Subscribers, mode: str) -> float:
    """Events per second handed to ``mode`` from its first one to its last."""
    times = subscribers.handed_at[mode]
    return (len(times) - 1) / (times[-1] - times[0])


async def test_a_subscriber_whose_trigger_event_cannot_be_stored_fails_alone(
    kafka_bootstrap: str, store: OutboxStore
) -> None:
    """One subscriber fires a payload that cannot be stored (an ``object()``), another one of
    300 MiB, more than Postgres stores in a value: each gets a one-line error at once and is
    detached, what they owed fails for them alone, the healthy subscriber keeps its pace, the
    partitions reach their ends, and the same trigger ids can subscribe again."""
    messages = 10_000

    async def healthy_rate(modes: tuple[str, ...]) -> float:
        """The rate of subscriber ``all`` among ``modes``, all healthy: the baselines."""
        baseline = Subscribers(SharedStreamManager(store), await Topic(kafka_bootstrap).create())
        try:
            for mode in modes:
                baseline.subscribe(mode)
            await baseline.topic.produce(messages)
            await baseline.topic.wait_for_the_end(store)
            await eventually(lambda: _true(len(baseline.handed) >= messages), within=10)
        finally:
            await baseline.close()
        return _healthy_rate(baseline, "all")

    huge_text()  # made before the runs: the subscriber's own allocation is not measured
    rate_alone = await healthy_rate(("all",))
    rate_with_healthy = await healthy_rate(("all", "even", "quiet"))

    topic = await Topic(kafka_bootstrap).create()
    manager = SharedStreamManager(store)
    subscribers = Subscribers(manager, topic)
    try:
        for mode in ("all", "unstorable", "huge"):
            subscribers.subscribe(mode)
        await topic.produce(messages)
        for mode in ("unstorable", "huge"):
            text = one_line(await subscribers.wait_ended(mode) or AssertionError("no error"))
            assert "x" * 100 not in text and "object at 0x" not in text, text
        assert "object" in str(subscribers.errors["unstorable"])
        assert "MiB" in str(subscribers.errors["huge"])
        took = await topic.wait_for_the_end(store)
        await eventually(lambda: _true(len(subscribers.handed) >= messages), within=10)
        await assert_status_true(store, sweep_margin=SWEEP_MARGIN)
        # The same trigger ids again: they get what arrives from now on.
        subscribers.subscribe("unstorable")
        subscribers.subscribe("huge")
        await topic.produce(5)
        await topic.wait_for_the_end(store)
        for mode in ("unstorable", "huge"):
            await subscribers.wait_handed(messages, mode)
    finally:
        await subscribers.close()
        forget_huge_text()
    counted = await stored(store, topic)
    all_trigger_events = {k for k in counted if k[1] == "all"}
    assert all_trigger_events == {(n, "all") for n in range(topic.produced)}
    assert max(counted.values()) == 1
    for mode in ("unstorable", "huge"):
        # What it was handed before the bad one (in whatever order the partitions came) and
        # after it subscribed again: each stored once; the bad one never.
        mine = {n for n, m in counted if m == mode}
        assert mine == {n for n, m in subscribers.handed if m == mode}
        assert BAD_N not in mine and set(range(messages, messages + 5)) <= mine
    rate = _healthy_rate(subscribers, "all")
    print(
        f"unstorable trigger events: both failing subscribers detached; the healthy one "
        f"{rate:,.0f} events/s, against {rate_with_healthy:,.0f} with two healthy "
        f"co-subscribers ({rate / rate_with_healthy:.2f} x) and {rate_alone:,.0f} alone "
        f"({rate / rate_alone:.2f} x); "
        f"committed to the end {took:.1f}s after producing"
    )


async def test_the_sweep_and_a_slow_subscriber_agree(
    kafka_bootstrap: str, store: OutboxStore
) -> None:
    """A subscriber takes about as long as the ack timeout on each message, a little less on
    some, a little more on others, while the database-clock sweep runs every second: for each
    message it either has its trigger event stored and handed over, or gets ``AckTimeout`` (and
    subscribes again); never neither."""
    delays = [1.2, 2.8, 1.9, 2.1, 1.8, 2.2, 2.0, 1.6]
    topic = await Topic(kafka_bootstrap).create()
    manager = SharedStreamManager(store, ack_timeout=2.0)
    subscribers = Subscribers(manager, topic)
    outcomes: dict[int, str] = {}
    try:
        subscribers.subscribe("all")
        subscribers.subscribe("slow", delays=delays)
        for n in range(len(delays)):
            await topic.produce(1)

            async def ended_or_handed(n: int = n) -> bool:
                return (n, "slow") in subscribers.handed or await subscribers.ended("slow")

            await eventually(ended_or_handed, within=30)
            if (n, "slow") in subscribers.handed:
                outcomes[n] = "handed"
            else:
                error = subscribers.errors.get("slow")
                assert isinstance(error, AckTimeout), repr(error)
                one_line(error)
                outcomes[n] = "AckTimeout"
                subscribers.subscribe("slow", delays=delays)
            await topic.wait_for_the_end(store)
        await assert_status_true(store, sweep_margin=SWEEP_MARGIN)
    finally:
        await subscribers.close()
    counted = await stored(store)
    for n, outcome in outcomes.items():
        assert counted[n, "slow"] == (1 if outcome == "handed" else 0), (n, outcome)
        assert counted[n, "all"] == 1
    assert set(outcomes.values()) == {"handed", "AckTimeout"}, outcomes
    print(f"slow subscriber against the sweep (ack timeout 2 s, delays {delays}): {outcomes}")

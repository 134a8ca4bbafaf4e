"""The product, end to end: a Kafka topic (tansu), a triggerer process embedding the manager with
three subscribers, and an `outbox committer` process, both SIGKILLed at random moments and
restarted, until every partition is committed to its end. Then: every message's trigger events
are in the outbox exactly once for each subscriber that accepted it, every rejected message is on
the dead-letter topic, each partition is committed exactly to its end, and no commit went
backwards.

Commits are checked twice: the stream's producer (``tests.e2e.triggers.CommitLoggingProducer``)
logs every commit it makes to ``e2e_commit_log`` in the test database (a kill between a commit
and its row loses the row, never invents one), and the test samples the group's committed
offsets from Kafka every few hundred milliseconds while the processes run. Both sequences must be
non-decreasing per partition (the log: strictly increasing).

The ack timeout is 60 s, so no delivery times out. What a killed triggerer's subscribers were
owed stays theirs and moves to them as they join again from the restarted triggerer, which hands
it out from Postgres (and deduplicates the broker's redelivery into it): the test asserts that no
delivery failed at all. Set ``OUTBOX_CRASH_SEED`` to replay a run's kill schedule.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.e2e.triggers import COMMIT_LOG_TABLE, MODES, fires, rejects
from tests.invariants import settled, tally
from tests.polling import eventually
from tests.test_kafka import create_topic

if TYPE_CHECKING:
    from outbox import OutboxStore

ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = 4
MESSAGES = 20_000
SLOW_DELAY = 0.001  # the 'even' subscriber's time per message: it trails, deliveries stay owed
KILLS = 10  # at least this many SIGKILLs of each process
ACK_TIMEOUT = 60.0


class Proc:
    """One of the two long-running processes, restarted after each kill; output to a file."""

    def __init__(self, name: str, command: list[str], log_path: Path) -> None:
        self.name = name
        self.command = command
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        self.starts += 1

    def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} died on its own: {self.tail()}")
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.kills += 1

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def ensure_dead(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def current_run(self) -> str:
        """What the process printed since its latest start."""
        return self.log_path.read_text(errors="replace").rsplit("--- start", 1)[-1]

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


async def produce(bootstrap: str, topic: str, first: int, last: int, counts: Counter[int]) -> None:
    """Messages ``{"n": n}`` for ``first <= n < last``, ``n`` to partition ``n % PARTITIONS``
    (at offset ``n // PARTITIONS``)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for n in range(first, last):
            await producer.send(
                topic, json.dumps({"n": n}).encode(), key=f"k{n}".encode(), partition=n % 4
            )
        await producer.flush()
    finally:
        await producer.stop()
    counts.update(n % PARTITIONS for n in range(first, last))


class CommittedSampler:
    """Reads the group's committed offsets from Kafka over and over; each sequence must never
    go down."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
        )
        self.tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        self.samples: dict[int, list[int]] = {p: [] for p in range(PARTITIONS)}

    async def read(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for tp in self.tps:
            value = await self.consumer.committed(tp)
            out[tp.partition] = -1 if value is None else value
            self.samples[tp.partition].append(out[tp.partition])
        return out

    async def run(self, interval: float) -> None:
        while True:
            await self.read()
            await asyncio.sleep(interval)


async def read_dead_letters(bootstrap: str, topic: str, expected: set[int]) -> list[int]:
    """Every ``n`` on the dead-letter topic, read to its high watermark (tansu's
    ``end_offsets`` is wrong; the fetch's high watermark is right)."""
    tp = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    seen: list[int] = []
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        async with asyncio.timeout(30):
            while True:
                batch = await consumer.getmany(tp, timeout_ms=500)
                for message in batch.get(tp, []):
                    assert message.value is not None
                    seen.append(json.loads(message.value)["n"])
                highwater = consumer.highwater(tp)
                if (
                    expected <= set(seen)
                    and highwater is not None
                    and await consumer.position(tp) >= highwater
                ):
                    return seen
    finally:
        await consumer.stop()


async def test_triggerer_and_committer_killed_at_random_lose_and_duplicate_nothing(
    kafka_bootstrap: str, store: OutboxStore, database_url: str, tmp_path: Path
) -> None:
    seed = int(os.environ.get("OUTBOX_CRASH_SEED", random.randrange(1 << 30)))
    print(f"crash seed: {seed} (set OUTBOX_CRASH_SEED to replay)")
    rnd = random.Random(seed)
    began = time.monotonic()
    topic = await create_topic(kafka_bootstrap, partitions=PARTITIONS)
    dlq = await create_topic(kafka_bootstrap)
    group = f"g-{uuid.uuid4().hex[:8]}"
    async with store.engine.begin() as conn:
        await conn.execute(sa.text(COMMIT_LOG_TABLE))
    counts: Counter[int] = Counter()
    await produce(kafka_bootstrap, topic, 0, MESSAGES, counts)

    triggerer = Proc(
        "triggerer",
        [
            *(sys.executable, "-m", "tests.e2e.triggerer", "--database-url", database_url),
            *("--bootstrap", kafka_bootstrap, "--topic", topic, "--group", group, "--dlq", dlq),
            *("--ack-timeout", str(ACK_TIMEOUT), "--slow-delay", str(SLOW_DELAY)),
        ],
        tmp_path / "triggerer.log",
    )
    committer = Proc(
        "committer",
        [
            *(sys.executable, "-m", "outbox", "committer", "--database-url", database_url),
            *("--allow-module", "tests.e2e", "--poll-interval", "0.2", "--lease-seconds", "1"),
        ],
        tmp_path / "committer.log",
    )
    sampler = CommittedSampler(kafka_bootstrap, group, topic)
    await sampler.consumer.start()
    sampling = asyncio.create_task(sampler.run(0.3))
    both = 0
    try:
        triggerer.start()
        committer.start()
        # Kills at random moments, either process or both at once, each restarted at once.
        while min(triggerer.kills, committer.kills) < KILLS:
            await asyncio.sleep(rnd.uniform(0.3, 2.5))
            victims = rnd.choices(
                [[triggerer], [committer], [triggerer, committer]], weights=[2, 2, 1]
            )[0]
            both += len(victims) == 2
            for proc in victims:
                proc.kill()
            for proc in victims:
                proc.start()
        chaos = time.monotonic() - began
        print(
            f"{triggerer.kills} triggerer kills, {committer.kills} committer kills "
            f"({both} together) in {chaos:.1f}s; committed then: {await sampler.read()}"
        )

        async def all_committed() -> bool:
            return await sampler.read() == dict(counts)

        try:
            await eventually(all_committed, within=120, interval=0.3)
        except AssertionError:
            raise AssertionError(
                f"committed {await sampler.read()} of {dict(counts)}\n"
                f"triggerer:\n{triggerer.tail()}\ncommitter:\n{committer.tail()}"
            ) from None
        await eventually(lambda: settled(store), within=30, interval=0.2)

        async def started() -> bool:  # the last starts may not have reached main() yet
            return "ready pid=" in triggerer.current_run() and (
                "committer started" in committer.current_run()
            )

        await eventually(started, within=30, interval=0.1)
        assert triggerer.stop() == 0, triggerer.tail()
        assert committer.stop() == 0, committer.tail()
    finally:
        sampling.cancel()
        await asyncio.gather(sampling, return_exceptions=True)
        await sampler.consumer.stop()
        triggerer.ensure_dead()
        committer.ensure_dead()
    finished = time.monotonic() - began
    assert "subscriber failed" not in triggerer.current_run(), triggerer.current_run()

    # Each partition committed exactly to its end.
    assert await sampler.read() == dict(counts) == dict.fromkeys(range(PARTITIONS), 5000)

    # Trigger events: exactly once per (message, subscriber that fired for it), nothing else.
    counted = await tally(store)
    rows, failed, occurrences = counted.records, counted.failed, counted.occurrences
    async with store.engine.connect() as conn:
        log = (
            await conn.execute(
                sa.text("SELECT partition, committed, previous FROM e2e_commit_log ORDER BY id")
            )
        ).all()
    counted.assert_each_stored_once()
    stored: dict[tuple[int, str], int] = {}
    for identity, subscriber, n, _ in rows:
        assert identity is not None, (subscriber, n)
        ident_topic, partition, offset = identity.rsplit(":", 2)
        assert ident_topic == topic
        assert int(offset) * PARTITIONS + int(partition) == n, (identity, n)
        stored[n, subscriber] = stored.get((n, subscriber), 0) + 1
    expected = {(n, mode) for n in range(MESSAGES) for mode in MODES if fires(mode, n)}
    assert set(stored) == expected, (
        sorted(expected - set(stored))[:10],
        sorted(set(stored) - expected)[:10],
    )
    assert failed == 0  # nobody was failed: what a killed triggerer owed moved to its restart

    # Dead letters: every rejected message (repeats allowed: a rejected message read again
    # after a kill, before its commit, is dead-lettered again), no accepted one.
    rejected = {n for n in range(MESSAGES) if rejects(n)}
    dead = await read_dead_letters(kafka_bootstrap, dlq, rejected)
    assert set(dead) == rejected
    repeats = len(dead) - len(set(dead))

    # Commits never went backwards, as logged by the producer and as sampled from Kafka.
    per_partition: dict[int, list[tuple[int, int | None]]] = {}
    for partition, offset, previous in log:
        per_partition.setdefault(partition, []).append((offset, previous))
    for partition, commits in per_partition.items():
        offsets = [offset for offset, _ in commits]
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets), partition
        assert all(previous is None or previous < offset for offset, previous in commits)
        assert offsets[-1] <= counts[partition]
    for partition, samples in sampler.samples.items():
        assert samples == sorted(samples), partition
    print(
        f"{MESSAGES} messages, {occurrences} event occurrences "
        f"({occurrences - MESSAGES} re-recorded after being read again), "
        f"{len(rows)} trigger events, "
        f"{len(log)} logged commits, {len(dead)} dead letters ({repeats} repeated), "
        f"{triggerer.kills}+{committer.kills} kills, {finished:.1f}s"
    )

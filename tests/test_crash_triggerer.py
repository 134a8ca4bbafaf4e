"""Crash test (issue 3): SIGKILL a triggerer process at random moments, restart it, and check
from the database that every stored trigger event is tied to an ``acked`` resolution and that
none is duplicated after the broker redelivers.

The triggerer is ``tests/crash/triggerer.py``: three subscribers on one stream fed by a fake
Kafka-like broker whose committed offsets live in the same database. Kill delays come from a
seeded RNG; the seed is printed, and ``CRASH_TEST_SEED=<seed>`` replays the same delays.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from outbox import OutboxStore, SharedStreamManager
from tests.crash.triggerer import SUBSCRIBERS, event_key, expected_payloads, partition_sizes
from tests.streams import Gate, RecordingProducer, StreamTrigger, collect

if TYPE_CHECKING:
    from datetime import datetime

ROOT = Path(__file__).resolve().parent.parent

EVENTS = 4000
PARTITIONS = 3
KILLS = 24
"""Kills at random moments while the log is being consumed."""
TAIL_KILLS = 3
"""More kills after the broker handed out the whole log (backlog, last advances, shutdown)."""
MIN_KILLS = 20
MAX_DELAY = 1.2
"""Seconds after ``ready`` within which a kill lands."""
EARLY_KILL_CHANCE = 0.15
"""Share of kills timed from the spawn instead, most of them during start-up."""
STARTUP_DEADLINE = 60.0
FINISH_DEADLINE = 120.0

TRIGGERER_ARGS = (
    "--events",
    str(EVENTS),
    "--partitions",
    str(PARTITIONS),
    "--subscriber-delay",
    "0.004",
    "--advance-delay",
    "0.01",
    "--owner",
    "crash-triggerer",
    # Commit through the batch's last item, as the seed's Kafka example does: only right if
    # every lane stays in broker order across redeliveries.
    "--commit-through",
    "last",
)


@dataclass
class Run:
    """One triggerer process and what it printed."""

    number: int
    proc: asyncio.subprocess.Process
    stderr_path: Path
    lines: list[str] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    exhausted: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if line.startswith("ready"):
                self.ready.set()
            elif line.startswith("exhausted"):
                self.exhausted.set()

    def describe(self) -> str:
        stderr = self.stderr_path.read_text(errors="replace")[-3000:]
        return (
            f"run {self.number} (pid {self.proc.pid}, rc {self.proc.returncode})\n"
            f"stdout:\n" + "\n".join(self.lines[-20:]) + f"\nstderr (tail):\n{stderr}"
        )


async def spawn(database_url: str, number: int, log_dir: Path) -> Run:
    stderr_path = log_dir / f"triggerer-{number:02d}.stderr"
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.crash.triggerer",
            "--database-url",
            database_url,
            "--seed",
            str(number),
            *TRIGGERER_ARGS,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    run = Run(number, proc, stderr_path)
    run.reader = asyncio.get_running_loop().create_task(run.read())
    return run


async def first_of(run: Run, event: asyncio.Event, deadline: float) -> bool:
    """Wait for ``event`` or the process's exit, whichever comes first; True for ``event``.
    Fails past ``deadline`` seconds."""
    waiter = asyncio.ensure_future(event.wait())
    exit_waiter = asyncio.ensure_future(run.proc.wait())
    try:
        done, _ = await asyncio.wait(
            {waiter, exit_waiter}, timeout=deadline, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        waiter.cancel()
        if not exit_waiter.done():
            exit_waiter.cancel()
    if not done:
        raise AssertionError(f"neither the event nor an exit within {deadline}s\n{run.describe()}")
    return waiter in done and event.is_set()


async def exited_within(run: Run, seconds: float) -> bool:
    """Let the process run for ``seconds``; True if it exited meanwhile."""
    try:
        await asyncio.wait_for(asyncio.shield(run.proc.wait()), seconds)
    except TimeoutError:
        return False
    return True


async def finish(run: Run, deadline: float) -> int:
    try:
        rc = await asyncio.wait_for(run.proc.wait(), deadline)
    except TimeoutError:
        run.proc.kill()
        await run.proc.wait()
        raise AssertionError(
            f"the triggerer did not exit within {deadline}s\n{run.describe()}"
        ) from None
    if run.reader is not None:
        await asyncio.wait_for(run.reader, 10)
    return rc


@dataclass
class Campaign:
    kills: int = 0
    early_kills: int = 0
    tail_kills: int = 0
    kill_times: list[float] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)


async def kill(run: Run, campaign: Campaign) -> bool:
    """SIGKILL the process unless it already exited 0; True if it was killed."""
    if run.proc.returncode is None:
        run.proc.send_signal(signal.SIGKILL)
        campaign.kill_times.append(time.time())
    rc = await finish(run, 10)
    if rc == -signal.SIGKILL:
        campaign.kills += 1
        return True
    assert rc == 0, f"triggerer failed on its own\n{run.describe()}"
    return False


async def crash_campaign(database_url: str, rng: random.Random, log_dir: Path) -> Campaign:
    """Kill the triggerer ``KILLS + TAIL_KILLS`` times at random moments, then let it finish."""
    campaign = Campaign()
    number = 0
    while True:
        number += 1
        run = await spawn(database_url, number, log_dir)
        campaign.runs.append(run)
        if campaign.kills >= KILLS + TAIL_KILLS:
            rc = await finish(run, FINISH_DEADLINE)
            assert rc == 0, f"the last run failed\n{run.describe()}"
            return campaign
        if campaign.kills >= KILLS:
            # Tail: the whole log is out; the backlog, the last advances and shutdown remain.
            if await first_of(run, run.exhausted, STARTUP_DEADLINE) and not await exited_within(
                run, rng.uniform(0.0, 2.0)
            ):
                campaign.tail_kills += 1
        elif rng.random() < EARLY_KILL_CHANCE:
            campaign.early_kills += 1
            await exited_within(run, rng.uniform(0.0, 1.5))
        elif await first_of(run, run.ready, STARTUP_DEADLINE):
            await exited_within(run, rng.uniform(0.0, MAX_DELAY))
        if not await kill(run, campaign):
            # It finished on its own: nothing left to crash.
            return campaign


async def rows(conn: psycopg.AsyncConnection[Any], query: str) -> list[tuple[Any, ...]]:
    cursor = await conn.execute(query)
    return await cursor.fetchall()


async def test_sigkill_triggerer_at_random_points(database_url: str, tmp_path: Path) -> None:
    seed = int(os.environ.get("CRASH_TEST_SEED") or random.randrange(2**32))
    print(f"crash test seed: {seed} (replay with CRASH_TEST_SEED={seed})")
    started = time.monotonic()
    campaign = await crash_campaign(database_url, random.Random(seed), tmp_path)
    elapsed = time.monotonic() - started
    print(
        f"{campaign.kills} kills ({campaign.early_kills} timed from spawn, "
        f"{campaign.tail_kills} after the log was out) over {len(campaign.runs)} runs "
        f"in {elapsed:.1f}s; logs in {tmp_path}"
    )
    assert campaign.kills >= MIN_KILLS, (
        f"only {campaign.kills} kills before the triggerer finished; the log is too short "
        f"for the kill delays (seed {seed})"
    )

    sizes = partition_sizes(EVENTS, PARTITIONS)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        # 1. Every stored trigger event is tied to an event and an acked resolution of its
        #    subscriber.
        untied = await rows(
            conn,
            """
            SELECT r.id, r.event_id, r.subscriber, d.state FROM outbox_record AS r
            LEFT JOIN outbox_delivery AS d
              ON d.event_id = r.event_id AND d.subscriber = r.subscriber
            WHERE r.event_id IS NULL OR d.state IS DISTINCT FROM 'acked'
            LIMIT 20
            """,
        )
        assert untied == [], f"records without an acked resolution: {untied}"

        # 2. No (event identity, subscriber, ordinal) twice, across all occurrences.
        duplicated = await rows(
            conn,
            """
            SELECT e.identity, r.subscriber, r.ordinal, count(*) FROM outbox_record AS r
            JOIN outbox_event AS e ON e.id = r.event_id
            GROUP BY 1, 2, 3 HAVING count(*) > 1 ORDER BY 1, 2, 3 LIMIT 20
            """,
        )
        assert duplicated == [], f"duplicated records after redelivery: {duplicated}"

        # 3. Every message has exactly its expected records for each subscriber.
        stored = Counter(
            (identity, subscriber, ordinal, repr(sorted(payload.items())))
            for identity, subscriber, ordinal, payload in await rows(
                conn,
                """
                SELECT e.identity, r.subscriber, r.ordinal, r.payload FROM outbox_record AS r
                JOIN outbox_event AS e ON e.id = r.event_id
                """,
            )
        )
        expected = Counter(
            (event_key(p, o), subscriber, n, repr(sorted(payload.items())))
            for p, size in enumerate(sizes)
            for o in range(size)
            for subscriber in SUBSCRIBERS
            for n, payload in enumerate(expected_payloads(subscriber, p, o))
        )
        missing = sorted((expected - stored).elements())
        extra = sorted((stored - expected).elements())
        assert not missing and not extra, (
            f"{len(missing)} records missing (first {missing[:5]}), "
            f"{len(extra)} unexpected (first {extra[:5]})"
        )

        # 4. Each subscriber resolved each message once (its own resolution, not one carried
        #    over from an earlier occurrence), acked; nothing failed, nothing owes anything.
        resolutions = Counter(
            (identity, subscriber, state, carried)
            for identity, subscriber, state, carried in await rows(
                conn,
                """
                SELECT e.identity, d.subscriber, d.state, d.reason IS NOT NULL
                FROM outbox_delivery AS d JOIN outbox_event AS e ON e.id = d.event_id
                """,
            )
        )
        not_acked = [k for k in resolutions if k[2] != "acked"]
        assert not_acked == [], f"resolutions other than acked: {not_acked[:10]}"
        own: Counter[tuple[str, str]] = Counter()
        for (identity, subscriber, _, carried), n in resolutions.items():
            if not carried:
                own[identity, subscriber] += n
        wrong = [
            (event_key(p, o), s, own[event_key(p, o), s])
            for p, size in enumerate(sizes)
            for o in range(size)
            for s in SUBSCRIBERS
            if own[event_key(p, o), s] != 1
        ]
        assert wrong == [], (
            f"(identity, subscriber, own resolutions) not exactly once: {wrong[:10]}"
        )
        pending = await rows(
            conn, "SELECT id, identity, pending FROM outbox_event WHERE pending > 0 LIMIT 10"
        )
        assert pending == [], f"events still owing resolutions: {pending}"

        # 5. Lanes: one per partition, positions gap-free, advanced through the end; every
        #    event in the lane of its partition.
        lanes = await rows(
            conn,
            """
            SELECT l.lane_key, l.next_position, l.advanced_through, count(e.id),
                   coalesce(max(e.position), 0),
                   count(*) FILTER (WHERE split_part(e.identity, ':', 1) <> l.lane_key)
            FROM outbox_lane AS l LEFT JOIN outbox_event AS e ON e.lane_id = l.id
            GROUP BY l.id ORDER BY l.lane_key
            """,
        )
        assert [lane[0] for lane in lanes] == [str(p) for p in range(PARTITIONS)]
        for key, next_position, advanced_through, count, top, foreign in lanes:
            assert count == top == next_position - 1 == advanced_through, (
                f"lane {key}: {count} events, top position {top}, next {next_position}, "
                f"advanced through {advanced_through}"
            )
            assert foreign == 0, f"lane {key} holds {foreign} events of other partitions"

        # 6. The broker: each partition committed exactly to its message count.
        committed = dict(await rows(conn, "SELECT partition, committed FROM crash_broker_offset"))
        assert committed == dict(enumerate(sizes))

        # 7. The advance log: one partition per batch, never backwards, no event covered while
        #    it still owed a resolution, every outcome clean (3 acked).
        log = await rows(
            conn,
            """
            SELECT id, pid, partition, partitions, items, first_offset, last_offset, max_offset,
                   committed_before, committed_after, pending_events, unclean
            FROM crash_advance_log ORDER BY id
            """,
        )
        last_committed = dict.fromkeys(range(PARTITIONS), 0)
        advanced_top = dict.fromkeys(range(PARTITIONS), -1)
        readvanced = out_of_order = 0
        for entry in log:
            (_, _, p, partitions, items, first, last, top, before, after, pending_n, unclean) = (
                entry
            )
            assert partitions == 1, f"advance spanning partitions: {entry}"
            assert before == last_committed[p], f"commit moved outside the log: {entry}"
            assert after >= before, f"advance moved partition {p} backwards: {entry}"
            assert after == max(before, top + 1), f"not a cumulative commit: {entry}"
            assert pending_n == 0, f"advance covered an event with a pending delivery: {entry}"
            assert unclean == 0, f"advance with an outcome other than 3 acked: {entry}"
            assert items >= 1
            last_committed[p] = after
            if first < before:
                readvanced += 1
            if last < max(top, advanced_top[p]):
                out_of_order += 1
            advanced_top[p] = max(advanced_top[p], top)
        assert last_committed == dict(enumerate(sizes))

        # What the kills hit, as evidence they landed in every phase.
        occurrences = await rows(
            conn,
            """
            SELECT count(*) FILTER (WHERE n > 1), coalesce(max(n), 0) FROM (
                SELECT identity, count(*) AS n FROM outbox_event GROUP BY identity) AS x
            """,
        )
        times = await rows(
            conn,
            """
            SELECT e.id, min(d.resolved_at), max(d.resolved_at) FROM outbox_event AS e
            JOIN outbox_delivery AS d ON d.event_id = e.id AND d.reason IS NULL GROUP BY e.id
            """,
        )
    straddling = sum(
        1
        for _, first_at, last_at in times
        if any(_between(first_at, t, last_at) for t in campaign.kill_times)
    )
    carried = sum(n for (_, _, _, c), n in resolutions.items() if c)
    print(
        f"advances: {len(log)} ({readvanced} re-covering committed offsets, {out_of_order} "
        f"ending below an offset already advanced); identities "
        f"recorded more than once: {occurrences[0][0]} (max {occurrences[0][1]}); carried "
        f"resolutions: {carried}; events resolved partly before and partly after a kill: "
        f"{straddling}"
    )


def _key_of(payload: Any) -> str:
    return event_key(int(payload[0]), int(payload[1]))


def _lane_of(payload: Any) -> int:
    return int(payload[0])


def _between(first: datetime, moment: float, last: datetime) -> bool:
    return first.timestamp() < moment < last.timestamp()


async def test_advance_batches_keep_broker_order(store: OutboxStore) -> None:
    """Minimal form of the stall the crash test hits with ``--commit-through last``.

    Triggerer A records offsets 0, 1, 2 of partition 0; its subscriber resolves 0 and 1 and is
    still on 2 when A goes away before anything is advanced. Triggerer B gets the partition
    again from offset 0 (nothing was committed), and its subscriber finishes 2 and pulls 3.
    Everything resolved is then advanced. A Kafka producer commits ``batch[-1].offset + 1``;
    that is only right if no batch ends below an offset already advanced on its lane.
    """
    first = RecordingProducer(
        [({"o": o}, (0, o)) for o in range(3)], key_for=_key_of, lane_for=_lane_of
    )
    StreamTrigger.PRODUCERS["crash-order"] = first
    gate = Gate()
    async with SharedStreamManager(store, run_committer=False) as manager:
        events = manager.subscribe(
            trigger_id="s", trigger=StreamTrigger(name="crash-order", gate=gate)
        )
        for pulled in (1, 2):
            await gate.arrived(pulled)
            gate.release()
        await gate.arrived(3)  # on offset 2
        assert await collect(events, 2) == [{"o": 0}, {"o": 1}]  # 0 and 1 acked, 2 pending
    assert first.advanced == []

    second = RecordingProducer(
        [({"o": o}, (0, o)) for o in range(4)], key_for=_key_of, lane_for=_lane_of
    )
    StreamTrigger.PRODUCERS["crash-order"] = second
    gate = Gate()
    async with SharedStreamManager(store) as manager:  # stopping advances what is resolved
        events = manager.subscribe(
            trigger_id="s", trigger=StreamTrigger(name="crash-order", gate=gate)
        )
        await gate.arrived(1)
        gate.release()
        await gate.arrived(2)  # on offset 3
        # 0 and 1 are not handed out again; 2 is acked, 3 pending.
        assert gate.pulled == [{"o": 2}, {"o": 3}]
        assert await collect(events, 1) == [{"o": 2}]

    offsets = [[int(payload[1]) for payload in batch] for batch in second.batches]
    assert 2 in {o for batch in offsets for o in batch}, offsets
    advanced_so_far = -1
    for batch in offsets:
        advanced_so_far = max(advanced_so_far, *batch)
        # A commit of batch[-1] + 1 must cover everything advanced on the lane so far.
        assert batch[-1] == advanced_so_far, f"batch ends below an advanced offset: {offsets}"


_EXIT_WITHOUT_STOP_ALL = """
import asyncio, sys
from outbox import OutboxStore, SharedStreamManager
from tests.streams import RecordingProducer, StreamTrigger, collect

async def main() -> None:
    store = OutboxStore.from_url(sys.argv[1])
    StreamTrigger.PRODUCERS["q"] = RecordingProducer([({"n": i}, f"p{i}") for i in range(3)])
    manager = SharedStreamManager(store)
    events = manager.subscribe(trigger_id=1, trigger=StreamTrigger())
    assert await collect(events, 2) == [{"n": 0}, {"n": 1}]
    raise SystemExit(7)  # the triggerer's main fails before it could call stop_all

asyncio.run(main())
"""


async def test_process_exits_when_main_fails_without_stop_all(database_url: str) -> None:
    """A triggerer whose main coroutine raises must still exit (so it can be restarted)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _EXIT_WITHOUT_STOP_ALL,
        database_url,
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        rc = await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("the process hung in asyncio.run's teardown") from None
    assert rc == 7

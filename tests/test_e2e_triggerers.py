"""Several triggerers on one stream (issue 17): triggerer processes with different subscribers of
one Kafka topic (4 partitions), one `outbox committer`, SIGKILLed at random and restarted, each
triggerer also stopped gracefully once; a subscriber moving from one triggerer to another; a
subscriber that ran on a triggerer killed for good.

One triggerer reads the topic (the one whose session holds the stream's consumer); the others
hand their subscribers what Postgres says they are owed. Afterwards: every subscriber stored
every message it fires for exactly once, whichever triggerer read it; each partition is
committed to its end; and no commit ever ran ahead of a subscriber on another triggerer: for each
commit the producer logged (``e2e_commit_log``, written after the commit), every message below
it that some subscriber fires for was stored before it (its record's transaction began before the
commit was logged).
"""

from __future__ import annotations

import asyncio
import random
import re
import sys
import time
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from tests.e2e.triggers import COMMIT_LOG_TABLE, GHOST, MODES, fires, rejects
from tests.invariants import settled, tally
from tests.polling import eventually
from tests.streams import wait_until
from tests.test_e2e_kafka import (
    PARTITIONS,
    CommittedSampler,
    Proc,
    produce,
    read_dead_letters,
)
from tests.test_kafka import create_topic

if TYPE_CHECKING:
    from pathlib import Path

    from outbox import OutboxStore

MESSAGES = 10_000
SESSION_TTL = 3.0  # a killed reader's producer is taken over this soon
ACK_TIMEOUT = 60.0


class Cluster:
    """The triggerer processes (each running the modes its file lists) and the committer."""

    def __init__(
        self, kafka: str, database_url: str, tmp_path: Path, layout: dict[str, list[str]]
    ) -> None:
        self.kafka = kafka
        self.database_url = database_url
        self.tmp_path = tmp_path
        self.layout = layout
        self.triggerers: dict[str, Proc] = {}
        self.committer: Proc | None = None

    def modes_file(self, name: str) -> Path:
        return self.tmp_path / f"{name}.modes"

    def set_modes(self, name: str, modes: list[str]) -> None:
        self.modes_file(name).write_text(",".join(modes))

    async def start(self, topic: str, group: str, dlq: str) -> None:
        for name, modes in self.layout.items():
            self.set_modes(name, modes)
            self.triggerers[name] = Proc(
                name,
                [
                    *(sys.executable, "-m", "tests.e2e.triggerer"),
                    *("--database-url", self.database_url, "--bootstrap", self.kafka),
                    *("--topic", topic, "--group", group, "--dlq", dlq),
                    *("--ack-timeout", str(ACK_TIMEOUT), "--slow-delay", "0.0005"),
                    *("--session-ttl", str(SESSION_TTL), "--redelivery-delay", "1"),
                    *("--modes-file", str(self.modes_file(name))),
                ],
                self.tmp_path / f"{name}.log",
            )
        self.committer = Proc(
            "committer",
            [
                *(sys.executable, "-m", "outbox", "committer"),
                *("--database-url", self.database_url, "--allow-module", "tests.e2e"),
                *("--poll-interval", "0.2", "--lease-seconds", "1"),
            ],
            self.tmp_path / "committer.log",
        )
        # Subscribers on every triggerer are registered before the first message is read
        # (a triggerer that starts later is a late subscriber and misses what came before).
        for proc in self.triggerers.values():
            proc.start()
        for proc in self.triggerers.values():
            await wait_until(lambda p=proc: "ready pid=" in p.current_run(), within=30)  # type: ignore[misc]
        self.committer.start()

    def procs(self) -> list[Proc]:
        assert self.committer is not None
        return [*self.triggerers.values(), self.committer]

    def tails(self) -> str:
        return "\n".join(f"--- {p.name}:\n{p.tail(15)}" for p in self.procs())

    def ensure_dead(self) -> None:
        for proc in self.procs():
            proc.ensure_dead()


async def registered_in(store: OutboxStore, mode: str, proc: Proc) -> bool:
    """Whether subscriber ``mode``'s live registration belongs to ``proc``'s session."""
    async with store.engine.connect() as conn:
        owner = await conn.scalar(
            sa.text(
                "SELECT s.owner FROM outbox_subscriber AS r"
                " JOIN outbox_session AS s ON s.id = r.session_id"
                " WHERE r.name = :mode AND NOT r.excluded AND s.ended_at IS NULL"
            ),
            {"mode": mode},
        )
    pid = proc.proc.pid if proc.proc is not None else None
    return owner is not None and owner.split(":")[1] == str(pid)


async def commits_never_ran_ahead(store: OutboxStore, modes: list[str]) -> int:
    """For every logged commit, every message below it that a subscriber fires for was stored
    before the commit; returns how many commits were checked."""
    async with store.engine.connect() as conn:
        log = (
            await conn.execute(sa.text("SELECT partition, committed, at FROM e2e_commit_log"))
        ).all()
        stored = (
            await conn.execute(
                sa.text(
                    "SELECT (payload->>'n')::int, subscriber, min(created_at) "
                    "FROM outbox_record GROUP BY 1, 2"
                )
            )
        ).all()
    at: dict[tuple[int, str], Any] = {(n, s): t for n, s, t in stored}
    # Per partition and subscriber: the latest store time of the first k messages it fires for.
    latest: dict[tuple[int, str], list[Any]] = {}
    for partition in range(PARTITIONS):
        for mode in modes:
            running: Any = None
            prefix: list[Any] = []
            for offset in range(MESSAGES // PARTITIONS):
                n = offset * PARTITIONS + partition
                if fires(mode, n):
                    when = at.get((n, mode))
                    assert when is not None, f"message {n} never stored for {mode}"
                    running = when if running is None else max(running, when)
                prefix.append(running)
            latest[partition, mode] = prefix
    for partition, committed, logged_at in log:
        for mode in modes:
            if committed > 0:
                last = latest[partition, mode][committed - 1]
                assert last is None or last < logged_at, (
                    f"partition {partition} committed to {committed} at {logged_at} before "
                    f"{mode} stored a message below it at {last}"
                )
    return len(log)


async def run(
    kafka_bootstrap: str,
    store: OutboxStore,
    database_url: str,
    tmp_path: Path,
    layout: dict[str, list[str]],
    *,
    move: tuple[str, str, str] | None = None,
    ghost: bool = False,
) -> None:
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rnd = random.Random(seed)
    began = time.monotonic()
    topic = await create_topic(kafka_bootstrap, partitions=PARTITIONS)
    dlq = await create_topic(kafka_bootstrap)
    group = f"g-{uuid.uuid4().hex[:8]}"
    async with store.engine.begin() as conn:
        await conn.execute(sa.text(COMMIT_LOG_TABLE))
    counts: Counter[int] = Counter()
    cluster = Cluster(kafka_bootstrap, database_url, tmp_path, layout)
    if ghost:
        # A triggerer with a subscriber of its own, killed for good once the stream runs.
        cluster.layout = {**layout, "doomed": [GHOST]}
    sampler = CommittedSampler(kafka_bootstrap, group, topic)
    await sampler.consumer.start()
    sampling = asyncio.create_task(sampler.run(0.3))
    try:
        await cluster.start(topic, group, dlq)
        await produce(kafka_bootstrap, topic, 0, MESSAGES // 2, counts)
        if ghost:
            doomed = cluster.triggerers.pop("doomed")
            await wait_until(lambda: "progress" in doomed.current_run(), within=30)
            doomed.kill()
        names = sorted(cluster.triggerers)
        gracefully = set(names)
        kills = 0
        produced_rest = False
        while kills < 6 or gracefully:
            await asyncio.sleep(rnd.uniform(0.5, 2.5))
            if kills == 2 and not produced_rest:
                await produce(kafka_bootstrap, topic, MESSAGES // 2, MESSAGES, counts)
                produced_rest = True
                if move is not None:
                    # A subscriber moves: it joins on another triggerer (the stream's messages
                    # from then on are owed to it there; what it still owed on the first is
                    # failed and read again), then leaves the first one.
                    mode, source, target = move
                    cluster.set_modes(target, [*layout[target], mode])
                    joined = cluster.triggerers[target]
                    # Subscribed by the running process, or (restarted meanwhile) at its start.
                    joined_it = re.compile(rf"subscribed {mode}\b|ready pid=\d+ modes=.*\b{mode}\b")
                    await wait_until(
                        lambda: joined_it.search(joined.current_run()) is not None,  # noqa: B023
                        within=30,
                    )
                    # That line is printed before the registration commits: leave the first
                    # triggerer only once the mode's registration is the target's, or the
                    # messages read in between are owed to it nowhere (and committed past).
                    await eventually(
                        lambda: registered_in(store, mode, joined),  # noqa: B023
                        within=30,
                        interval=0.1,
                    )
                    cluster.set_modes(source, [m for m in layout[source] if m != mode])
            if gracefully and rnd.random() < 0.3:
                name = gracefully.pop()
                proc = cluster.triggerers[name]
                await wait_until(lambda: "ready pid=" in proc.current_run(), within=30)  # noqa: B023
                assert proc.stop() == 0, proc.tail()
                proc.start()
                continue
            victim = rnd.choice([*names, "committer"])
            killed = cluster.committer if victim == "committer" else cluster.triggerers[victim]
            assert killed is not None
            killed.kill()
            killed.start()
            kills += 1
        if not produced_rest:
            await produce(kafka_bootstrap, topic, MESSAGES // 2, MESSAGES, counts)
        chaos = time.monotonic() - began

        async def all_committed() -> bool:
            return await sampler.read() == dict(counts)

        try:
            await eventually(all_committed, within=180, interval=0.3)
        except AssertionError:
            raise AssertionError(
                f"committed {await sampler.read()} of {dict(counts)}\n{cluster.tails()}"
            ) from None
        await eventually(lambda: settled(store), within=30, interval=0.2)
    finally:
        sampling.cancel()
        await asyncio.gather(sampling, return_exceptions=True)
        await sampler.consumer.stop()
        cluster.ensure_dead()
    for proc in cluster.triggerers.values():
        assert "subscriber failed" not in proc.current_run(), proc.tail()
    assert await sampler.read() == dict(counts)
    counted = await tally(store)
    stored = counted.assert_each_stored_once()
    expected = {(n, mode) for n in range(MESSAGES) for mode in MODES if fires(mode, n)}
    missing = sorted(expected - stored)
    if missing:
        async with store.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.text(
                        "SELECT e.id, e.identity, e.raw, e.snapshot, e.resolved, e.pending, "
                        "e.acked, e.failed, e.rejected, e.created_at, "
                        "(SELECT json_agg(json_build_array(u.subscriber, u.state, u.reason)) "
                        " FROM outbox_unacked u WHERE u.event_id = e.id) "
                        "FROM outbox_event e WHERE (e.raw->>'n')::int = ANY(:ns) ORDER BY e.id"
                    ),
                    {"ns": [n for n, _ in missing[:3]]},
                )
            ).all()
        raise AssertionError(
            f"{len(missing)} missing, e.g. {missing[:5]}; their occurrences:\n"
            + "\n".join(map(str, rows))
            + "\n"
            + cluster.tails()
        )
    assert {(n, s) for n, s in stored if s != GHOST} == expected
    commits = await commits_never_ran_ahead(store, list(MODES))
    rejected = {n for n in range(MESSAGES) if rejects(n)}
    dead = await read_dead_letters(kafka_bootstrap, dlq, rejected)
    assert set(dead) == rejected
    print(
        f"{len(layout)} triggerers {layout}: {MESSAGES} messages, {counted.occurrences} "
        f"occurrences, {len(counted.records)} trigger events, {commits} commits checked, "
        f"{counted.failed} deliveries failed with a killed triggerer, chaos {chaos:.1f}s, "
        f"{time.monotonic() - began:.1f}s in all"
    )


async def test_two_triggerers_each_subscriber_gets_every_message_once(
    kafka_bootstrap: str, store: OutboxStore, database_url: str, tmp_path: Path
) -> None:
    await run(
        kafka_bootstrap,
        store,
        database_url,
        tmp_path,
        {"a": ["all", "reject"], "b": ["even"]},
        ghost=True,
    )


async def test_three_triggerers_and_a_subscriber_moving_between_them(
    kafka_bootstrap: str, store: OutboxStore, database_url: str, tmp_path: Path
) -> None:
    await run(
        kafka_bootstrap,
        store,
        database_url,
        tmp_path,
        {"a": ["all"], "b": ["reject"], "c": ["even"]},
        move=("all", "a", "b"),
    )

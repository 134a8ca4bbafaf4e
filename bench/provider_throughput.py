"""The Airflow Kafka provider's shared-stream trigger on outbox's manager against Airflow's own
(issue 14): messages per second through ``KafkaSharedStreamTrigger`` (module
``airflow.providers.apache.kafka.triggers.shared_stream``, confluent-kafka underneath), run
unchanged (no subclass, no wrapper) with the same subscribers over the same broker and topic,
once on outbox's ``SharedStreamManager`` in its default configuration (every trigger event
committed to Postgres with its resolution, the in-process committer advancing Kafka through the
provider's producer) and once on Airflow 3.3.2's in-memory manager
(``airflow.triggers.shared_stream``), driven as Airflow's ``TriggerRunner`` drives it:
``subscribe``, the trigger's ``filter_shared_stream``, ``bind_pending_event`` for each trigger
event and ``confirm_persisted`` at once (an instant supervisor).

One topic of P partitions holds N messages, ``{"n": k}`` as JSON or, for every tenth, framed
like Confluent's wire format (a 0x00 magic byte and a schema id first; ``tests.provider``'s
values). Each run reads the whole topic with a fresh consumer group (its own Kafka connection,
``enable.auto.commit=false``, ``dlq_topic`` set) and S subscribers (the provider's trigger as
it is, one trigger event per message). A run is timed from the first trigger event any
subscriber receives (the consumer's group join is left out) until every subscriber has received
all N and Kafka's committed offset of every partition is at its end (read with an aiokafka
consumer every 2 ms once all is received: the commit is part of the work). Checked after each
run: every subscriber got every message exactly once; on outbox, N x S records and every event
resolved clean. The two managers alternate, ``--rounds`` runs each; printed: each run (with the
cores busy meanwhile in this process, the benchmark's Postgres, the broker, and the rest of the
machine: other work, noise), the median rates, to all received as well, and the ratio
outbox / Airflow. ``--profile`` writes a cProfile of one more outbox run (its timed window).

The provider polls and commits on one thread (asgiref's ``sync_to_async``): a commit issued
once the topic is drained waits for the running ``poll(poll_timeout)`` to return, so the tail of
a run (all received to all committed) is about a whole number of poll timeouts, one for each
lane whose advance is still to come then. ``--poll-timeout`` sets the trigger's (default the
provider's 1 s).

Needs a Kafka-protocol broker (``KAFKA_BOOTSTRAP``; without it, it says so and exits 0) and
Postgres: ``--database-url`` (a migrated database), else a fresh database on ``$PGHOST:$PGPORT``
(``scripts/services.sh`` exports them with ``OUTBOX_TEST_PG_URL``), else a throwaway cluster
(``bench/pgsupport.py``). The provider, confluent-kafka and Airflow come with
``pip install -e '.[airflow]'``.

    python bench/provider_throughput.py                 # N=20000, P=4, S=3, 5 rounds
    python bench/provider_throughput.py --tiny          # CI: N=300, 1 round, poll 0.1 s
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from aiokafka import AIOKafkaConsumer

    from outbox import OutboxStore

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kafkasupport import create_topic, produce  # noqa: E402 (bench/ is on the path now)
from pgsupport import OUTBOX_TABLES, bench_database  # noqa: E402

MANAGERS = ("outbox", "airflow")
COMMIT_POLL = 0.002  # seconds between reads of Kafka's committed offsets, once all is received


@dataclass
class Cpu:
    """CPU seconds so far: this process (the managers, the provider and librdkafka's threads),
    the benchmark's Postgres cluster and broker (when they run on this machine), the machine."""

    process: float
    postgres: float
    broker: float
    machine: float


class CpuMeter:
    """Where the CPU of a run went, to tell a disturbed run (other work on the machine) from a
    slow one."""

    def __init__(self, postgres_port: int | None, broker_port: int | None) -> None:
        import psutil

        self.me = psutil.Process()
        listening: dict[int, int] = {}
        with contextlib.suppress(psutil.Error):
            for c in psutil.net_connections("tcp"):
                if c.status == psutil.CONN_LISTEN and c.pid:
                    listening[c.laddr.port] = c.pid
        self.postmaster = self._process(listening.get(postgres_port or 0))
        self.broker = self._process(listening.get(broker_port or 0))

    @staticmethod
    def _process(pid: int | None) -> Any:
        import psutil

        if pid is None:
            return None
        try:
            return psutil.Process(pid)
        except psutil.Error:
            return None

    @staticmethod
    def _seconds(processes: list[Any]) -> float:
        import psutil

        total = 0.0
        for proc in processes:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def read(self) -> Cpu:
        import psutil

        pg: list[Any] = []
        if self.postmaster is not None:
            with contextlib.suppress(psutil.Error):
                pg = [self.postmaster, *self.postmaster.children()]
        st = psutil.cpu_times()
        return Cpu(
            self._seconds([self.me]),
            self._seconds(pg),
            self._seconds([self.broker] if self.broker is not None else []),
            st.user + st.nice + st.system + st.irq + st.softirq,
        )


def kafka_connection(bootstrap: str) -> tuple[str, str]:
    """A fresh Airflow connection (from the environment, as Airflow reads it) with a fresh
    consumer group: the connection id and the group."""
    token = uuid.uuid4().hex[:10]
    conn_id, group = f"provbench_{token}", f"provbench-{token}"
    extra = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "enable.auto.commit": "false",
        "auto.offset.reset": "earliest",
        "session.timeout.ms": "6000",
    }
    os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(
        {"conn_type": "kafka", "extra": extra}
    )
    return conn_id, group


@dataclass
class Probe:
    """What one run's subscribers received, and when; ``on_first`` is called at the first."""

    messages: int
    subscribers: int
    on_first: Callable[[], None]
    received: list[list[Any]] = field(default_factory=list)
    first: float | None = None
    full: int = 0
    all_received: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.received = [[] for _ in range(self.subscribers)]

    def got(self, subscriber: int, payload: Any) -> None:
        if self.first is None:
            self.first = time.perf_counter()
            self.on_first()
        into = self.received[subscriber]
        into.append(payload)
        if len(into) == self.messages:
            self.full += 1
            if self.full == self.subscribers:
                self.all_received.set()


@dataclass
class Run:
    """One timed run: seconds to all received and committed, to all received, and the CPU
    seconds spent meanwhile."""

    manager: str
    messages: int
    seconds: float
    received_seconds: float
    cpu: Cpu

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def received_rate(self) -> float:
        return self.messages / self.received_seconds

    def cores(self, what: str) -> float:
        """Cores busy on average: ``process``, ``postgres``, ``broker``, or ``foreign`` (the
        rest of the machine: other work, noise)."""
        c = self.cpu
        if what == "foreign":
            return max(0.0, c.machine - c.process - c.postgres - c.broker) / self.seconds
        return float(getattr(c, what)) / self.seconds

    def as_json(self) -> dict[str, Any]:
        return {
            "manager": self.manager,
            "rate": self.rate,
            "seconds": self.seconds,
            "received_seconds": self.received_seconds,
            **{f"{w}_cores": self.cores(w) for w in ("process", "postgres", "broker", "foreign")},
        }


async def committed(reader: AIOKafkaConsumer, topic: str, partitions: int) -> dict[int, int]:
    from aiokafka import TopicPartition

    out = {}
    for p in range(partitions):
        value = await reader.committed(TopicPartition(topic, p))
        out[p] = -1 if value is None else value
    return out


async def until(
    probe: Callable[[], Awaitable[bool]], *, within: float, interval: float, what: str
) -> None:
    """Call ``probe`` until it holds (a state in the broker nothing here can signal); fail
    after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await probe():
        if time.monotonic() > deadline:
            raise SystemExit(f"provider_throughput: {what} not within {within:g}s")
        await asyncio.sleep(interval)


async def airflow_runner(
    manager: Any, trigger_id: int, trigger: Any, probe: Probe, subscriber: int
) -> None:
    """What Airflow's ``TriggerRunner.run_trigger`` does for a shared-stream trigger, with the
    supervisor's persistence confirmed at once."""
    key = trigger.shared_stream_key()
    stream = manager.subscribe(trigger_id=trigger_id, trigger=trigger, key=key)
    try:
        async for event in trigger.filter_shared_stream(stream):
            seq = manager.bind_pending_event(trigger_id=trigger_id, key=key)
            if seq is not None:
                manager.confirm_persisted((seq,))
            probe.got(subscriber, event.payload)
    finally:
        await manager.unsubscribe(trigger_id, key)


async def outbox_runner(events: AsyncIterator[Any], probe: Probe, subscriber: int) -> None:
    async for event in events:
        probe.got(subscriber, event.payload)


@dataclass
class Setup:
    """What every run shares: the database, the broker, the topic and its ends, the settings."""

    store: OutboxStore
    bootstrap: str
    topic: str
    dlq: str
    ends: dict[int, int]
    subscribers: int
    poll_timeout: float
    timeout: float
    meter: CpuMeter


async def one_run(kind: str, setup: Setup, profile: cProfile.Profile | None = None) -> Run:
    """One manager reading the whole topic with a fresh consumer group, timed from the first
    trigger event received to all received and committed."""
    import sqlalchemy as sa
    from aiokafka import AIOKafkaConsumer
    from airflow.providers.apache.kafka.triggers.shared_stream import KafkaSharedStreamTrigger
    from airflow.triggers.shared_stream import SharedStreamManager as AirflowManager

    from outbox import SharedStreamManager

    logging.getLogger("aiokafka").setLevel(logging.WARNING)  # its group coordinator's news
    messages = sum(setup.ends.values())
    conn_id, group = kafka_connection(setup.bootstrap)
    started: list[Cpu] = []

    def on_first() -> None:
        started.append(setup.meter.read())
        if profile is not None:
            profile.enable()

    probe = Probe(messages, setup.subscribers, on_first)
    reader = AIOKafkaConsumer(
        bootstrap_servers=setup.bootstrap, group_id=group, enable_auto_commit=False
    )
    await reader.start()
    if kind == "outbox":
        async with setup.store.engine.begin() as conn:
            await conn.execute(sa.text(f"TRUNCATE {OUTBOX_TABLES}"))
    triggers = [
        KafkaSharedStreamTrigger(
            topics=[setup.topic],
            kafka_config_id=conn_id,
            poll_timeout=setup.poll_timeout,
            dlq_topic=setup.dlq,
        )
        for _ in range(setup.subscribers)
    ]
    gc.collect()
    manager: Any
    if kind == "outbox":
        manager = SharedStreamManager(setup.store)
        tasks = [
            asyncio.create_task(outbox_runner(manager.subscribe(trigger_id=i, trigger=t), probe, i))
            for i, t in enumerate(triggers)
        ]
    else:
        manager = AirflowManager()
        tasks = [
            asyncio.create_task(airflow_runner(manager, i, t, probe, i))
            for i, t in enumerate(triggers)
        ]
    try:
        received = asyncio.create_task(probe.all_received.wait())
        done, _ = await asyncio.wait(
            {received, *tasks}, timeout=setup.timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if received not in done:
            received.cancel()
            for task in done:
                task.result()  # a subscriber that failed: its error
            raise SystemExit(
                f"provider_throughput: {kind}: received {[len(r) for r in probe.received]} "
                f"of {messages} each within {setup.timeout:g}s"
            )
        all_received = time.perf_counter()

        async def at_the_end() -> bool:
            return await committed(reader, setup.topic, len(setup.ends)) == setup.ends

        await until(
            at_the_end,
            within=setup.timeout,
            interval=COMMIT_POLL,
            what=f"{kind}: Kafka's committed offsets at the end",
        )
        finished = time.perf_counter()
        if profile is not None:
            profile.disable()
        ended = setup.meter.read()
    finally:
        await manager.stop_all()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await reader.stop()
        del os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"]
    await check(kind, setup.store, probe)
    assert probe.first is not None
    begun = started[0]
    return Run(
        kind,
        messages,
        finished - probe.first,
        all_received - probe.first,
        Cpu(*(getattr(ended, f) - getattr(begun, f) for f in Cpu.__dataclass_fields__)),
    )


async def check(kind: str, store: OutboxStore, probe: Probe) -> None:
    """Every subscriber got every message once; on outbox, every record and clean events."""
    import sqlalchemy as sa

    from tests.provider.triggers import n_of

    every = list(range(probe.messages))
    for subscriber, payloads in enumerate(probe.received):
        got = sorted(n_of(p) for p in payloads)
        if got != every:
            raise SystemExit(
                f"provider_throughput: {kind}: subscriber {subscriber} received "
                f"{len(got)} payloads, {len(set(got))} distinct, of {probe.messages}"
            )
    if kind != "outbox":
        return
    async with store.engine.connect() as conn:
        records = await conn.scalar(sa.text("SELECT count(*) FROM outbox_record"))
        unclean = await conn.scalar(
            sa.text("SELECT count(*) FROM outbox_event WHERE acked <> :s OR failed + rejected > 0"),
            {"s": probe.subscribers},
        )
    if records != probe.messages * probe.subscribers or unclean:
        raise SystemExit(
            f"provider_throughput: outbox: {records} records (expected "
            f"{probe.messages * probe.subscribers}), {unclean} unclean events"
        )


def listening_port(url: str) -> int | None:
    """The port of a server on this machine (``host:port`` or a database URL), if local."""
    from urllib.parse import urlsplit

    parts = urlsplit(url if "//" in url else f"//{url.split(',')[0]}")
    local = parts.hostname in ("127.0.0.1", "localhost", "::1")
    return parts.port if local and parts.port else None


async def measure(url: str, bootstrap: str, args: argparse.Namespace) -> dict[str, list[Run]]:
    from outbox import OutboxStore
    from tests.provider.triggers import value_of

    topic = await create_topic(bootstrap, args.partitions, prefix="provbench")
    dlq = await create_topic(bootstrap, 1, prefix="provbench")
    ends = await produce(bootstrap, topic, args.messages, args.partitions, value_of)
    runs: dict[str, list[Run]] = {kind: [] for kind in MANAGERS}
    async with OutboxStore.from_url(url) as store:
        setup = Setup(
            store,
            bootstrap,
            topic,
            dlq,
            ends,
            args.subscribers,
            args.poll_timeout,
            args.timeout,
            CpuMeter(listening_port(url), listening_port(bootstrap)),
        )
        for round_ in range(args.rounds):
            for kind in MANAGERS if round_ % 2 == 0 else MANAGERS[::-1]:
                run = await one_run(kind, setup)
                runs[kind].append(run)
                print(f"  round {round_ + 1} {kind:>7}: {describe(run)}", flush=True)
        if args.profile:
            profile = cProfile.Profile()
            run = await one_run("outbox", setup, profile)
            profile.dump_stats(args.profile)
            print(f"  profiled outbox run: {describe(run)}; cProfile in {args.profile}")
    return runs


def describe(run: Run) -> str:
    return (
        f"{run.rate:>6,.0f} msg/s ({run.seconds:5.2f} s; all received at "
        f"{run.received_seconds:5.2f} s = {run.received_rate:,.0f} msg/s); cores: this process "
        f"{run.cores('process'):.2f}, Postgres {run.cores('postgres'):.2f}, broker "
        f"{run.cores('broker'):.2f}, foreign {run.cores('foreign'):.2f}"
    )


def report(args: argparse.Namespace, runs: dict[str, list[Run]]) -> None:
    def median(kind: str, value: Callable[[Run], float]) -> float:
        return statistics.median(value(r) for r in runs[kind])

    rate = {kind: median(kind, lambda r: r.rate) for kind in MANAGERS}
    received = {kind: median(kind, lambda r: r.received_rate) for kind in MANAGERS}
    print(
        f"provider throughput: N={args.messages} P={args.partitions} S={args.subscribers} "
        f"poll_timeout={args.poll_timeout:g}s, {args.rounds} round(s) on {platform.node()} "
        f"({os.cpu_count()} CPUs)"
    )
    for kind in MANAGERS:
        print(
            f"  {kind:>7}: {rate[kind]:>6,.0f} msg/s to all received and committed "
            f"({', '.join(f'{r.rate:,.0f}' for r in runs[kind])}); "
            f"{received[kind]:,.0f} msg/s to all received; process CPU "
            f"{median(kind, lambda r: r.cpu.process / r.messages) * 1e6:.0f} us/msg"
        )
    ratio = rate["outbox"] / rate["airflow"]
    pairs = [o.rate / a.rate for o, a in zip(runs["outbox"], runs["airflow"], strict=True)]
    print(
        f"  outbox / Airflow: {ratio:.2f} (per round: {', '.join(f'{p:.2f}' for p in pairs)}; "
        f"to all received: {received['outbox'] / received['airflow']:.2f}; target >= 0.8)"
    )
    if args.json:
        with open(args.json, "a") as out:
            line = {
                "bench": "provider_throughput",
                "messages": args.messages,
                "partitions": args.partitions,
                "subscribers": args.subscribers,
                "poll_timeout": args.poll_timeout,
                "ratio": ratio,
                "runs": [r.as_json() for kind in MANAGERS for r in runs[kind]],
            }
            out.write(json.dumps(line) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP")
    if not bootstrap:
        print(
            "provider_throughput: skipped: set KAFKA_BOOTSTRAP (a Kafka-protocol broker; "
            ".ci/run starts one via scripts/services.sh)"
        )
        return 0
    # Airflow reads its configuration on import: keep it away from any real AIRFLOW_HOME.
    os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="provbench-airflow-"))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    with bench_database(args.database_url) as url:
        report(args, asyncio.run(measure(url, bootstrap, args)))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CI: N=300, 1 round, poll_timeout 0.1 s")
    p.add_argument("--messages", "-n", type=int, default=20_000, help="messages N (20000)")
    p.add_argument("--partitions", "-p", type=int, default=4, help="partitions P (4)")
    p.add_argument("--subscribers", "-s", type=int, default=3, help="subscribers S (3)")
    p.add_argument("--rounds", "-r", type=int, default=5, help="runs of each manager (5)")
    p.add_argument(
        "--poll-timeout",
        type=float,
        default=1.0,
        help="the trigger's poll_timeout (the provider's default, 1 s)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="give up a run after this (s)")
    p.add_argument("--database-url", help="a migrated database (default: a fresh one)")
    p.add_argument("--json", metavar="FILE", help="append the runs as one JSON line to FILE")
    p.add_argument("--profile", metavar="FILE", help="cProfile one more outbox run into FILE")
    args = p.parse_args(argv)
    if args.tiny:
        args.messages, args.rounds, args.poll_timeout = 300, 1, 0.1
    return args


if __name__ == "__main__":
    sys.exit(main())

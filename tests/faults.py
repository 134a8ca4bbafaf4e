"""Fault-test doubles: a Postgres server of the test's own (stopped and started at will), an
in-memory partitioned log with Kafka's commit semantics, and a trigger on it.

The log plays the broker: ``open_stream`` reads every lane from its committed offset, ``advance``
commits each lane past the messages handled (cumulative, never backwards, never past a message
some subscriber failed: that one is read again on the next ``open_stream``), as
``outbox.kafka.KafkaSharedStreamProducer`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from outbox import (
    AdvanceItem,
    BaseEventTrigger,
    SharedStreamProducer,
    TriggerEvent,
    reject_shared_stream_event,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Hashable, Sequence

PASSWORD = "s3cret-Pw"  # a throwaway server's; must never show in logs or errors


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PgServer:
    """A throwaway Postgres server on a free port, with a password (scram over TCP), run as the
    ``postgres`` OS user when the tests run as root. ``stop()`` and ``start()`` restart it on the
    same port and data directory."""

    def __init__(self) -> None:
        self.bin = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version)[-1]
        self.root = Path(tempfile.mkdtemp(prefix="outbox-fault-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "log"
        self.port = free_port()
        self.url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{self.port}/postgres"
        self.running = False
        self._as_root = os.getuid() == 0

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_root else []
        done = subprocess.run(
            [*prefix, *command], capture_output=True, text=True, timeout=60, check=False
        )
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{command[0]} failed: {done.stdout}{done.stderr}\n{log}")

    def init(self) -> None:
        os.chmod(self.root, 0o755)
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD)
        if self._as_root:
            shutil.chown(self.root, "postgres")
            shutil.chown(pwfile, "postgres")
        self._run(
            f"{self.bin}/initdb",
            *("-D", str(self.data), "-U", "postgres", f"--pwfile={pwfile}"),
            *("--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8"),
            "--locale=C.UTF-8",
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            f"{self.bin}/pg_ctl",
            *("-D", str(self.data), "-l", str(self.log), "-w", "-o", options, "start"),
        )
        self.running = True

    def stop(self) -> None:
        """``pg_ctl stop -m fast``: backends are terminated, open transactions roll back."""
        self._run(f"{self.bin}/pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        self.running = False

    def destroy(self) -> None:
        if self.running:
            with contextlib.suppress(RuntimeError):
                self._run(f"{self.bin}/pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


def _version(path: str) -> int:
    try:
        return int(Path(path).parent.name)
    except ValueError:
        return 0


@dataclass
class FakeLog:
    """A partitioned log: ``append`` messages ``{"n": n}`` to a lane; per-lane committed offsets;
    every commit and every advanced batch is remembered for the checks."""

    lanes: int
    messages: list[list[int]] = field(default_factory=list)
    committed: list[int] = field(default_factory=list)
    commits: list[tuple[int, int, int]] = field(default_factory=list)  # lane, previous, new
    batches: list[tuple[int, list[int], list[str]]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    opened: int = 0

    def __post_init__(self) -> None:
        self.messages = [[] for _ in range(self.lanes)]
        self.committed = [0] * self.lanes

    def append(self, lane: int, n: int) -> None:
        self.messages[lane].append(n)
        self.arrived.set()

    def fully_committed(self) -> bool:
        return all(c == len(m) for c, m in zip(self.committed, self.messages, strict=True))

    def commit(self, lane: int, offset: int) -> None:
        previous = self.committed[lane]
        if offset > previous:
            self.committed[lane] = offset
            self.commits.append((lane, previous, offset))


class FakeLogProducer(SharedStreamProducer):
    """Reads a ``FakeLog`` from its committed offsets, round robin over the lanes; advances by
    contiguous cumulative commits that stop at a failed message (held, as Kafka's default)."""

    def __init__(self, log: FakeLog) -> None:
        self.log = log
        self._handled: dict[int, set[int]] = {}
        self.closed = False

    async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
        self.log.opened += 1
        positions = list(self.log.committed)
        while True:
            self.log.arrived.clear()
            moved = False
            for lane in range(self.log.lanes):
                if positions[lane] < len(self.log.messages[lane]):
                    offset = positions[lane]
                    positions[lane] += 1
                    moved = True
                    n = self.log.messages[lane][offset]
                    yield {"n": n}, {"lane": lane, "offset": offset, "n": n}
            if not moved:
                await self.log.arrived.wait()

    def get_advance_lane(self, broker_payload: Any) -> Hashable:
        return int(broker_payload["lane"])

    def get_event_key(self, broker_payload: Any) -> str | None:
        return f"{broker_payload['lane']}:{broker_payload['offset']}"

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        lane = int(batch[0].broker_payload["lane"])
        offsets = [int(item.broker_payload["offset"]) for item in batch]
        routes = ["hold" if o.failed or not o.acked else "commit" for _, o in batch]
        self.log.batches.append((lane, offsets, routes))
        handled = self._handled.setdefault(lane, set())
        handled.update(o for o, r in zip(offsets, routes, strict=True) if r == "commit")
        target = self.log.committed[lane]
        while target in handled:
            target += 1
        self._handled[lane] = {o for o in handled if o > target}
        self.log.commit(lane, target)

    async def aclose(self) -> None:
        self.closed = True


def accepts(mode: str, n: int) -> bool:
    """``all`` stores a trigger event for every message; ``picky`` rejects every seventh."""
    return mode == "all" or n % 7 != 0


async def filter_by_mode(
    mode: str, shared_stream: AsyncIterator[Any]
) -> AsyncIterator[TriggerEvent]:
    """The fault tests' filter: ``{"n": n, "by": mode}`` for each accepted message ``{"n": n}``,
    a reject for the others."""
    async for raw in shared_stream:
        n = int(raw["n"])
        if not accepts(mode, n):
            reject_shared_stream_event()
            continue
        yield TriggerEvent({"n": n, "by": mode})


class LogTrigger(BaseEventTrigger):
    """A subscriber of the ``FakeLog`` registered as ``LOGS[name]``; ``mode`` as in
    ``accepts``."""

    LOGS: ClassVar[dict[str, FakeLog]] = {}

    def __init__(self, *, name: str, mode: str) -> None:
        super().__init__()
        self.name = name
        self.mode = mode

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return f"{type(self).__module__}.{type(self).__qualname__}", {"name": self.name}

    def shared_stream_key(self) -> Hashable:
        return ("fake-log", self.name)

    @classmethod
    def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> FakeLogProducer:
        return FakeLogProducer(cls.LOGS[kwargs["name"]])

    async def filter_shared_stream(
        self, shared_stream: AsyncIterator[Any]
    ) -> AsyncIterator[TriggerEvent]:
        async for event in filter_by_mode(self.mode, shared_stream):
            yield event

    async def run(self) -> AsyncIterator[TriggerEvent]:
        raise NotImplementedError("shared stream only")
        yield  # pragma: no cover

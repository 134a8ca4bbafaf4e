"""A triggerer process for the end-to-end test: one ``SharedStreamManager`` (no in-process
committer: a separate `outbox committer` advances the stream) with the three ``E2ETrigger``
subscribers (``all``, ``reject``, ``even``) on one Kafka topic, each subscriber's iterator
drained, progress printed every second.

    python -m tests.e2e.triggerer --database-url URL --bootstrap HOST:PORT --topic T \
        --group G --dlq DLQ [--ack-timeout 60] [--slow-delay 0.001]

SIGTERM or SIGINT stops it gracefully (``stop_all``; exit 0). A subscriber that ends with an
error is printed (``subscriber failed: ...``) and exits 3. SIGKILL is what the test sends.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

import psycopg

from outbox import OutboxStore, SharedStreamManager
from tests.e2e.triggers import COMMIT_LOG_TABLE, MODES, E2ETrigger, plain_dsn

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from outbox import TriggerEvent


def emit(line: str) -> None:
    print(line, flush=True)


async def drain(events: AsyncIterator[TriggerEvent], counts: dict[str, int], mode: str) -> None:
    async for _ in events:
        counts[mode] += 1


async def report(counts: dict[str, int]) -> None:
    while True:
        await asyncio.sleep(1.0)
        emit("progress " + " ".join(f"{mode}={counts[mode]}" for mode in MODES))


async def main(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with await psycopg.AsyncConnection.connect(
        plain_dsn(args.database_url), autocommit=True
    ) as conn:
        await conn.execute(COMMIT_LOG_TABLE)
    async with OutboxStore.from_url(args.database_url) as store:
        await store.check_schema()
        manager = SharedStreamManager(store, ack_timeout=args.ack_timeout, run_committer=False)
        common = {
            "topics": [args.topic],
            "bootstrap_servers": args.bootstrap,
            "group_id": args.group,
            "dead_letter_topic": args.dlq,
            "commit_log_dsn": args.database_url,
        }
        counts = dict.fromkeys(MODES, 0)
        # Subscribed in one go, before the stream polls: all three are in every snapshot.
        streams = {
            mode: manager.subscribe(
                trigger_id=mode,
                trigger=E2ETrigger(
                    mode=mode, delay=args.slow_delay if mode == "even" else 0.0, **common
                ),
            )
            for mode in MODES
        }
        drains = [
            asyncio.create_task(drain(events, counts, mode), name=mode)
            for mode, events in streams.items()
        ]
        progress = asyncio.create_task(report(counts))
        emit(f"ready pid={os.getpid()}")
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({stopped, *drains}, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        for task in drains:
            if task in done:
                emit(f"subscriber failed: {task.get_name()}: {task.exception()!r}")
                code = 3
        await manager.stop_all()
        progress.cancel()
        stopped.cancel()
        await asyncio.gather(*drains, progress, stopped, return_exceptions=True)
        emit(
            f"stopped pid={os.getpid()} code={code} " + " ".join(f"{m}={counts[m]}" for m in MODES)
        )
        return code


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.e2e.triggerer", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--database-url", required=True, help="a migrated outbox database")
    parser.add_argument("--bootstrap", required=True, help="Kafka bootstrap address")
    parser.add_argument("--topic", required=True, help="topic to read (values {'n': int})")
    parser.add_argument("--group", required=True, help="consumer group the offsets go to")
    parser.add_argument("--dlq", required=True, help="dead-letter topic for rejected messages")
    parser.add_argument("--ack-timeout", type=float, default=60.0, help="seconds")
    parser.add_argument(
        "--slow-delay",
        type=float,
        default=0.0,
        help="seconds the 'even' subscriber spends on each message (default 0)",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    sys.exit(asyncio.run(main(parse_args())))

"""A triggerer process embedding outbox's manager in its default configuration (the in-process
committer advances the stream through the producer whose consumer read it), with subscribers
of ``tests.seed_kafka`` (the design's Kafka example: no event identity), each drained, progress
printed once a second.

    python -m tests.seed_triggerer --database-url URL --bootstrap HOST:PORT --topic T \
        --group G --modes all,even [--ack-timeout S] [--delay S]

SIGTERM stops it gracefully (``stop_all``, exit 0); SIGKILL is what the tests send.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from outbox import OutboxStore, SharedStreamManager
from tests.seed_kafka import SeedTrigger

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from outbox import TriggerEvent


def emit(line: str) -> None:
    print(line, flush=True)


async def drain(events: AsyncIterator[TriggerEvent], counts: dict[str, int], mode: str) -> None:
    async for _ in events:
        counts[mode] += 1


async def main(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    modes = args.modes.split(",")
    async with OutboxStore.from_url(args.database_url) as store:
        manager = SharedStreamManager(store, ack_timeout=args.ack_timeout)
        counts = dict.fromkeys(modes, 0)
        drains = {}
        for mode in modes:
            trigger = SeedTrigger(
                topics=[args.topic],
                bootstrap_servers=args.bootstrap,
                group_id=args.group,
                mode=mode,
                delay=args.delay,
            )
            events = manager.subscribe(trigger_id=mode, trigger=trigger)
            drains[mode] = asyncio.create_task(drain(events, counts, mode), name=mode)
        emit(f"ready pid={os.getpid()}")
        stopped = asyncio.create_task(stop.wait())
        while not stop.is_set():
            done, _ = await asyncio.wait({stopped, *drains.values()}, timeout=1.0)
            emit("progress " + " ".join(f"{m}={counts[m]}" for m in modes))
            for task in [t for t in drains.values() if t in done]:
                emit(f"subscriber failed: {task.get_name()}: {task.exception()!r}")
                del drains[task.get_name()]
        await manager.stop_all()
        stopped.cancel()
        await asyncio.gather(*drains.values(), stopped, return_exceptions=True)
        emit(f"stopped pid={os.getpid()}")
        return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.seed_triggerer")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--modes", default="all,even")
    parser.add_argument("--ack-timeout", type=float, default=300.0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds per message")
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("SEED_LOG_LEVEL", "WARNING"), stream=sys.stderr)
    sys.exit(asyncio.run(main(parse_args())))

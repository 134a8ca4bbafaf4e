"""A triggerer process running the Airflow Kafka provider's shared-stream trigger on outbox's
manager in its default configuration (the in-process committer advances the stream through the
provider's producer, the one whose consumer read it): the three subscribers of
``tests.provider.triggers``, each subscriber's trigger events drained, progress printed.

    python -m tests.provider.triggerer --database-url URL --topic T --dlq DLQ [--ack-timeout S]

The Kafka connection comes from ``AIRFLOW_CONN_KAFKA_DEFAULT``. SIGTERM stops it gracefully
(exit 0); a subscriber that fails is printed and exits 3; SIGKILL is what the tests send.
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
from tests.provider.triggers import MODES, TRIGGERS

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
    async with OutboxStore.from_url(args.database_url) as store:
        await store.check_schema()
        manager = SharedStreamManager(
            store, ack_timeout=args.ack_timeout, committer_options={"poll_interval": 0.5}
        )
        counts = dict.fromkeys(MODES, 0)
        drains = {}
        for mode in MODES:
            trigger = TRIGGERS[mode](topics=[args.topic], dlq_topic=args.dlq)
            events = manager.subscribe(trigger_id=mode, trigger=trigger)
            drains[mode] = asyncio.create_task(drain(events, counts, mode), name=mode)
        emit(f"ready pid={os.getpid()}")
        code = 0
        stopped = asyncio.create_task(stop.wait())
        while not stop.is_set():
            done, _ = await asyncio.wait({stopped, *drains.values()}, timeout=1.0)
            emit("progress " + " ".join(f"{m}={counts[m]}" for m in MODES))
            failed = [t for t in drains.values() if t in done]
            if failed:
                for task in failed:
                    emit(f"subscriber failed: {task.get_name()}: {task.exception()!r}")
                code = 3
                break
        await manager.stop_all()
        stopped.cancel()
        await asyncio.gather(*drains.values(), stopped, return_exceptions=True)
        emit(f"stopped pid={os.getpid()} code={code}")
        return code


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.provider.triggerer")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--dlq", required=True)
    parser.add_argument("--ack-timeout", type=float, default=30.0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    sys.exit(asyncio.run(main(parse_args())))

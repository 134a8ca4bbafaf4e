"""A triggerer process for the end-to-end tests: one ``SharedStreamManager`` (no in-process
committer: a separate `outbox committer` advances the stream) with ``E2ETrigger`` subscribers
(``all``, ``reject``, ``even``, or those given) on one Kafka topic, each subscriber's iterator
drained, progress printed every second.

    python -m tests.e2e.triggerer --database-url URL --bootstrap HOST:PORT --topic T \
        --group G --dlq DLQ [--ack-timeout 60] [--slow-delay 0.001] \
        [--modes all,even | --modes-file PATH]

With ``--modes-file`` the subscribers are the modes listed in that file (comma-separated),
read again every 0.2 s: a mode added is subscribed, a mode removed unsubscribed (a subscriber
moving between triggerers). SIGTERM or SIGINT stops it gracefully (``stop_all``; exit 0). A
subscriber that ends with an error is printed (``subscriber failed: ...``) and exits 3. SIGKILL
is what the tests send.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

from outbox import AckTimeout, OutboxStore, SharedStreamManager
from outbox._aio import wait_event
from tests.e2e.triggers import COMMIT_LOG_TABLE, GHOST, MODES, E2ETrigger, plain_dsn

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


def wanted_modes(args: argparse.Namespace) -> list[str]:
    if args.modes_file:
        try:
            text = Path(args.modes_file).read_text()
        except FileNotFoundError:
            return []
    else:
        text = args.modes
    return [m for m in (part.strip() for part in text.split(",")) if m in (*MODES, GHOST)]


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
        manager = SharedStreamManager(
            store,
            ack_timeout=args.ack_timeout,
            run_committer=False,
            session_ttl=args.session_ttl,
            follow_interval=0.2,
        )
        common = {
            "topics": [args.topic],
            "bootstrap_servers": args.bootstrap,
            "group_id": args.group,
            "dead_letter_topic": args.dlq,
            "commit_log_dsn": args.database_url,
            "redelivery_delay": args.redelivery_delay,
        }
        counts = dict.fromkeys((*MODES, GHOST), 0)
        drains: dict[str, asyncio.Task[None]] = {}

        def subscribe(mode: str) -> None:
            trigger = E2ETrigger(
                mode=mode, delay=args.slow_delay if mode == "even" else 0.0, **common
            )
            events = manager.subscribe(trigger_id=mode, trigger=trigger)
            drains[mode] = asyncio.create_task(drain(events, counts, mode), name=mode)

        # Subscribed in one go, before the stream polls: all of them are in every snapshot.
        for mode in wanted_modes(args):
            subscribe(mode)
        progress = asyncio.create_task(report(counts))
        emit(f"ready pid={os.getpid()} modes={','.join(drains)}")
        code = 0
        while not stop.is_set() and code == 0:
            await wait_event(stop, 0.2)
            for mode, task in list(drains.items()):
                if task.done() and isinstance(task.exception(), AckTimeout):
                    # What Airflow's triggerer does with a trigger that failed: run it again
                    # (what it owed was failed; the Kafka producer holds and reads it again).
                    emit(f"subscriber timed out: {mode}: {task.exception()!r}")
                    subscribe(mode)
                elif task.done() and task.exception() is not None:
                    emit(f"subscriber failed: {mode}: {task.exception()!r}")
                    code = 3
                elif task.done():  # it joined on another triggerer: it left this one
                    emit(f"subscriber ended: {mode}")
                    del drains[mode]
            if args.modes_file and code == 0 and not stop.is_set():
                wanted = wanted_modes(args)
                for mode in [m for m in drains if m not in wanted]:
                    await manager.unsubscribe(mode, E2ETrigger.key_of(common))
                    drains.pop(mode).cancel()
                    emit(f"unsubscribed {mode}")
                for mode in [m for m in wanted if m not in drains]:
                    subscribe(mode)
                    emit(f"subscribed {mode}")
        await manager.stop_all()
        progress.cancel()
        await asyncio.gather(*drains.values(), progress, return_exceptions=True)
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
    parser.add_argument("--modes", default=",".join(MODES), help="subscribers to run here")
    parser.add_argument("--modes-file", help="file listing the subscribers to run here")
    parser.add_argument("--session-ttl", type=float, default=None, help="seconds")
    parser.add_argument(
        "--redelivery-delay", type=float, default=30.0, help="seconds before a hold is read again"
    )
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

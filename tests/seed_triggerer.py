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
import sys
from typing import TYPE_CHECKING

from tests.seed_kafka import SeedTrigger
from tests.triggerer_process import run_triggerer

if TYPE_CHECKING:
    from collections.abc import Sequence


async def main(args: argparse.Namespace) -> int:
    triggers = {
        mode: SeedTrigger(
            topics=[args.topic],
            bootstrap_servers=args.bootstrap,
            group_id=args.group,
            mode=mode,
            delay=args.delay,
        )
        for mode in args.modes.split(",")
    }
    return await run_triggerer(
        args.database_url,
        triggers,
        manager_options={"ack_timeout": args.ack_timeout},
        exit_on_failure=False,
    )


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

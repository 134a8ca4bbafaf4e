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
import sys
from typing import TYPE_CHECKING

from tests.provider.triggers import MODES, TRIGGERS
from tests.triggerer_process import run_triggerer

if TYPE_CHECKING:
    from collections.abc import Sequence


async def main(args: argparse.Namespace) -> int:
    triggers = {mode: TRIGGERS[mode](topics=[args.topic], dlq_topic=args.dlq) for mode in MODES}
    return await run_triggerer(
        args.database_url,
        triggers,
        manager_options={
            "ack_timeout": args.ack_timeout,
            "committer_options": {"poll_interval": 0.5},
        },
        exit_on_failure=True,
    )


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

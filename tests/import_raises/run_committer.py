"""``python -m tests.import_raises.run_committer URL``: a ``LaneCommitter`` on an event loop
that leaves SIGINT to Python's default handler (``KeyboardInterrupt``), allowed to import every
module under ``tests``."""

from __future__ import annotations

import asyncio
import sys

from outbox import LaneCommitter, OutboxStore


async def main(url: str) -> None:
    async with OutboxStore.from_url(url) as store:
        await LaneCommitter(store, allowed_modules=["tests"], poll_interval=0.05).run()


if __name__ == "__main__":
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main(sys.argv[1]))
    finally:
        loop.close()

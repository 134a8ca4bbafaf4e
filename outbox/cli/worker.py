"""Running the committer until SIGTERM or SIGINT (the first stops it after the pass in flight,
a second at once), with its last-pass metric kept up to date."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from outbox.committer import LaneCommitter
    from outbox.metrics import CommitterMetrics


log = logging.getLogger("outbox.cli")


async def run_until_signalled(
    committer: LaneCommitter, metrics: CommitterMetrics | None, started: dict[str, Any]
) -> int:
    """Say it started and run the committer; the first SIGTERM or SIGINT stops it after the
    pass in flight (its leases released), a second one at once."""
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        name = signal.Signals(signum).name
        if signals_seen == 1:
            log.info(
                "committer stopping (%s): the advance in flight finishes, leases are released; "
                "send it again to stop at once",
                name,
            )
            committer.request_stop()
        else:
            log.warning("committer stopping at once (%s again)", name)
            running.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    # Handled from here on (a signal is acted on at the next await, when the task exists).
    log.info("committer started", extra=started)
    running = loop.create_task(committer.run())
    heartbeat = loop.create_task(_note_passes(committer, metrics)) if metrics else None
    try:
        await running
    except asyncio.CancelledError:
        if signals_seen < 2:
            raise
        log.warning("committer stopped at once: its leases expire by themselves")
        return 1
    finally:
        if heartbeat is not None:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("committer stopped", extra={"owner": committer.owner, "passes": committer.passes})
    return 0


async def _note_passes(committer: LaneCommitter, metrics: CommitterMetrics) -> None:
    """Set the last-pass metric whenever the committer has completed another pass (checked
    every second, or every poll interval when that is shorter)."""
    seen = -1
    every = min(1.0, committer.poll_interval)
    while True:
        if committer.passes != seen:
            seen = committer.passes
            if seen:
                metrics.last_pass.set(time.time())
        await asyncio.sleep(every)

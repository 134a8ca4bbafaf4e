"""The loop of a test triggerer process: one manager on outbox's store, each subscriber's
trigger events drained and counted, progress printed once a second, SIGTERM (or SIGINT) a
graceful stop (``stop_all``); SIGKILL is what the tests send. ``tests.seed_triggerer`` and
``tests.provider.triggerer`` differ only in their triggers and in what a failing subscriber
does to the process."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import TYPE_CHECKING, Any

from outbox import OutboxStore, SharedStreamManager

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping

    from outbox import TriggerEvent
    from outbox.triggers import ShareableTrigger


def emit(line: str) -> None:
    print(line, flush=True)


async def _drain(events: AsyncIterator[TriggerEvent], counts: dict[str, int], mode: str) -> None:
    async for _ in events:
        counts[mode] += 1


async def run_triggerer(
    database_url: str,
    triggers: Mapping[str, ShareableTrigger],
    *,
    manager_options: Mapping[str, Any],
    exit_on_failure: bool,
) -> int:
    """Subscribe ``triggers`` (by trigger id) and drain them until signalled. A subscriber that
    fails is printed; with ``exit_on_failure`` the process then stops with code 3, otherwise
    the others go on."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with OutboxStore.from_url(database_url) as store:
        await store.check_schema()
        manager = SharedStreamManager(store, **manager_options)
        counts = dict.fromkeys(triggers, 0)
        drains = {}
        for mode, trigger in triggers.items():
            events = manager.subscribe(trigger_id=mode, trigger=trigger)
            drains[mode] = asyncio.create_task(_drain(events, counts, mode), name=mode)
        emit(f"ready pid={os.getpid()}")
        code = 0
        stopped = asyncio.create_task(stop.wait())
        while not stop.is_set() and code == 0:
            done, _ = await asyncio.wait({stopped, *drains.values()}, timeout=1.0)
            emit("progress " + " ".join(f"{m}={counts[m]}" for m in triggers))
            for task in [t for t in drains.values() if t in done]:
                emit(f"subscriber failed: {task.get_name()}: {task.exception()!r}")
                del drains[task.get_name()]
                if exit_on_failure:
                    code = 3
        await manager.stop_all()
        stopped.cancel()
        await asyncio.gather(*drains.values(), stopped, return_exceptions=True)
        emit(f"stopped pid={os.getpid()} code={code}")
        return code

"""Small asyncio helpers shared by the manager, the committer and the reader."""

from __future__ import annotations

import asyncio

__all__ = ("wait_event",)


async def wait_event(event: asyncio.Event, within: float) -> bool:
    """Wait until ``event`` is set or ``within`` seconds pass; whether it was set.

    ``asyncio.timeout`` rather than ``asyncio.wait_for``: on Python 3.11, ``wait_for`` swallows
    a cancellation that arrives as the event is set, and the task then runs on (a process
    shutting down would wait for it forever).
    """
    try:
        async with asyncio.timeout(within):
            await event.wait()
    except TimeoutError:
        return False
    return True

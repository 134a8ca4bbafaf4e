"""Waiting on state outside the event loop (a database, a broker) with a deadline."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]], *, within: float = 30.0, interval: float = 0.05
) -> T:
    """Call ``probe`` until it returns something truthy and return that; fail after
    ``within`` seconds. For conditions nothing in this process can signal."""
    deadline = time.monotonic() + within
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{probe!r} stayed false for {within}s")
        await asyncio.sleep(interval)

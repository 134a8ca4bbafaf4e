"""A trigger whose producer logs every advance to the database, for committer crash tests.

The committer process rebuilds it from its class path (``--allow-module``)."""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from outbox import AdvanceItem, BaseEventTrigger, SharedStreamProducer, TriggerEvent
from outbox.store import asyncpg_url

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Hashable, Sequence

LOG_TABLE = """
CREATE TABLE IF NOT EXISTS crash_advance_log (
    id bigserial PRIMARY KEY, lane text NOT NULL, first_pos int NOT NULL, last_pos int NOT NULL,
    outcomes text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())
"""


class LoggingProducer(SharedStreamProducer):
    """Advance = append the batch to ``crash_advance_log``, then dawdle a random while up to
    ``dawdle`` seconds plus ``hold`` seconds (so that kills and signals land between the broker
    call and the cursor update)."""

    def __init__(self, dsn: str, dawdle: float, hold: float = 0.0) -> None:
        self.dsn = dsn
        self.dawdle = dawdle
        self.hold = hold
        self.engine: AsyncEngine | None = None

    async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:  # pragma: no cover
        raise NotImplementedError("events are recorded by the test")
        yield

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        if self.engine is None:
            self.engine = create_async_engine(asyncpg_url(self.dsn), pool_size=1)
        positions = [item.broker_payload["position"] for item in batch]
        async with self.engine.begin() as conn:
            await conn.execute(
                sa.text(
                    "INSERT INTO crash_advance_log (lane, first_pos, last_pos, outcomes) "
                    "VALUES (:lane, :first, :last, :outcomes)"
                ),
                {
                    "lane": batch[0].broker_payload["lane"],
                    "first": positions[0],
                    "last": positions[-1],
                    "outcomes": ",".join(f"{o.acked}/{o.failed}/{o.rejected}" for _, o in batch),
                },
            )
        if self.dawdle or self.hold:
            await asyncio.sleep(self.hold + random.uniform(0, self.dawdle))

    async def aclose(self) -> None:
        if self.engine is not None:
            await self.engine.dispose()


class LoggingTrigger(BaseEventTrigger):
    def __init__(self, *, dsn: str, dawdle: float = 0.0, hold: float = 0.0) -> None:
        super().__init__()
        self.dsn = dsn
        self.dawdle = dawdle
        self.hold = hold

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"dsn": self.dsn, "dawdle": self.dawdle, "hold": self.hold},
        )

    def shared_stream_key(self) -> Hashable:
        return ("crash", "committer")

    @classmethod
    def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> LoggingProducer:
        return LoggingProducer(kwargs["dsn"], kwargs["dawdle"], kwargs.get("hold", 0.0))

    async def run(self) -> AsyncIterator[TriggerEvent]:
        yield TriggerEvent({})

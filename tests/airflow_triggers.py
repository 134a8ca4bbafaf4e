"""A trigger and producer written for Airflow's own API (imports from ``airflow`` only), for
the interop tests: they must run unchanged on outbox's manager and committer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from airflow.triggers.base import BaseEventTrigger, TriggerEvent
from airflow.triggers.shared_stream import (
    AdvanceItem,
    SharedStreamProducer,
    reject_shared_stream_event,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Hashable, Sequence


class QueueProducer(SharedStreamProducer):
    """Yields ``MESSAGES[queue]`` as ``(body, receipt)``; records every advance.

    Its ``advance`` needs nothing ``open_stream`` opened, so it says a separate committer may
    advance it (``advances_from_consumer = False``, an attribute outbox reads); without it a
    producer written for Airflow is advanced only by the triggerer that reads it."""

    advances_from_consumer = False
    MESSAGES: ClassVar[dict[str, list[dict[str, Any]]]] = {}
    ADVANCED: ClassVar[list[tuple[Any, Any]]] = []

    def __init__(self, queue: str) -> None:
        self.queue = queue

    async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
        for i, body in enumerate(self.MESSAGES[self.queue]):
            yield body, f"receipt-{i}"
        await _forever()

    def get_advance_lane(self, broker_payload: Any) -> Hashable:
        return int(broker_payload.split("-")[1]) % 2

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        for receipt, outcome in batch:
            self.ADVANCED.append((receipt, outcome))


async def _forever() -> None:
    import asyncio

    await asyncio.Event().wait()


class AirflowQueueTrigger(BaseEventTrigger):
    def __init__(self, *, queue: str, kind: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.queue = queue
        self.kind = kind

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"queue": self.queue, "kind": self.kind},
        )

    def shared_stream_key(self) -> Hashable:
        return ("airflow-queue", self.queue)

    @classmethod
    def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> QueueProducer:
        return QueueProducer(kwargs["queue"])

    async def filter_shared_stream(self, shared_stream: Any) -> AsyncIterator[TriggerEvent]:
        async for raw in shared_stream:
            if raw.get("bad"):
                reject_shared_stream_event()
                continue
            if self.kind is None or raw.get("kind") == self.kind:
                yield TriggerEvent(raw)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        yield TriggerEvent({})

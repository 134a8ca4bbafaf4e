"""A trigger written for Airflow whose producer logs as Airflow code does (structlog and the
standard library) and fails its first advance: a separate committer that rebuilds it imports
Airflow mid-run, which must not change how that committer logs."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar, Final

import structlog
from airflow.triggers.base import BaseEventTrigger, TriggerEvent
from airflow.triggers.shared_stream import AdvanceItem, SharedStreamProducer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Hashable, Sequence

KEY: Final = ("airflow-logging", "q")


class LoggingProducer(SharedStreamProducer):
    advances_from_consumer = False  # a separate committer may advance it
    calls: ClassVar[int] = 0

    async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:  # pragma: no cover
        raise NotImplementedError
        yield

    def get_advance_lane(self, broker_payload: Any) -> Hashable:
        return None

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        type(self).calls += 1
        structlog.get_logger(__name__).info("advancing", items=len(batch))
        logging.getLogger("airflow.task").info("advancing through the standard library")
        if type(self).calls == 1:
            raise RuntimeError("broker down\nthe second line of the broker's error")


class LoggingAirflowTrigger(BaseEventTrigger):
    def serialize(self) -> tuple[str, dict[str, Any]]:
        return f"{type(self).__module__}.{type(self).__qualname__}", {}

    def shared_stream_key(self) -> Hashable:
        return KEY

    @classmethod
    def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> LoggingProducer:
        return LoggingProducer()

    async def run(self) -> AsyncIterator[TriggerEvent]:  # pragma: no cover
        yield TriggerEvent({})

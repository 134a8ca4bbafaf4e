"""The subscriber side of a shared stream: event triggers and the events they fire.

Mirrors ``airflow.triggers.base.BaseEventTrigger`` and ``TriggerEvent`` for the parts a shared
stream uses, so a trigger written for Airflow runs here with only its imports changed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Hashable

    from outbox.protocol import SharedStreamProducer

__all__ = ("BaseEventTrigger", "ShareableTrigger", "TriggerEvent")


@dataclass(frozen=True, slots=True)
class TriggerEvent:
    """One event a trigger fires; its ``payload`` is stored by ``outbox.codec`` (JSON, and
    losslessly bytes, tuples, NamedTuples, datetimes, ``Decimal`` and the other types it lists)."""

    payload: Any


class BaseEventTrigger(ABC):
    """A trigger that can share one broker stream with its siblings.

    Triggers whose ``shared_stream_key()`` compare equal share one producer. Overriding
    ``create_shared_stream_producer`` puts the stream in ack mode (the broker is advanced only
    after every subscriber resolved an event); otherwise ``open_shared_stream`` feeds it on the
    fast path.
    """

    def __init__(self, **kwargs: Any) -> None:
        self.trigger_id: int | str | None = None

    @abstractmethod
    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Return ``(class path, kwargs)``; the first subscriber's kwargs build the producer."""

    @abstractmethod
    def run(self) -> AsyncIterator[TriggerEvent]:
        """Standalone execution, used when the trigger does not share a stream."""

    def shared_stream_key(self) -> Hashable | None:
        """Key of the shared stream this trigger joins; ``None`` opts out of sharing."""
        return None

    @classmethod
    async def open_shared_stream(cls, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        """Fast-path source of raw events, built from the first subscriber's kwargs."""
        raise NotImplementedError(f"{cls.__qualname__} does not implement open_shared_stream")
        yield  # pragma: no cover - makes this an async generator

    async def filter_shared_stream(
        self, shared_stream: AsyncIterator[Any]
    ) -> AsyncIterator[TriggerEvent]:
        """Turn the shared raw events into this trigger's events."""
        raise NotImplementedError(
            f"{type(self).__qualname__} does not implement filter_shared_stream"
        )
        yield  # pragma: no cover - makes this an async generator

    @classmethod
    def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> SharedStreamProducer:
        """Build the producer of an ack-mode stream; overriding it selects ack mode."""
        raise NotImplementedError(
            f"{cls.__qualname__} does not implement create_shared_stream_producer"
        )


class ShareableTrigger(Protocol):
    """What the manager needs of a trigger: outbox's ``BaseEventTrigger`` or Airflow's."""

    def serialize(self) -> tuple[str, dict[str, Any]]: ...

    def shared_stream_key(self) -> Hashable | None: ...

    def filter_shared_stream(self, shared_stream: AsyncIterator[Any]) -> AsyncIterator[Any]: ...


def is_ack_mode(trigger_class: type) -> bool:
    """True when a class before ``BaseEventTrigger`` (outbox's or Airflow's) in the MRO
    overrides the producer factory."""
    from outbox.interop import is_base_event_trigger

    for klass in trigger_class.__mro__:
        if is_base_event_trigger(klass):
            return False
        if "create_shared_stream_producer" in vars(klass):
            return True
    return False

"""Running triggers and producers written for Airflow's ``airflow.triggers.shared_stream`` API
unchanged on outbox.

outbox never imports Airflow itself: it recognises Airflow's classes by name and, when the user's
code has imported ``airflow.triggers.shared_stream``, opens Airflow's reject window alongside its
own so that Airflow's ``reject_shared_stream_event`` reaches outbox's manager.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from outbox.protocol import AdvanceItem, SharedStreamProducer

if TYPE_CHECKING:
    import contextvars
    from collections.abc import AsyncIterator, Callable, Hashable, Sequence

__all__ = (
    "adapt_producer",
    "advances_from_consumer",
    "is_base_event_trigger",
    "open_airflow_reject_window",
)

_BASE_EVENT_TRIGGERS = {
    ("outbox.triggers", "BaseEventTrigger"),
    ("airflow.triggers.base", "BaseEventTrigger"),
}


def is_base_event_trigger(klass: type) -> bool:
    """Whether ``klass`` is outbox's or Airflow's ``BaseEventTrigger`` itself."""
    return (klass.__module__, klass.__qualname__) in _BASE_EVENT_TRIGGERS


class _ForeignProducer(SharedStreamProducer):
    """An Airflow ``SharedStreamProducer`` seen through outbox's producer interface (identity,
    storage hooks at their defaults)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
        stream: AsyncIterator[tuple[Any, Any]] = self.inner.open_stream()
        return stream

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        await self.inner.advance(batch)

    def get_advance_lane(self, broker_payload: Any) -> Hashable:
        lane: Hashable = self.inner.get_advance_lane(broker_payload)
        return lane

    def get_event_key(self, broker_payload: Any) -> str | None:
        method = getattr(self.inner, "get_event_key", None)
        return None if method is None else method(broker_payload)

    async def aclose(self) -> None:
        await self.inner.aclose()


def advances_from_consumer(producer: SharedStreamProducer) -> bool:
    """Whether only the process whose ``open_stream`` reads the broker may advance the stream
    (its ``advance`` acks through the consuming connection). A producer written for Airflow is
    assumed to (Airflow always advances in the process that reads), unless it says otherwise
    with a ``advances_from_consumer = False`` attribute."""
    if isinstance(producer, _ForeignProducer):
        return bool(getattr(producer.inner, "advances_from_consumer", True))
    return bool(producer.advances_from_consumer)


def adapt_producer(producer: Any) -> SharedStreamProducer:
    """``producer`` itself if it is outbox's, else an adapter for Airflow's (or any object with
    ``open_stream`` and ``advance``)."""
    if isinstance(producer, SharedStreamProducer):
        return producer
    if not (hasattr(producer, "open_stream") and hasattr(producer, "advance")):
        raise TypeError(
            f"{type(producer).__qualname__} is not a SharedStreamProducer (it needs "
            "open_stream() and advance(batch))"
        )
    return _ForeignProducer(producer)


class _AirflowGroupShim:
    """Stands in for Airflow's group in its reject context: forwards the reject to outbox."""

    def __init__(self, reject: Callable[[], None]) -> None:
        self._reject = reject

    def _reject_pending_event(self, *, trigger_id: Any, event_id: Any) -> None:
        self._reject()


def open_airflow_reject_window(
    reject: Callable[[], None], trigger_id: Any, event_id: int
) -> Callable[[], None] | None:
    """If Airflow's shared-stream module is loaded, point its reject context at ``reject`` and
    return the function that clears it; else ``None``."""
    module = sys.modules.get("airflow.triggers.shared_stream")
    if module is None:  # the common case, once per event and subscriber: nothing to look up
        return None
    context: contextvars.ContextVar[Any] | None = getattr(module, "_reject_context", None)
    factory = getattr(module, "_RejectContext", None)
    if context is None or factory is None:
        return None
    context.set(factory(_AirflowGroupShim(reject), trigger_id, event_id))

    def close() -> None:
        context.set(None)

    return close

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
    "register_event_key",
)

# Event identities for producers written for Airflow (whose API has no ``get_event_key``), by
# the producer's class path: ``register_event_key``, and the Kafka provider's built in.
_EVENT_KEYS: dict[str, Callable[[Any], str | None]] = {}
_KAFKA_PROVIDER = "airflow.providers.apache.kafka.triggers.shared_stream.KafkaSharedStreamProducer"


def register_event_key(producer_class: type | str, key: Callable[[Any], str | None]) -> None:
    """Give a producer written for Airflow an event identity: ``key(broker_payload)`` returns a
    stable text (or None) for a message across redeliveries, so that a redelivered message goes
    only to the subscribers that had not resolved it. ``producer_class``: the class or its
    dotted path; subclasses inherit it. (Inside Airflow's triggerer: ``[outbox] event_keys``.)"""
    path = (
        producer_class
        if isinstance(producer_class, str)
        else f"{producer_class.__module__}.{producer_class.__qualname__}"
    )
    _EVENT_KEYS[path] = key


def _kafka_provider_key(payload: Any) -> str | None:
    """The Kafka provider's ``KafkaBrokerPayload``: ``topic:partition:offset``."""
    return f"{payload.topic}:{payload.partition}:{payload.offset}"


def _event_key_of(inner: Any) -> Callable[[Any], str | None] | None:
    method = getattr(inner, "get_event_key", None)
    if method is not None:
        return method  # type: ignore[no-any-return]
    for klass in type(inner).__mro__:
        found = _EVENT_KEYS.get(f"{klass.__module__}.{klass.__qualname__}")
        if found is not None:
            return found
        if f"{klass.__module__}.{klass.__qualname__}" == _KAFKA_PROVIDER:
            return _kafka_provider_key
    return None


def _offset_runs(batch: Sequence[AdvanceItem]) -> list[Sequence[AdvanceItem]]:
    """A lane's batch cut where the payloads' offsets stop increasing: a message read again
    (after a seek back) starts a batch of its own, so that a producer that lifts a held offset
    only on a batch starting at or before it (the Kafka provider's floor) sees it start one."""
    offsets = [getattr(item.broker_payload, "offset", None) for item in batch]
    if not all(isinstance(o, int) for o in offsets):
        return [batch]
    runs: list[Sequence[AdvanceItem]] = []
    start = 0
    for i in range(1, len(batch)):
        if offsets[i] <= offsets[i - 1]:  # type: ignore[operator]
            runs.append(batch[start:i])
            start = i
    runs.append(batch[start:])
    return runs


_BASE_EVENT_TRIGGERS = {
    ("outbox.triggers", "BaseEventTrigger"),
    ("airflow.triggers.base", "BaseEventTrigger"),
}


def is_base_event_trigger(klass: type) -> bool:
    """Whether ``klass`` is outbox's or Airflow's ``BaseEventTrigger`` itself."""
    return (klass.__module__, klass.__qualname__) in _BASE_EVENT_TRIGGERS


class _ForeignProducer(SharedStreamProducer):
    """An Airflow ``SharedStreamProducer`` seen through outbox's producer interface: identity and
    the storage hooks are the wrapped producer's where it defines them, else outbox's defaults
    (the codec stores Airflow's payloads, ``KafkaBrokerPayload`` included, as they are)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._event_key = _event_key_of(inner)
        # Looked up once: the storage hooks run for every event.
        self._serialize_payload: Callable[[Any], Any] | None = getattr(
            inner, "serialize_payload", None
        )
        self._deserialize_payload: Callable[[Any], Any] | None = getattr(
            inner, "deserialize_payload", None
        )
        self._serialize_event: Callable[[Any], Any] | None = getattr(inner, "serialize_event", None)

    def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
        stream: AsyncIterator[tuple[Any, Any]] = self.inner.open_stream()
        return stream

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        for run in _offset_runs(batch):
            await self.inner.advance(run)

    def get_advance_lane(self, broker_payload: Any) -> Hashable:
        lane: Hashable = self.inner.get_advance_lane(broker_payload)
        return lane

    def get_event_key(self, broker_payload: Any) -> str | None:
        return None if self._event_key is None else self._event_key(broker_payload)

    def serialize_payload(self, broker_payload: Any) -> Any:
        hook = self._serialize_payload
        return broker_payload if hook is None else hook(broker_payload)

    def deserialize_payload(self, stored: Any) -> Any:
        hook = self._deserialize_payload
        return stored if hook is None else hook(stored)

    def serialize_event(self, raw_event: Any) -> Any:
        hook = self._serialize_event
        return raw_event if hook is None else hook(raw_event)

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

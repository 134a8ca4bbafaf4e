"""outbox's manager inside Airflow's own ``airflow triggerer``.

``airflow triggerer``'s ``TriggerRunner`` builds ``SharedStreamManager(log=...,
max_subscriber_queue=..., ack_timeout=..., cohort_grace_period=...)`` from its ``[triggerer]
shared_stream_*`` options and drives it: ``subscribe`` returns the raw stream it feeds to the
trigger's ``filter_shared_stream``; for each trigger event the filter yields it calls
``bind_pending_event`` and later, once Airflow's supervisor stored the event in Airflow's
database, ``confirm_persisted`` with the seqs it got; ``unsubscribe`` when a trigger ends;
``stop_all`` when the runner stops. ``outbox.airflow_plugin`` makes the runner build this class
instead of Airflow's (``pip install 'shared-stream-outbox[airflow]'``, ``[outbox] database_url``).

What changes for Airflow: each event and each subscriber's resolution is in Postgres. A
subscriber's ``acked`` resolution, with the trigger events it yielded (as records), commits when
Airflow confirms their persistence, so after a crash the broker's redelivery goes only to the
subscribers that had not finished the message (with an event identity: built in for the Kafka
provider, see ``outbox.interop.register_event_key`` for others). A full subscriber queue pauses
the producer instead of failing the subscriber. Airflow's rules its runner relies on hold:
``stop_all`` does not end the raw streams (the runner cancels its trigger tasks), and a trigger
event yielded after ``reject_shared_stream_event`` still fires, unbound.

Settings (``[outbox]`` in airflow.cfg, or ``AIRFLOW__OUTBOX__*``): ``database_url`` (required),
``outage_limit``, ``session_ttl``, ``run_committer`` (default true: the triggerer advances the
streams it reads), ``event_keys`` (``producer.Class=module:function``, comma-separated),
``max_unconfirmed`` (default 4: trigger events a subscriber may have that Airflow stored but
has not confirmed yet; what a crash makes Airflow store twice is at most that many per
subscriber).
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import os
from typing import TYPE_CHECKING, Any

from outbox.errors import ConfigurationError
from outbox.interop import register_event_key
from outbox.manager import DEFAULT_ACK_TIMEOUT, DEFAULT_SUBSCRIBER_QUEUE_MAX
from outbox.manager import SharedStreamManager as DurableManager
from outbox.protocol import _current_binding
from outbox.store import OutboxStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Hashable, Iterable

    from outbox.group import StreamGroup
    from outbox.subscriber import Subscriber
    from outbox.triggers import ShareableTrigger

__all__ = ("SharedStreamManager", "setting")

SECTION = "outbox"
# Trigger events a subscriber may have bound and Airflow not yet confirmed before it waits: a
# crash repeats what Airflow stored and had not confirmed, so this bounds the duplicates (at the
# cost of waiting for Airflow's confirmations, which come with its next state sync).
DEFAULT_MAX_UNCONFIRMED = 4


def setting(key: str, default: str | None = None) -> str | None:
    """``[outbox] key`` from Airflow's configuration (airflow.cfg, ``AIRFLOW__OUTBOX__KEY``),
    or ``default``."""
    try:
        from airflow.configuration import conf
    except ImportError:
        return os.environ.get(f"AIRFLOW__{SECTION.upper()}__{key.upper()}", default)
    value: str | None = conf.get(SECTION, key, fallback=default)
    return value


def _number(key: str) -> float | None:
    text = setting(key)
    if text in (None, ""):
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigurationError(
            f"[outbox] {key} = {text!r} is not a number; set it in seconds, e.g. 60"
        ) from None


def _flag(key: str, default: bool) -> bool:
    text = setting(key)
    if text in (None, ""):
        return default
    if text.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if text.strip().lower() in ("false", "0", "no", "off"):
        return False
    raise ConfigurationError(f"[outbox] {key} = {text!r} is not a boolean; use true or false")


def _register_configured_event_keys(spec: str) -> None:
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        producer, _, function = entry.partition("=")
        module_name, _, name = function.strip().partition(":")
        if not producer.strip() or not module_name or not name:
            raise ConfigurationError(
                f"[outbox] event_keys entry {entry!r} is not producer.Class=module:function"
            )
        key = getattr(importlib.import_module(module_name), name)
        register_event_key(producer.strip(), key)


class SharedStreamManager(DurableManager):
    """outbox's durable manager with the interface Airflow's ``TriggerRunner`` calls.

    :param log: the runner's logger (unused: outbox logs through ``logging``).
    :param store: an ``OutboxStore``; by default one on ``[outbox] database_url``.
    The other parameters are Airflow's (``[triggerer] shared_stream_*``); keyword arguments
    beyond them go to ``outbox.SharedStreamManager``.
    """

    persist_gated = True

    def __init__(
        self,
        *,
        log: Any = None,
        max_subscriber_queue: int = DEFAULT_SUBSCRIBER_QUEUE_MAX,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        cohort_grace_period: float = 0.0,
        _now: Callable[[], float] | None = None,
        store: OutboxStore | None = None,
        **options: Any,
    ) -> None:
        if store is None:
            url = setting("database_url") or os.environ.get("OUTBOX_DATABASE_URL")
            if not url:
                raise ConfigurationError(
                    "outbox's manager needs [outbox] database_url in Airflow's configuration "
                    "(or AIRFLOW__OUTBOX__DATABASE_URL)"
                )
            store = OutboxStore.from_url(url)
        for key in ("outage_limit", "session_ttl"):
            value = _number(key)
            if value is not None:
                options.setdefault(key, value)
        options.setdefault("run_committer", _flag("run_committer", True))
        cap = _number("max_unconfirmed")
        self.max_unconfirmed = int(cap) if cap is not None else DEFAULT_MAX_UNCONFIRMED
        _register_configured_event_keys(setting("event_keys") or "")
        super().__init__(
            store,
            ack_timeout=ack_timeout,
            max_subscriber_queue=max_subscriber_queue,
            cohort_grace_period=cohort_grace_period,
            clock=_now,
            **options,
        )
        self.log = log
        self._seqs = itertools.count()
        self._bound: dict[int, tuple[Subscriber, int]] = {}

    def subscribe(
        self, *, trigger_id: Any, trigger: ShareableTrigger, key: Hashable | None = None
    ) -> AsyncIterator[Any]:
        """Join the stream; the raw events the runner feeds to the trigger's filter."""
        group, subscriber = self._join(trigger_id, trigger, key)
        subscriber.unconfirmed_cap = self.max_unconfirmed
        if group.ack_mode:
            # The runner calls this from the trigger's own task, which then runs the filter.
            _current_binding.set(subscriber.binding)
            _keep_trigger_events(trigger, group, subscriber)
        return group.raw_stream(subscriber)

    def bind_pending_event(self, *, trigger_id: Any, key: Hashable) -> int | None:
        """Bind the trigger event the subscriber's filter just yielded to the raw event it is on;
        the seq Airflow confirms once it stored it, or None (nothing to bind to: fast path,
        between events, rejected or failed), drawing no seq then."""
        group = self._streams.get(key)
        if group is None:
            return None
        subscriber = group.subscribers.get(str(trigger_id))
        if subscriber is None or subscriber.window is None or not group.can_bind(subscriber):
            return None
        seq = next(self._seqs)
        event_id = subscriber.window
        group.bind(subscriber, seq)
        self._bound[seq] = (subscriber, event_id)
        return seq

    def confirm_persisted(self, seqs: Iterable[int]) -> None:
        """Airflow stored the trigger events of these seqs: an event the subscriber moved past
        whose every bound trigger event is confirmed resolves ``acked``. Unknown seqs are
        ignored."""
        for seq in list(seqs):
            entry = self._bound.pop(seq, None)
            if entry is None:
                continue
            subscriber, event_id = entry
            subscriber.unconfirmed -= 1
            if subscriber.confirmed is not None:
                subscriber.confirmed.set()
            gate = subscriber.gates.get(event_id) if subscriber.gates is not None else None
            if gate is None:
                continue  # resolved meanwhile (timed out, failed, rejected)
            gate.unconfirmed.discard(seq)
            subscriber.group.complete(subscriber, event_id, gate)


def _keep_trigger_events(trigger: Any, group: StreamGroup, subscriber: Subscriber) -> None:
    """Have the trigger's ``filter_shared_stream`` (which the runner calls next) pass each
    trigger event it yields through the group first, so that the event's resolution stores
    them as records. The trigger's class is untouched; the instance's method is wrapped."""
    original = trigger.filter_shared_stream

    async def filter_shared_stream(stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for trigger_event in original(stream):
            try:
                group.on_trigger_event(subscriber, trigger_event)
            except Exception as exc:  # Airflow stores it anyway; the record is outbox's extra
                group.log_unkept(subscriber, exc)
            yield trigger_event

    # A trigger that refuses attributes keeps no records; Airflow stores its events anyway.
    with contextlib.suppress(AttributeError, TypeError):
        trigger.filter_shared_stream = filter_shared_stream

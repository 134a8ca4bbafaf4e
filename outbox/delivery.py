"""A subscriber's deliveries: the raw stream its filter reads, each event's binding window, the
trigger events yielded in it, and their resolution. Functions of a ``StreamGroup``, bound as its
methods."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from outbox.codec import encode
from outbox.core import ACKED, DATABASE_CLOCK_TIMEOUT, FAILED, REJECTED, after_lost_delivery
from outbox.errors import OutboxError
from outbox.protocol import AckTimeout, _current_binding
from outbox.subscriber import PersistGate, fast_events, raw_events
from outbox.triggers import TriggerEvent

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from outbox.group import StreamGroup
    from outbox.store import Resolution
    from outbox.subscriber import Subscriber

__all__ = (
    "bind",
    "can_bind",
    "close_window",
    "complete",
    "delivered",
    "log_unkept",
    "on_trigger_event",
    "raw_stream",
    "reject",
    "resolve",
    "run_filter",
    "settled",
    "write_failure",
)

log = logging.getLogger("outbox.manager")


def raw_stream(group: StreamGroup, subscriber: Subscriber) -> AsyncIterator[Any]:
    """What the subscriber's filter reads."""
    if group.ack_mode:
        return raw_events(subscriber, group.close_window)
    return fast_events(subscriber)


async def run_filter(group: StreamGroup, subscriber: Subscriber) -> None:
    """Run the subscriber's filter (outbox's API): trigger events are kept with their
    windows; a filter that raises fails the subscriber alone."""
    if group.ack_mode:
        # Set once, in this task's own context (tasks it starts inherit it): whether a reject
        # falls inside a window is the subscriber's state to tell.
        _current_binding.set(subscriber.binding)
    try:
        async for trigger_event in subscriber.trigger.filter_shared_stream(
            group.raw_stream(subscriber)
        ):
            group.on_trigger_event(subscriber, trigger_event)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        error = exc
        if group.ack_mode and subscriber.window is not None and not subscriber.failed:
            group.resolve(subscriber, subscriber.window, FAILED, f"filter raised: {exc!r}"[:500])
            subscriber.window = None
        group.force_fail(subscriber, error, "its filter raised")
        group.host.writer.after_pending(lambda _: group.host.release(subscriber, error))
        return
    group.host.writer.after_pending(lambda _: group.host.release(subscriber, None))


def close_window(group: StreamGroup, subscriber: Subscriber) -> None:
    event_id = subscriber.window
    assert event_id is not None
    subscriber.window = None
    if subscriber.gates is not None:
        gate = subscriber.gates.get(event_id)
        if gate is not None:
            gate.closed = True
            group.complete(subscriber, event_id, gate)
        elif not subscriber.window_rejected:
            group.resolve(subscriber, event_id, ACKED, None)  # it bound nothing: filtered
        subscriber.window_records.clear()
        subscriber.window_events.clear()
        return
    events, records = subscriber.window_events, subscriber.window_records
    if not subscriber.window_rejected:
        group.resolve(subscriber, event_id, ACKED, None, records, events)
    if records:
        records.clear()
        events.clear()


def complete(group: StreamGroup, subscriber: Subscriber, event_id: int, gate: PersistGate) -> None:
    """Inside Airflow: resolve ``acked`` once moved past and every bound event confirmed."""
    if gate.closed and not gate.unconfirmed:
        assert subscriber.gates is not None
        subscriber.gates.pop(event_id, None)
        group.resolve(subscriber, event_id, ACKED, None, gate.records)
        if subscriber.leaving is not None and not subscriber.gates:
            registration, subscriber.leaving = subscriber.leaving, None
            writer = group.host.writer
            writer.after_pending(lambda _: writer.unregister([registration]))


def can_bind(group: StreamGroup, subscriber: Subscriber) -> bool:
    """Inside Airflow: whether a trigger event yielded now binds to an event (the open
    window's, while the subscriber still owes it)."""
    event_id = subscriber.window
    if event_id is None or subscriber.window_rejected or subscriber.gates is None:
        return False
    owed = group.outstanding.get(event_id)
    return owed is not None and subscriber.name in owed


def reject(group: StreamGroup, subscriber: Subscriber) -> None:
    event_id = subscriber.window
    if (
        event_id is None
        or subscriber.window_rejected
        or asyncio.current_task() is not subscriber.window_task
    ):
        log.warning("reject_shared_stream_event called outside an ack-mode binding window; ignored")
        return
    log.info(
        "Rejecting shared-stream event",
        extra={"trigger_id": subscriber.trigger_id, "event_id": event_id},
    )
    subscriber.window_rejected = True
    subscriber.window_events.clear()
    subscriber.window_records.clear()
    if subscriber.gates is not None:
        subscriber.gates.pop(event_id, None)
    group.resolve(subscriber, event_id, REJECTED, "rejected by the filter")


def bind(group: StreamGroup, subscriber: Subscriber, seq: int) -> None:
    """Inside Airflow: bind a trigger event (Airflow's ``seq``) to the open window's event
    (``can_bind`` said there is one), with what the filter yielded since the last bind."""
    event_id = subscriber.window
    assert event_id is not None and subscriber.gates is not None
    gate = subscriber.gates.get(event_id)
    if gate is None:
        gate = subscriber.gates[event_id] = PersistGate()
    gate.unconfirmed.add(seq)
    subscriber.unconfirmed += 1
    if subscriber.window_records:
        gate.records.extend(subscriber.window_records)
        subscriber.window_records.clear()
        subscriber.window_events.clear()


def log_unkept(group: StreamGroup, subscriber: Subscriber, error: Exception) -> None:
    """Inside Airflow: a trigger event that outbox cannot keep as a record (Airflow stores
    it all the same)."""
    log.warning(
        "trigger event not kept in the outbox (%s); Airflow stores it",
        str(error).splitlines()[0][:300] if str(error) else type(error).__name__,
        extra={"trigger_id": subscriber.trigger_id, "stream": repr(group.key)},
    )


def on_trigger_event(group: StreamGroup, subscriber: Subscriber, trigger_event: Any) -> None:
    """A trigger event the subscriber's filter yielded (outbox's API, or Airflow's runner
    seen through the filter): kept with the open window's event, or stored on its own."""
    # Airflow's own TriggerEvent (a pydantic model) is welcome too: only .payload is used.
    if not isinstance(trigger_event, TriggerEvent) and not hasattr(trigger_event, "payload"):
        raise TypeError(
            f"{group.where}: subscriber {subscriber.trigger_id} yielded "
            f"{type(trigger_event).__name__}, expected TriggerEvent"
        )
    payload_json = encode(trigger_event.payload, what=subscriber.what_trigger_event)
    if subscriber.failed:
        return
    if group.ack_mode and subscriber.window is not None:
        if subscriber.window_rejected:
            if subscriber.gates is None:
                log.warning(
                    "trigger event yielded after reject_shared_stream_event; not stored",
                    extra={"trigger_id": subscriber.trigger_id, "event_id": subscriber.window},
                )
            return
        if len(subscriber.window_records) >= group.host.max_trigger_events_per_event:
            # They all commit in one transaction with the event's resolution: bound it.
            raise RuntimeError(
                f"{group.where}: subscriber {subscriber.trigger_id} yielded more than "
                f"{group.host.max_trigger_events_per_event} trigger events for one raw event; "
                "raise max_trigger_events_per_event or split the work"
            )
        subscriber.window_events.append(trigger_event)
        subscriber.window_records.append(payload_json)
        return
    if subscriber.gates is not None:
        return  # inside Airflow, Airflow stores what is not bound to an event
    if not group.stream_id:
        group.early_unbound.append((subscriber, payload_json, trigger_event))
        return
    group._store_unbound(subscriber, payload_json, trigger_event)


def _store_unbound(
    group: StreamGroup, subscriber: Subscriber, payload_json: str, trigger_event: TriggerEvent
) -> None:
    def stored(result: Any) -> None:
        if isinstance(result, BaseException):
            group.force_fail(subscriber, _one_line(group.where, subscriber, result), "")
        elif result is not False:
            subscriber.emit(trigger_event)

    group.host.writer.store_unbound(group.stream_id, subscriber.name, payload_json, stored)


def resolve(
    group: StreamGroup,
    subscriber: Subscriber,
    event_id: int,
    state: str,
    reason: str | None,
    records: Sequence[str] | None = None,
    events: list[TriggerEvent] | None = None,
) -> None:
    """Queue ``subscriber``'s resolution of ``event_id`` unless it resolved it already;
    ``events`` (with their JSON ``records``) are handed over once it commits."""
    owed = group.outstanding.get(event_id)
    if owed is None or subscriber.name not in owed:
        return
    del owed[subscriber.name]
    if group.looking or event_id in group.from_postgres:
        group.settling.add((event_id, subscriber.name))
    if not owed:
        group.settled(event_id)
    # A plain tuple, the fields of a ``ResolutionRow`` (``outbox.store.Resolution`` says why,
    # and what it gained).
    resolution: Resolution
    if records:
        if events:
            subscriber.uncommitted.extend(events)
        owner = subscriber.serial if events else None
        resolution = (
            group.stream_id,
            event_id,
            subscriber.name,
            state,
            reason,
            tuple(records),
            owner,
        )
    else:
        resolution = (group.stream_id, event_id, subscriber.name, state, reason, (), None)
    group.host.writer.resolve(resolution)


def write_failure(group: StreamGroup, name: str, event_id: int, reason: str) -> None:
    """Fail ``name``'s delivery of an event it will never be handed (or never finish)."""
    resolution: Resolution = (group.stream_id, event_id, name, FAILED, reason, (), None)
    group.host.writer.resolve(resolution)


def settled(group: StreamGroup, event_id: int) -> None:
    """Nobody here owes ``event_id`` any more."""
    group.outstanding.pop(event_id, None)
    group.broadcast_at.pop(event_id, None)
    group.from_postgres.discard(event_id)


def delivered(
    group: StreamGroup, subscriber: Subscriber, resolution: Any, result: Any, n: int
) -> None:
    """The writer's report on a resolution of ``subscriber`` carrying ``n`` trigger events:
    hand them over if it won; if another resolution of the delivery won (the ack timeout by
    the database clock, or its triggerer's session ended), ``_lost`` decides (in the main:
    ``AckTimeout``; ``outbox.core.after_lost_delivery``); if it could not be stored, the
    subscriber fails with that error."""
    uncommitted = subscriber.uncommitted
    if result is True:
        emit = subscriber.emit
        for _ in range(n):
            emit(uncommitted.popleft())
        return
    for _ in range(min(n, len(uncommitted))):
        uncommitted.popleft()
    event_id = resolution[1]
    if isinstance(result, BaseException):
        # Still pending in the outbox: fail it, so that its lane moves on.
        group.write_failure(subscriber.name, event_id, "its trigger events could not be stored")
        group.force_fail(subscriber, _one_line(group.where, subscriber, result), "")
        return
    asyncio.get_running_loop().create_task(
        _lost(group, subscriber, event_id), name=f"shared-stream-lost[{subscriber.name}]"
    )


async def _lost(group: StreamGroup, subscriber: Subscriber, event_id: int) -> None:
    """Another resolution of a delivery won over the subscriber's: what it does next is
    ``outbox.core.after_lost_delivery``'s answer."""
    registration = subscriber.registration
    store = group.host.store
    try:
        current = await store.registration_of(group.stream_id, subscriber.name)
        reason, recorded_before_join = await store.failure_of(
            event_id, subscriber.name, registration
        )
    except Exception:
        current, reason, recorded_before_join = registration, None, False
    verdict = after_lost_delivery(
        registration=registration,
        current=current,
        reason=reason,
        recorded_before_join=recorded_before_join,
    )
    if verdict == "moved":
        log.info(
            "subscriber joined the stream on another triggerer; it leaves this one",
            extra={"trigger_id": subscriber.trigger_id, "stream": repr(group.key)},
        )
        if group.subscribers.get(subscriber.name) is subscriber:
            subscriber.registration = None  # no longer this triggerer's to remove
            group.detach(subscriber, classify=False)
        return
    if verdict == "goes on":
        # A delivery taken over at the join that ran out of time: its trigger events were not
        # stored, and whether the message comes back is the producer's failure handling.
        taken_over = reason == DATABASE_CLOCK_TIMEOUT
        log.log(
            logging.WARNING if taken_over else logging.INFO,
            "event %s was failed for trigger %s (%s%s); it goes on",
            event_id,
            subscriber.trigger_id,
            reason,
            ", taken over at its join: its trigger events were not stored" if taken_over else "",
            extra={"stream": repr(group.key)},
        )
        return
    group.force_fail(
        subscriber,
        AckTimeout(
            f"shared stream {group.key!r} trigger {subscriber.trigger_id} did not finish "
            f"processing event {event_id} in time: its delivery was failed first "
            f"({reason or 'by the ack timeout of the database clock'}); its trigger events "
            "were not stored"
        ),
        "ack timeout",
    )


def _one_line(where: str, subscriber: Subscriber, error: BaseException) -> BaseException:
    """What a subscriber is told when its trigger events could not be stored: one line, no SQL,
    no payload."""
    if isinstance(error, OutboxError):
        return error
    reason = str(getattr(error, "orig", None) or error).strip().splitlines()
    first = reason[0][:300] if reason else type(error).__name__
    return OutboxError(
        f"{where}: trigger events of subscriber {subscriber.trigger_id} could not be stored "
        f"({type(error).__name__}: {first}); its delivery failed, the event goes to the others"
    )

"""Fan-out: a group's recorded events handed to its subscribers' queues, and the flow control
that pauses its producer while they are full. Functions of a ``StreamGroup``, bound as its methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    from outbox.group import StreamGroup
    from outbox.store import EventToRecord
    from outbox.subscriber import Subscriber

__all__ = (
    "broadcast",
    "fan_out_fast",
    "flush_staged",
    "must_pause",
    "on_recorded",
    "room",
    "wait_for_room",
)


def flush_staged(group: StreamGroup) -> None:
    group.flush_scheduled = False
    if not group.staged or group.terminated:
        return
    events, raws = group.staged, group.staged_raw
    group.staged, group.staged_raw = [], []
    group.host.writer.record_events(events, lambda result: group.on_recorded(events, raws, result))


def on_recorded(
    group: StreamGroup, events: list[EventToRecord], raws: list[Any], result: Any
) -> None:
    group.in_flight -= len(events)
    group.resume.set()
    if isinstance(result, BaseException):
        if not group.terminated:
            group.fail(result)
        return
    if group.terminated:
        # The stream failed (the database was away longer than outage_limit, say): leave
        # these pending. The broker never advanced past them, so the stream that replaces
        # this one reads them again; what this one's registrations were owed is failed by
        # the sweep.
        return
    if group.stopping:
        # Nobody will be handed these events any more: fail them now rather than leave them
        # pending in the outbox, where they would hold up their lanes until a sweep.
        for event in events:
            for name in event.deliver_to:
                subscriber = group.subscribers.get(name)
                if subscriber is not None and subscriber.registration == event.owners.get(name):
                    group.write_failure(name, event.event_id, "stream stopped before broadcast")
        return
    if events:
        # Owed to subscribers elsewhere: their resolutions (which wake this committer by
        # notification) may be what completes an event.
        owners = events[-1].owners
        group.owed_elsewhere = any(
            (s := group.subscribers.get(name)) is None or s.registration != registration
            for name, registration in owners.items()
        )
    fresh = []
    reused = []
    for event, raw in zip(events, raws, strict=True):
        if event.event_id > group.last_recorded:
            group.last_recorded = event.event_id
        if event.reused:
            reused.append(event.event_id)
        else:
            fresh.append((event.event_id, raw, event.deliver_to, event.owners))
    group.broadcast(fresh)
    if reused:
        # A redelivery of an event still pending: whoever here owes it may have resolved it
        # a moment ago (not committed yet); handed out once what is queued has committed,
        # to those Postgres then says still owe it.
        group.catch_up(reused)


def broadcast(group: StreamGroup, events: Sequence[tuple[int, Any, Sequence[str], Any]]) -> None:
    """Hand recorded events ``(event id, raw, owed by, owners)`` to the subscribers here
    that are owed them through their own registration."""
    now = group.host.now()
    may_overflow = group.host.overflow == "fail"
    subscribers = group.subscribers
    outstanding = group.outstanding
    for event_id, raw, owed_by, owners in events:
        if not owed_by:
            continue
        owed = outstanding.get(event_id)
        targets: list[Subscriber] = []
        for name in owed_by:
            subscriber = subscribers.get(name)
            if subscriber is None or subscriber.registration != owners.get(name):
                if group.departed.get(owners.get(name, -1)) == name:
                    group.write_failure(name, event_id, "unsubscribed before broadcast")
                continue  # owed through another registration: another triggerer's
            if owed is not None and name in owed:
                continue  # handed out already (a redelivery while it is still on it)
            if subscriber.failed:
                group.write_failure(name, event_id, "subscriber failed before broadcast")
                continue
            if owed is None:
                owed = outstanding[event_id] = {}
            owed[name] = None
            targets.append(subscriber)
        if not targets:
            continue
        group.broadcast_at[event_id] = now
        delivery = (raw, event_id)  # one tuple, handed to every subscriber
        for subscriber in targets:
            if may_overflow and group.overflowed(subscriber):
                continue
            subscriber.raw.put(delivery)
        if not owed:
            group.settled(event_id)


async def fan_out_fast(group: StreamGroup, raw: Any) -> None:
    """The fast path (a trigger without a producer: Airflow's shared stream without acks): the
    raw event goes to every healthy subscriber's queue as it is. Beside ``broadcast`` it skips
    all that makes an event durable: no event id (-1), nothing recorded, owed, timed or
    resolved. A mode, not a measured optimisation; its loop is a near-copy of ``broadcast``'s
    last one, kept inline (a shared helper would be one more call per event on both paths)."""
    for subscriber in list(group.subscribers.values()):
        if subscriber.failed:
            continue
        if group.overflowed(subscriber):
            continue
        subscriber.raw.put((raw, -1))
    await group.wait_for_room()


def must_pause(group: StreamGroup) -> bool:
    if group.in_flight >= 4 * group.host.record_batch:
        return True
    if group.host.overflow == "fail":
        return False
    bound = group.host.max_subscriber_queue - group.in_flight
    for subscriber in group.subscribers.values():
        if len(subscriber.raw.items) >= bound and not subscriber.failed:
            return True
    return False


def room(group: StreamGroup) -> int:
    """How many more events every healthy subscriber's queue can take."""
    queued = [len(s.raw.items) for s in group.subscribers.values() if not s.failed]
    return group.host.max_subscriber_queue - max(queued, default=0)


async def wait_for_room(group: StreamGroup) -> None:
    while group.must_pause():
        if group.staged:
            group.flush_staged()
        group.resume.clear()
        await group.resume.wait()

"""How a group's events arrive: as the leader, from its producer (recorded, then handed out); as
a follower, from Postgres (what the leader recorded and this triggerer's subscribers are owed).

One task per group runs ``run_group``: the cohort grace period, the stream row, the producer,
registering the subscribers, then the consumer — taken if no live triggerer holds it, else
followed until it is free.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from outbox.codec import encode
from outbox.core import canonical_json, storable_key
from outbox.errors import StreamTerminated
from outbox.group import await_task, uncancelled
from outbox.interop import adapt_producer, advances_from_consumer
from outbox.protocol import SharedStreamProducer
from outbox.store import EventToRecord
from outbox.writer import error_line

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from outbox.group import StreamGroup

__all__ = ("run_group",)

log = logging.getLogger("outbox.manager")

HOLDS_REPORTED_EVERY = 1.0  # seconds between reads of where the committer says a stream is held

# A follower tries to take the producer over this many follow intervals apart, at least a second
# (and at once when the reader releases it): the reader's session must have ended first. It
# looks at everything still owed to its subscribers as often.
TAKEOVER_EVERY = 5


async def run_group(group: StreamGroup) -> None:
    host = group.host
    error: BaseException | None = None
    cancelled = False
    source: AsyncIterator[Any] | None = None
    try:
        if host.cohort_grace_period > 0:
            await asyncio.sleep(host.cohort_grace_period)
        group.stream_id = await host.writer.retry(
            lambda: uncancelled(
                host.store.ensure_stream(
                    group.key_json, group.class_path, group.kwargs_json, host.ack_timeout
                )
            )
        )
        early, group.early_unbound = group.early_unbound, []
        for subscriber, payload_json, trigger_event in early:
            group._store_unbound(subscriber, payload_json, trigger_event)
        if group.ack_mode:
            producer = adapt_producer(
                group.trigger_class.create_shared_stream_producer(group.kwargs)
            )
            group.producer = producer
            # A reader of this stream that died on this host (the process restarted after a
            # crash) is ended first: what it read without identity is not owed to these
            # subscribers (the broker delivers it again).
            await _holder_died_here(group)
            await _register_subscribers(group)
            group.timeout_task = asyncio.get_running_loop().create_task(
                group.enforce_timeouts(), name=f"shared-stream-ack-timeout[{group.key!r}]"
            )
            await _lead_when_possible(group, producer)
            if type(producer).on_hold_reported is not SharedStreamProducer.on_hold_reported:
                group.hold_reports = asyncio.get_running_loop().create_task(
                    _report_holds(group, producer), name=f"shared-stream-holds[{group.key!r}]"
                )
            source = producer.open_stream()
            async for item in source:
                if not group.advancing and host.committer is not None:
                    # Advances go through the producer once its stream is open: the design's
                    # Kafka producer commits through the consumer ``open_stream`` starts.
                    host.committer.add_producer(
                        group.stream_id, producer, modules=(group.trigger_class.__module__,)
                    )
                    group.advancing = True
                await _stage(group, producer, item)
        else:
            source = group.trigger_class.open_shared_stream(group.kwargs)
            async for raw in source:
                await group.fan_out_fast(raw)
        raise StreamTerminated(
            f"shared stream {group.key!r} returned without raising; shared streams are "
            "expected to run for the lifetime of the group"
        )
    except asyncio.CancelledError:
        cancelled = True
        # The stop path: this cancellation asked the poll to end, not the finish below to be
        # skipped (``await_task`` re-raises while the current task is cancelling).
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
    except Exception as exc:
        error = exc
    finally:
        if error is not None:
            log.error(
                "Shared stream poll failed; propagating to subscribers",
                exc_info=error,
                extra={"stream": repr(group.key)},
            )
            group.fail(error)
        await _finish(group, source)
    if cancelled:
        raise asyncio.CancelledError


async def _register_subscribers(group: StreamGroup) -> None:
    """Register the subscribers that joined before the stream existed; later ones register as
    they join (``StreamGroup.add``)."""
    host = group.host
    session = await host.session()
    group.registering = True
    waiting = [s for s in group.subscribers.values() if s.registration is None and not s.failed]
    if not waiting:
        return
    names = [s.name for s in waiting]
    registered, _ = await host.writer.retry(
        lambda: uncancelled(host.store.register(group.stream_id, names, session))
    )
    for subscriber in waiting:
        if subscriber.detached or subscriber.failed:
            host.writer.unregister([registered[subscriber.name]])
        else:
            subscriber.registration = registered.get(subscriber.name)


async def _lead_when_possible(group: StreamGroup, producer: SharedStreamProducer) -> None:
    """Take the stream's consumer, or follow the triggerer that has it until it is free; then
    hand out what earlier leaders recorded for these subscribers and return (to lead)."""
    host = group.host
    advance_in = "consumer" if advances_from_consumer(producer) else "anywhere"
    while True:
        session = await host.session()

        async def take(session: int = session) -> bool:
            return bool(
                await uncancelled(
                    host.store.take_consumer(group.stream_id, session, advance_in=advance_in)
                )
            )

        if await host.writer.retry(take):
            break
        if await _holder_died_here(group):
            continue
        if group.role != "follower":
            group.role = "follower"
            log.info(
                "another triggerer runs this stream's producer; following it",
                extra={"stream": repr(group.key)},
            )
        await _follow(group)
    previous = group.role
    group.role = "leader"
    if previous == "follower":
        log.info("took over this stream's producer", extra={"stream": repr(group.key)})
    group.looking += 1
    try:
        await group.host.writer.barrier()
        await _hand_out_all_owed(group)
    finally:
        _stop_looking(group)


async def _holder_died_here(group: StreamGroup) -> bool:
    """Whether the session holding the stream's producer belonged to a process of this host
    that no longer runs (a triggerer restarted after a crash): then it is ended at once, and
    its producer taken over without waiting for the session to expire."""
    store = group.host.store
    holder = await group.host.writer.retry(lambda: store.consumer_holder(group.stream_id))
    if holder is None:
        return True  # released meanwhile: try again
    session_id, owner = holder
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        log.info(
            "the triggerer that ran this stream's producer (%s) is gone; taking over",
            owner,
            extra={"stream": repr(group.key)},
        )
        await group.host.writer.retry(lambda: store.end_session(session_id))
        # Its in-process committer's lane leases died with it: released now, or no committer
        # advances or sweeps those lanes until they expire (``lease_seconds``, 30 s by default).
        await group.host.writer.retry(lambda: store.release_leases(f"{owner}:committer"))
        return True
    except OSError:  # it exists (another user's): alive
        return False
    return False


async def _follow(group: StreamGroup) -> None:
    """Hand out what the leader records for these subscribers, until it is time to try taking
    the producer over (its leader released it, or now and then: its session may have ended)."""
    group.consumer_released = False
    group.looking += 1
    try:
        await _follow_turns(group)
    finally:
        _stop_looking(group)


async def _follow_turns(group: StreamGroup) -> None:
    """Look at what was recorded since the last look whenever the reader says it recorded some
    (or ``follow_interval`` passed); now and then look at everything still owed (a redelivery
    may have re-opened an older event); return when it is time to try taking the producer."""
    host = group.host
    loop = asyncio.get_running_loop()
    every = max(1.0, TAKEOVER_EVERY * host.follow_interval)
    started = loop.time()
    full_due = started
    while not group.consumer_released and loop.time() - started < every:
        if loop.time() >= full_due:
            await _hand_out_all_owed(group)
            full_due = loop.time() + every
        else:
            more = await _hand_out_owed(group, after=group.followed_through)
            group.followed_through = more if more is not None else group.last_seen
        group.wakeup.clear()
        # Woken when the reader recorded more; when the queues were full, also when a
        # subscriber makes room (not on every event it takes: that would look once an event).
        waits = {asyncio.ensure_future(group.wakeup.wait())}
        if group.room() <= 0:
            group.resume.clear()
            waits.add(asyncio.ensure_future(group.resume.wait()))
        try:
            await asyncio.wait(waits, timeout=host.follow_interval, return_when="FIRST_COMPLETED")
        finally:
            for waiting in waits:
                waiting.cancel()


async def catch_up(group: StreamGroup) -> None:
    """Hand out what the group was asked to look for (``StreamGroup.catch_up``), once what is
    queued has committed (a resolution of it may be), while it is asked to."""
    while group.catch_up_upto is not None or group.catch_up_events:
        upto, group.catch_up_upto = group.catch_up_upto, None
        event_ids, group.catch_up_events = sorted(group.catch_up_events), set()
        group.looking += 1
        try:
            # Resolutions queued until now are committed when the barrier passes; those after
            # are remembered as settling while this looks.
            await group.host.writer.barrier()
            if upto is not None:
                await _hand_out_all_owed(group, upto=upto)
            if event_ids:
                await _hand_out_owed(group, event_ids=event_ids, limit=len(event_ids))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the database is away: a later look finds them
            log.debug("catching up failed (%s)", exc)
        finally:
            _stop_looking(group)


def _stop_looking(group: StreamGroup) -> None:
    """One reader of Postgres less; the resolutions it had remembered are forgotten once they
    are committed."""
    group.looking -= 1
    settling = frozenset(group.settling)
    if settling:
        group.host.writer.after_pending(lambda _: group.settling.difference_update(settling))


async def _hand_out_all_owed(group: StreamGroup, *, upto: int | None = None) -> None:
    """Hand out everything these subscribers are owed from Postgres (see ``_hand_out_owed``),
    a queue's worth at a time, as the subscribers make room."""
    after = 0
    while not (group.terminated or group.stopping):
        while group.room() <= 0 and not (group.terminated or group.stopping):
            group.resume.clear()
            await group.resume.wait()
        more = await _hand_out_owed(group, after=after, upto=upto)
        if more is None:
            return
        after = more


async def _hand_out_owed(
    group: StreamGroup,
    *,
    after: int = 0,
    upto: int | None = None,
    event_ids: list[int] | None = None,
    limit: int | None = None,
) -> int | None:
    """Read from Postgres the pending deliveries owed to these subscribers through their
    registrations (of events above id ``after``: of those this triggerer recorded, up to
    ``upto``; or among ``event_ids``) and hand them out, at most ``limit`` events per lane
    (default: what the queues have room for). Returns the id to look after next when a lane
    had more than that, else ``None``."""
    host = group.host
    registrations = {
        s.registration: s
        for s in group.subscribers.values()
        if s.registration is not None and not s.failed
    }
    limit = group.room() if limit is None else limit
    if not registrations or limit <= 0:
        return None
    settling = frozenset(group.settling)
    if settling:
        # Resolved here but maybe not committed yet (still pending in Postgres): not handed out
        # again; forgotten once their commit is certain.
        host.writer.after_pending(lambda _: group.settling.difference_update(settling))
    owed_through = list(registrations)
    rows = await host.writer.retry(
        lambda: uncancelled(
            host.store.owed_deliveries(
                group.stream_id,
                owed_through,
                after=after,
                upto=upto,
                event_ids=event_ids,
                session_id=host.session_id,
                limit=limit,
            )
        )
    )
    events: list[tuple[int, Any, list[str], dict[str, int]]] = []
    per_lane: dict[int, list[int]] = {}
    for event_id, lane_id, raw_text, name, registration in rows:
        ids = per_lane.setdefault(lane_id, [])
        if not ids or ids[-1] != event_id:
            ids.append(event_id)
        if (event_id, name) in settling or (event_id, name) in group.settling:
            continue
        if not events or events[-1][0] != event_id:
            events.append((event_id, group.decode_raw(raw_text), [], {}))
        events[-1][2].append(name)
        events[-1][3][name] = registration
    if rows:
        group.last_seen = max(group.last_seen, max(row[0] for row in rows))
    group.from_postgres.update(event_id for event_id, *_ in events)
    group.broadcast(events)
    # A lane cut short has more after the last event read from it; ids grow with positions
    # within a lane, so the next look goes on from the lowest such id (what comes again is
    # already handed out, and is skipped).
    cut = [ids[-1] for ids in per_lane.values() if len(ids) >= limit]
    return min(cut) if cut else None


async def _report_holds(group: StreamGroup, producer: SharedStreamProducer) -> None:
    """Tell the producer, every second, where the committer (in this process or another)
    recorded the stream's broker acknowledgements held: it may deliver those again."""
    while True:
        await asyncio.sleep(HOLDS_REPORTED_EVERY)
        try:
            holds = await group.host.store.lane_holds(group.stream_id)
        except Exception as exc:  # the database is away: next time
            log.debug("reading the stream's holds failed (%s)", exc)
            continue
        for identity, held_for in holds:
            producer.on_hold_reported(identity, held_for)


async def _stage(group: StreamGroup, producer: SharedStreamProducer, item: Any) -> None:
    raw, payload = item
    where = group.where
    lane = producer.get_advance_lane(payload)
    # Most lanes are ints or strings (a partition, a message group): their lane ids are looked
    # up by value, without serialising the lane for every event. (1, True and 1.0 are equal but
    # serialise differently: hence the type in the key.)
    lane_id = group.lane_cache.get((type(lane), lane)) if type(lane) in (int, str) else None
    identity = producer.get_event_key(payload)
    if identity is not None:
        if not isinstance(identity, str):
            raise TypeError(
                f"{where}: get_event_key returned {type(identity).__name__}, expected str or None"
            )
        storable_key(identity, what=f"{where}: get_event_key returned")
    raw_json = encode(
        producer.serialize_event(raw), what=f"{where}: raw event (override serialize_event)"
    )
    payload_json = encode(
        producer.serialize_payload(payload),
        what=f"{where}: broker payload (override serialize_payload/deserialize_payload)",
    )
    if lane_id is None:
        lane_json = storable_key(canonical_json(lane, what=f"{where}: lane"), what=f"{where}: lane")
        lane_id = group.lane_ids.get(lane_json)
        if lane_id is None:
            group.lane_ids.update(
                await group.host.writer.retry(
                    lambda: group.host.store.ensure_lanes(group.stream_id, [lane_json])
                )
            )
            lane_id = group.lane_ids[lane_json]
        if type(lane) in (int, str):
            group.lane_cache[(type(lane), lane)] = lane_id
    group.staged.append(
        EventToRecord(
            stream_id=group.stream_id,
            lane_id=lane_id,
            identity=identity,
            raw_json=raw_json,
            payload_json=payload_json,
        )
    )
    group.staged_raw.append(raw)
    group.in_flight += 1
    if len(group.staged) >= group.host.record_batch:
        group.flush_staged()
    elif not group.flush_scheduled:
        group.flush_scheduled = True
        asyncio.get_running_loop().call_soon(group.flush_staged)
    await group.wait_for_room()


async def _finish(group: StreamGroup, source: AsyncIterator[Any] | None) -> None:
    host = group.host
    group.stopping = True
    for task in (group.timeout_task, group.hold_reports, group.catching_up):
        if task is not None:
            task.cancel()
            await await_task(task)
    aclose = getattr(source, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            log.debug("closing the shared stream source failed", exc_info=True)
    try:
        await host.writer.barrier()
        if group.role == "leader" and host.committer is not None and group.advancing:
            await host.committer.drain(group.stream_id)
    except Exception as exc:  # the database is away: the stream's next reader advances it
        log.warning("could not advance the stream before closing it (%s)", error_line(exc))
    if group.producer is None:
        return
    if group.role == "leader":
        if host.committer is not None:
            # A newer group of the same key may have registered its own producer.
            host.committer.remove_producer(group.stream_id, group.producer)
        session = host.session_id
        if session is not None and not host.holds_elsewhere(group):
            try:
                await host.store.release_consumer(group.stream_id, session)
            except Exception as exc:  # its session ends, or expires, anyway
                log.debug("could not release the stream's producer (%s)", exc)
    try:
        await group.producer.aclose()
    except Exception:
        log.warning("Producer aclose failed", exc_info=True)

"""Who owes an event is what Postgres knows: triggerer sessions, subscriber registrations, the
snapshot Postgres takes as it records an event, and the sweep that fails what nobody can deliver
any more (store level; the managers on top are tested in test_triggerers.py)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from outbox.core import DATABASE_CLOCK_TIMEOUT, NO_FAILURE_LEFT, canonical_json
from outbox.store import EventToRecord, ResolutionRow

if TYPE_CHECKING:
    from outbox import OutboxStore

KEY = canonical_json(("queue", "sessions"), what="key")


async def _stream(store: OutboxStore, ack_timeout: float = 300.0) -> tuple[int, int]:
    stream_id = await store.ensure_stream(KEY, "tests.streams.StreamTrigger", "{}", ack_timeout)
    lanes = await store.ensure_lanes(stream_id, ["null"])
    return stream_id, lanes["null"]


async def _record(
    store: OutboxStore, stream_id: int, lane_id: int, n: int, *, session: int, identity: str = ""
) -> list[EventToRecord]:
    events = [
        EventToRecord(
            stream_id=stream_id,
            lane_id=lane_id,
            identity=f"{identity}{i}" if identity else None,
            raw_json=json.dumps({"n": i}),
            payload_json=json.dumps(i),
        )
        for i in range(n)
    ]
    async with store.engine.begin() as conn:
        await store.record_events(conn, events, session_id=session)
    return events


async def _deliveries(store: OutboxStore) -> list[tuple[int, str, Any, str | None]]:
    """``(event id, subscriber, owner registration, state or None if pending)``."""
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            sa.text(
                """
                SELECT e.id, m.name, m.owner,
                       CASE WHEN m.name = ANY(e.resolved)
                            THEN coalesce(u.state, 'acked') END
                FROM outbox_event e CROSS JOIN LATERAL jsonb_each(e.snapshot) m(name, owner)
                LEFT JOIN outbox_unacked u ON u.event_id = e.id AND u.subscriber = m.name
                ORDER BY e.id, m.name
                """
            )
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]


async def test_postgres_takes_the_snapshot_from_the_registrations(store: OutboxStore) -> None:
    stream_id, lane_id = await _stream(store)
    one = await store.create_session("triggerer-1", ttl=60)
    two = await store.create_session("triggerer-2", ttl=60)
    first = await store.register(stream_id, ["a"], one)
    second = await store.register(stream_id, ["b"], two)
    events = await _record(store, stream_id, lane_id, 2, session=one)
    assert [sorted(e.deliver_to) for e in events] == [["a", "b"], ["a", "b"]]
    assert events[0].owners == {"a": first[0]["a"], "b": second[0]["b"]}
    # Excluded (failed or leaving) registrations are in no new snapshot.
    await store.exclude([second[0]["b"]])
    assert [e.deliver_to for e in await _record(store, stream_id, lane_id, 1, session=one)] == [
        ["a"]
    ]
    # A stopped triggerer's subscribers stay owed new events for the ack timeout (they may be
    # back, here or on another triggerer), and then no longer.
    await store.end_session(one)
    away = await _record(store, stream_id, lane_id, 1, session=two)
    assert away[0].deliver_to == ["a"]
    async with store.engine.begin() as conn:
        await conn.execute(
            sa.text("UPDATE outbox_session SET ended_at = now() - interval '301 seconds'")
        )
    gone = await _record(store, stream_id, lane_id, 1, session=two)
    assert gone[0].deliver_to == []  # born resolved: nobody is owed it


async def test_joining_again_moves_what_the_earlier_registration_was_owed(
    store: OutboxStore,
) -> None:
    """A follower's triggerer restarts (the reader lives on): what its subscriber was owed,
    and what was recorded while it was away, is now owed to it through its new registration;
    nothing is failed."""
    stream_id, lane_id = await _stream(store)
    reader = await store.create_session("reader", ttl=60)
    old = await store.create_session("follower-old", ttl=60)
    await store.register(stream_id, ["r"], reader)
    await store.register(stream_id, ["f"], old)
    before = await _record(store, stream_id, lane_id, 2, session=reader)
    await store.end_session(old)  # stopped: away
    during = await _record(store, stream_id, lane_id, 1, session=reader)
    assert sorted(during[0].deliver_to) == ["f", "r"]
    new = await store.create_session("follower-new", ttl=60)
    ids, moved = await store.register(stream_id, ["f"], new)
    assert moved == 3
    assert {(n, owner) for _, n, owner, _ in await _deliveries(store) if n == "f"} == {
        ("f", ids["f"])
    }
    assert await store.fail_expired() == 0
    owed = await store.owed_deliveries(stream_id, [ids["f"]])
    assert [e for e, *_ in owed] == [e.event_id for e in (*before, *during)]


async def test_a_moved_delivery_failed_by_the_database_clock_says_it_came_with_the_join(
    store: OutboxStore,
) -> None:
    """A follower restarts late in the ack timeout of what it was owed: the deliveries moved to
    its new registration still end by the ack timeout counted from their recording (a lane is
    never held longer), and ``failure_of`` tells its manager they came with the join (so the
    subscriber goes on, ``outbox.core.after_lost_delivery``); a delivery recorded after the
    join is its own."""
    stream_id, lane_id = await _stream(store, ack_timeout=60)
    reader = await store.create_session("reader", ttl=60)
    old = await store.create_session("follower-old", ttl=60)
    await store.register(stream_id, ["f"], old)
    before = await _record(store, stream_id, lane_id, 2, session=reader, identity="k")
    await store.end_session(old)  # restarting
    new = await store.create_session("follower-new", ttl=60)
    ids, moved = await store.register(stream_id, ["f"], new)
    assert moved == 2
    after = await _record(store, stream_id, lane_id, 1, session=reader, identity="m")
    async with store.engine.begin() as conn:  # the recordings 61 s ago, the join just before
        await conn.execute(
            sa.text("UPDATE outbox_event SET created_at = created_at - interval '61 seconds'")
        )
        joined = await conn.scalar(
            sa.text("SELECT created_at FROM outbox_event WHERE id = :id"),
            {"id": after[0].event_id},
        )
        await conn.execute(
            sa.text("UPDATE outbox_subscriber SET joined_at = :joined WHERE id = :f"),
            {"f": ids["f"], "joined": joined},
        )
    assert await store.fail_expired() == 3
    assert {state for _, n, _, state in await _deliveries(store) if n == "f"} == {"failed"}
    for event in before:
        assert await store.failure_of(event.event_id, "f", ids["f"]) == (
            DATABASE_CLOCK_TIMEOUT,
            True,
        )
    assert await store.failure_of(after[0].event_id, "f", ids["f"]) == (
        DATABASE_CLOCK_TIMEOUT,
        False,
    )
    # Nothing failed for a subscriber that was never owed it.
    assert await store.failure_of(after[0].event_id, "nobody", ids["f"]) == (
        NO_FAILURE_LEFT,
        False,
    )


async def test_events_without_identity_of_a_reader_that_is_gone_fail_at_once(
    store: OutboxStore,
) -> None:
    """The only triggerer (the reader) restarts: the broker delivers its unadvanced messages
    again to the new reader, so an event without identity that the old one recorded is failed
    at once (a new event replaces it), not moved to the subscriber's new registration; an event
    with identity is moved (its redelivery is deduplicated into it)."""
    stream_id, lane_id = await _stream(store)
    old = await store.create_session("triggerer-old", ttl=60)
    await store.register(stream_id, ["a"], old)
    plain = await _record(store, stream_id, lane_id, 1, session=old)
    keyed = await _record(store, stream_id, lane_id, 1, session=old, identity="m")
    assert await store.fail_expired() == 0
    await store.end_session(old)
    new = await store.create_session("triggerer-new", ttl=60)
    ids, moved = await store.register(stream_id, ["a"], new)
    assert moved == 1
    assert await store.fail_expired() == 1
    states = {e: (owner, state) for e, _, owner, state in await _deliveries(store)}
    assert states[plain[0].event_id][1] == "failed"
    assert states[keyed[0].event_id] == (ids["a"], None)


async def test_what_a_subscriber_that_left_was_owed_fails_at_once(store: OutboxStore) -> None:
    stream_id, lane_id = await _stream(store)
    session = await store.create_session("triggerer", ttl=60)
    ids, _ = await store.register(stream_id, ["a", "b"], session)
    events = await _record(store, stream_id, lane_id, 1, session=session)
    await store.unregister([ids["b"]])
    assert await store.fail_expired() == 1
    assert {(n, state) for e, n, _, state in await _deliveries(store)} == {
        ("a", None),
        ("b", "failed"),
    }
    assert events[0].deliver_to == ["a", "b"]


async def test_sweep_ends_expired_sessions_and_times_out_what_they_owed(
    store: OutboxStore,
) -> None:
    """A triggerer that died (its session expired): what it was owed fails the ack timeout
    after it was recorded, or after the session died if that came first."""
    stream_id, lane_id = await _stream(store, ack_timeout=60)
    session = await store.create_session("triggerer", ttl=60)
    await store.register(stream_id, ["a"], session)
    events = await _record(store, stream_id, lane_id, 1, session=session, identity="k")
    assert events[0].deliver_to == ["a"]
    async with store.engine.begin() as conn:
        await conn.execute(sa.text("UPDATE outbox_session SET expires_at = now()"))
    assert await store.fail_expired() == 0  # away: it may be back within the ack timeout
    # Ended by the sweep: a heartbeat cannot revive it.
    assert await store.renew_session(session, ttl=60) is None
    async with store.engine.begin() as conn:
        await conn.execute(
            sa.text("UPDATE outbox_session SET ended_at = now() - interval '61 seconds'")
        )
    assert await store.fail_expired() == 1


async def test_sweep_fails_by_database_clock_ack_timeout_whoever_owes_it(
    store: OutboxStore,
) -> None:
    stream_id, lane_id = await _stream(store, ack_timeout=0.2)
    session = await store.create_session("triggerer", ttl=60)
    await store.register(stream_id, ["a"], session)
    await _record(store, stream_id, lane_id, 1, session=session)
    assert await store.fail_expired(grace=3600) == 0
    async with store.engine.begin() as conn:
        await conn.execute(
            sa.text("UPDATE outbox_event SET created_at = now() - interval '1 second'")
        )
    assert await store.fail_expired() == 1
    assert [state for *_, state in await _deliveries(store)] == ["failed"]


async def test_sweep_leaves_lanes_another_committer_holds(store: OutboxStore) -> None:
    stream_id, lane_id = await _stream(store)
    session = await store.create_session("triggerer", ttl=60)
    ids, _ = await store.register(stream_id, ["a"], session)
    await _record(store, stream_id, lane_id, 1, session=session)
    await store.unregister(list(ids.values()))
    assert await store.take_lease(lane_id, "committer-1", 30) is not None
    assert await store.fail_expired(owner="committer-2") == 0
    assert await store.fail_expired(owner="committer-1") == 1


async def test_a_redelivery_owes_the_event_through_the_current_registration(
    store: OutboxStore,
) -> None:
    stream_id, lane_id = await _stream(store)
    old = await store.create_session("triggerer-old", ttl=60)
    await store.register(stream_id, ["a"], old)
    first = await _record(store, stream_id, lane_id, 1, session=old, identity="m")
    await store.end_session(old)
    new = await store.create_session("triggerer-new", ttl=60)
    current, _ = await store.register(stream_id, ["a"], new)
    # Redelivered: the pending occurrence is reused, owed through the new registration.
    again = await _record(store, stream_id, lane_id, 1, session=new, identity="m")
    assert again[0].event_id == first[0].event_id
    assert again[0].deliver_to == ["a"]
    assert [(n, owner) for _, n, owner, _ in await _deliveries(store)] == [("a", current["a"])]
    assert await store.fail_expired() == 0


async def test_a_consumer_runs_in_one_live_session_at_a_time(store: OutboxStore) -> None:
    stream_id, _ = await _stream(store)
    one = await store.create_session("triggerer-1", ttl=60)
    two = await store.create_session("triggerer-2", ttl=60)
    assert await store.take_consumer(stream_id, one, advance_in="anywhere")
    assert not await store.take_consumer(stream_id, two, advance_in="anywhere")
    assert await store.take_consumer(stream_id, one, advance_in="anywhere")  # held: kept
    assert await store.renew_session(one, ttl=60) == [stream_id]
    await store.release_consumer(stream_id, one)
    assert await store.renew_session(one, ttl=60) == []
    assert await store.take_consumer(stream_id, two, advance_in="consumer")
    await store.end_session(two)  # a dead session's producer may be taken over
    assert await store.take_consumer(stream_id, one, advance_in="anywhere")


async def test_owed_deliveries_of_a_follower(store: OutboxStore) -> None:
    stream_id, lane_id = await _stream(store)
    leader = await store.create_session("triggerer-1", ttl=60)
    follower = await store.create_session("triggerer-2", ttl=60)
    await store.register(stream_id, ["a"], leader)
    ids, _ = await store.register(stream_id, ["b", "c"], follower)
    events = await _record(store, stream_id, lane_id, 3, session=leader)
    async with store.engine.begin() as conn:
        await store.resolve(
            conn, [ResolutionRow(stream_id, events[0].event_id, "b", "acked", None)]
        )
    owed = await store.owed_deliveries(stream_id, [ids["b"], ids["c"]])
    assert [(e, name) for e, _, _, name, _ in owed] == [
        (events[0].event_id, "c"),
        (events[1].event_id, "b"),
        (events[1].event_id, "c"),
        (events[2].event_id, "b"),
        (events[2].event_id, "c"),
    ]
    assert json.loads(owed[0][2] or "null") == {"n": 0}
    later = await store.owed_deliveries(stream_id, [ids["b"]], after=events[1].event_id)
    assert [(e, name) for e, _, _, name, _ in later] == [(events[2].event_id, "b")]


async def test_events_without_identity_of_a_reader_that_is_gone_are_passed_over_not_advanced(
    store: OutboxStore,
) -> None:
    """What a dead reader recorded without identity is not advanced on the broker, even once
    resolved: the broker delivers those messages again from what was committed, and their new
    events (later in the lane) are advanced instead. Advancing the old ones would commit past
    the new ones while they are still owed (and, with a crash then, lose them)."""
    from outbox import LaneCommitter
    from tests.streams import RecordingProducer

    stream_id, lane_id = await _stream(store)
    old = await store.create_session("triggerer-old", ttl=60)
    await store.register(stream_id, ["a", "b"], old)
    first = await _record(store, stream_id, lane_id, 3, session=old)
    # "a" finished all three, "b" only the first: then the reader died.
    async with store.engine.begin() as conn:
        await store.resolve(
            conn,
            [ResolutionRow(stream_id, e.event_id, "a", "acked", None) for e in first]
            + [ResolutionRow(stream_id, first[0].event_id, "b", "acked", None)],
        )
    await store.end_session(old)
    new = await store.create_session("triggerer-new", ttl=60)
    await store.register(stream_id, ["a", "b"], new)
    again = await _record(store, stream_id, lane_id, 3, session=new)  # read again from the broker
    async with store.engine.begin() as conn:
        await store.resolve(
            conn,
            [ResolutionRow(stream_id, e.event_id, s, "acked", None) for e in again for s in "ab"],
        )
    producer = RecordingProducer([])
    committer = LaneCommitter(
        store, producers={("queue", "sessions"): producer}, poll_interval=0.01
    )
    await committer.run_once()  # the sweep fails "b"'s two old deliveries: the broker redelivers
    while await committer.run_once():
        pass
    assert producer.batches[-1] == [0, 1, 2]  # the new events only
    assert sum(len(batch) for batch in producer.batches) == 3
    async with store.engine.connect() as conn:
        cursor = await conn.scalar(
            sa.text("SELECT advanced_through FROM outbox_lane WHERE id = :id"), {"id": lane_id}
        )
    assert cursor == 6


async def test_a_delivery_owed_to_an_earlier_registration_moves_to_the_newer_one(
    store: OutboxStore,
) -> None:
    """An event recorded on another triggerer while a subscriber joined again can take the
    earlier registration into its snapshot after the join moved what that one was owed: the
    sweep moves it to the newer registration (whose triggerer hands it out) instead of failing
    it; a subscriber that left and did not join again still has its delivery failed."""
    stream_id, lane_id = await _stream(store)
    reader = await store.create_session("reader", ttl=60)
    await store.register(stream_id, ["a"], reader)
    follower = await store.create_session("follower", ttl=60)
    before, _ = await store.register(stream_id, ["b", "c"], follower)
    restarted = await store.create_session("follower-restarted", ttl=60)
    after, _ = await store.register(stream_id, ["b"], restarted)
    await store.unregister([before["c"]])  # c left for good
    raced = await _record(store, stream_id, lane_id, 1, session=reader, identity="k")
    async with store.engine.begin() as conn:  # the snapshot the race left it with
        await conn.execute(
            sa.text("UPDATE outbox_event SET snapshot = CAST(:s AS jsonb) WHERE id = :id"),
            {
                "s": json.dumps({"a": 1, "b": before["b"], "c": before["c"]}),
                "id": raced[0].event_id,
            },
        )
    assert await store.fail_expired() == 1  # c's
    states = {(name, owner): state for _, name, owner, state in await _deliveries(store)}
    assert states == {("a", 1): None, ("b", after["b"]): None, ("c", before["c"]): "failed"}

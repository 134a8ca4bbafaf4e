"""Who owes an event is what Postgres knows: triggerer sessions, subscriber registrations, the
snapshot Postgres takes as it records an event, and the sweep that fails what nobody can deliver
any more (store level; the managers on top are tested in test_triggerers.py)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from outbox.core import canonical_json
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


async def test_postgres_takes_the_snapshot_from_live_registrations(store: OutboxStore) -> None:
    stream_id, lane_id = await _stream(store)
    one = await store.create_session("triggerer-1", ttl=60)
    two = await store.create_session("triggerer-2", ttl=60)
    first = await store.register(stream_id, ["a"], one)
    second = await store.register(stream_id, ["b"], two)
    events = await _record(store, stream_id, lane_id, 2, session=one)
    assert [sorted(e.deliver_to) for e in events] == [["a", "b"], ["a", "b"]]
    assert events[0].owners == {"a": first["a"], "b": second["b"]}
    # Excluded (failed or leaving) and ended registrations are in no new snapshot.
    await store.exclude([second["b"]])
    assert [e.deliver_to for e in await _record(store, stream_id, lane_id, 1, session=one)] == [
        ["a"]
    ]
    await store.end_session(one)
    later = await _record(store, stream_id, lane_id, 1, session=two)
    assert later[0].deliver_to == []  # born resolved: nobody live is owed it


async def test_sweep_fails_at_once_what_a_gone_registration_was_owed(store: OutboxStore) -> None:
    stream_id, lane_id = await _stream(store)
    old = await store.create_session("triggerer-old", ttl=60)
    await store.register(stream_id, ["a", "b"], old)
    events = await _record(store, stream_id, lane_id, 2, session=old)
    async with store.engine.begin() as conn:
        await store.resolve(
            conn, [ResolutionRow(stream_id, events[0].event_id, "a", "acked", None)]
        )
    assert await store.fail_expired() == 0  # owed through live registrations: left alone
    # The triggerer restarts: its subscriber b joins again (a new registration, a new session);
    # a is not back. What the old registrations were owed cannot be delivered any more.
    new = await store.create_session("triggerer-new", ttl=60)
    await store.register(stream_id, ["b"], new)
    assert await store.fail_expired() == 2  # b's old registration is replaced
    await store.end_session(old)
    assert await store.fail_expired() == 1  # a's went with its session
    states = {(e, n): state for e, n, _, state in await _deliveries(store)}
    assert states == {
        (events[0].event_id, "a"): "acked",
        (events[0].event_id, "b"): "failed",
        (events[1].event_id, "a"): "failed",
        (events[1].event_id, "b"): "failed",
    }
    assert await store.fail_expired() == 0


async def test_sweep_ends_expired_sessions_and_fails_their_deliveries(store: OutboxStore) -> None:
    stream_id, lane_id = await _stream(store)
    session = await store.create_session("triggerer", ttl=0.001)
    await store.register(stream_id, ["a"], session)
    async with store.engine.begin() as conn:
        await conn.execute(
            sa.text("UPDATE outbox_session SET expires_at = now() + interval '1 hour'")
        )
    events = await _record(store, stream_id, lane_id, 1, session=session)
    assert events[0].deliver_to == ["a"]
    async with store.engine.begin() as conn:
        await conn.execute(sa.text("UPDATE outbox_session SET expires_at = now()"))
    assert await store.fail_expired() == 1
    # Ended by the sweep: a heartbeat cannot revive it.
    assert await store.renew_session(session, ttl=60) is None


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
    await store.register(stream_id, ["a"], session)
    await _record(store, stream_id, lane_id, 1, session=session)
    await store.end_session(session)
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
    new = await store.create_session("triggerer-new", ttl=60)
    current = await store.register(stream_id, ["a"], new)
    await store.end_session(old)
    # Redelivered before any sweep: the pending occurrence is reused, owed through the new one.
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
    ids = await store.register(stream_id, ["b", "c"], follower)
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

"""First resolution wins, enforced by the database (DESIGN.md 3.3), at the store.

A batch's resolutions of one event are applied together only if none of their subscribers has
resolved it yet; otherwise each is applied alone, so that the event row tells which ones won.
Two resolvers racing on one event wait for each other's row lock and the second sees the first.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

import sqlalchemy as sa

from outbox.core import canonical_json
from outbox.store import EventToRecord, ResolutionRow
from tests.polling import eventually
from tests.test_committer import KEY

if TYPE_CHECKING:
    from outbox import OutboxStore

SNAPSHOT = ("a", "b", "c")


async def _event(store: OutboxStore) -> tuple[int, int]:
    stream_id = await store.ensure_stream(
        canonical_json(KEY, what="key"), "tests.NotATrigger", "{}", 300.0
    )
    lane_id = (await store.ensure_lanes(stream_id, ["null"]))["null"]
    event = EventToRecord(stream_id, lane_id, None, "{}", json.dumps("m1"), SNAPSHOT)
    async with store.engine.begin() as conn:
        await store.record_events(conn, [event])
    return stream_id, event.event_id


async def _stored(store: OutboxStore, event_id: int) -> tuple[list[object], list[object], object]:
    async with store.engine.connect() as conn:
        deliveries = (
            await conn.execute(
                sa.text(
                    "SELECT subscriber, state, reason FROM outbox_delivery WHERE event_id = :e "
                    "ORDER BY subscriber"
                ),
                {"e": event_id},
            )
        ).all()
        records = (
            await conn.execute(
                sa.text(
                    "SELECT subscriber, payload FROM outbox_record WHERE event_id = :e "
                    "ORDER BY subscriber, ordinal"
                ),
                {"e": event_id},
            )
        ).all()
        counts = (
            await conn.execute(
                sa.text("SELECT pending, acked, rejected, failed FROM outbox_event WHERE id = :e"),
                {"e": event_id},
            )
        ).one()
    return [tuple(r) for r in deliveries], [tuple(r) for r in records], tuple(counts)


async def test_a_batch_applies_the_winners_and_returns_the_losers(store: OutboxStore) -> None:
    stream_id, event_id = await _event(store)
    async with store.engine.begin() as conn:
        lost = await store.resolve(
            conn, [ResolutionRow(stream_id, event_id, "b", "rejected", "not mine")]
        )
    assert lost == set()
    async with store.engine.begin() as conn:
        lost = await store.resolve(
            conn,
            [
                ResolutionRow(stream_id, event_id, "a", "acked", None, ('{"by": "a"}',)),
                ResolutionRow(stream_id, event_id, "b", "acked", None, ('{"by": "b"}',)),
                ResolutionRow(stream_id, event_id, "c", "failed", "timed out", ('"not stored"',)),
            ],
        )
    assert lost == {1}  # b resolved before
    deliveries, records, counts = await _stored(store, event_id)
    assert deliveries == [
        ("a", "acked", None),
        ("b", "rejected", "not mine"),
        ("c", "failed", "timed out"),
    ]
    assert records == [("a", {"by": "a"})]  # none with the lost ack, nor with the failure
    assert counts == (0, 1, 1, 1)


async def test_the_first_of_two_resolutions_in_one_batch_wins(store: OutboxStore) -> None:
    stream_id, event_id = await _event(store)
    async with store.engine.begin() as conn:
        lost = await store.resolve(
            conn,
            [
                ResolutionRow(stream_id, event_id, "a", "acked", None, ('{"n": 1}',)),
                ResolutionRow(stream_id, event_id, "b", "acked", None),
                ResolutionRow(stream_id, event_id, "a", "failed", "late timeout"),
            ],
        )
    assert lost == {2}  # a resolved earlier in the batch
    deliveries, records, counts = await _stored(store, event_id)
    assert deliveries == [("a", "acked", None), ("b", "acked", None)]
    assert records == [("a", {"n": 1})]
    assert counts == (1, 2, 0, 0)


async def test_of_two_concurrent_resolvers_the_first_to_commit_wins(store: OutboxStore) -> None:
    stream_id, event_id = await _event(store)
    async with store.engine.connect() as first, store.engine.connect() as second:
        await first.begin()
        assert not await store.resolve(
            first, [ResolutionRow(stream_id, event_id, "a", "acked", None, ('"first"',))]
        )
        second_pid = await second.scalar(sa.text("SELECT pg_backend_pid()"))
        await second.commit()

        async def resolve_second() -> set[int]:
            async with second.begin():
                return await store.resolve(
                    second,
                    [
                        ResolutionRow(stream_id, event_id, "a", "acked", None, ('"second"',)),
                        ResolutionRow(stream_id, event_id, "b", "rejected", "not mine"),
                    ],
                )

        racing = asyncio.create_task(resolve_second())

        async def second_waits_for_the_row() -> bool:
            async with store.engine.connect() as probe:
                waiting = await probe.scalar(
                    sa.text("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = :p"),
                    {"p": second_pid},
                )
            return bool(waiting)

        await eventually(second_waits_for_the_row)
        await first.commit()
        assert await racing == {0}  # a lost to the first resolver; b won
    deliveries, records, counts = await _stored(store, event_id)
    assert deliveries == [("a", "acked", None), ("b", "rejected", "not mine")]
    assert records == [("a", "first")]
    assert counts == (1, 1, 1, 0)
    async with store.engine.connect() as conn:
        assert await store.resolved_as(
            conn,
            [
                ResolutionRow(stream_id, event_id, "a", "acked", None),
                ResolutionRow(stream_id, event_id, "b", "rejected", None),
                ResolutionRow(stream_id, event_id, "b", "acked", None),
                ResolutionRow(stream_id, event_id, "c", "acked", None),
            ],
        ) == {(event_id, "a", "acked"), (event_id, "b", "rejected")}


async def test_one_batch_of_mixed_states_and_record_counts_lands_on_each_event(
    store: OutboxStore,
) -> None:
    """Grouped by event for the statement, each resolution still lands on its own event with
    its own state, reason and trigger events (several, one or none), in order."""
    stream_id, first = await _event(store)
    second = EventToRecord(
        stream_id,
        (await store.ensure_lanes(stream_id, ["null"]))["null"],
        None,
        "{}",
        json.dumps("m2"),
        SNAPSHOT,
    )
    async with store.engine.begin() as conn:
        await store.record_events(conn, [second])
    batch = [
        ResolutionRow(stream_id, second.event_id, "c", "acked", None, ['{"n":1}']),
        ResolutionRow(stream_id, first, "a", "acked", None, ['{"n":2}', '{"n":3}']),
        ResolutionRow(stream_id, first, "b", "rejected", "not mine"),
        ResolutionRow(stream_id, second.event_id, "a", "acked", None),
        ResolutionRow(stream_id, first, "c", "failed", "filter raised"),
        ResolutionRow(stream_id, second.event_id, "b", "acked", None, ['{"n":4}']),
    ]
    async with store.engine.begin() as conn:
        assert await store.resolve(conn, batch) == set()
    assert await _stored(store, first) == (
        [("a", "acked", None), ("b", "rejected", "not mine"), ("c", "failed", "filter raised")],
        [("a", {"n": 2}), ("a", {"n": 3})],
        (0, 1, 1, 1),
    )
    assert await _stored(store, second.event_id) == (
        [("a", "acked", None), ("b", "acked", None), ("c", "acked", None)],
        [("b", {"n": 4}), ("c", {"n": 1})],
        (0, 3, 0, 0),
    )

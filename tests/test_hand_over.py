"""Trigger events reach their subscriber after their resolution commits, resolution by
resolution and in order: however many each raw event produced, and none of a resolution that
lost to an earlier one (here a failure stored by another process, as an out-of-process
committer's ack-timeout sweep would)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa

from outbox import SharedStreamManager, TriggerEvent
from outbox.store import ResolutionRow
from tests.streams import (
    Background,
    Gate,
    ScriptedTrigger,
    delivery_rows,
    event_rows,
    producer_of,
    record_rows,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from outbox import OutboxStore

pytestmark = pytest.mark.anyio


async def test_each_resolution_hands_over_its_own_trigger_events_in_order(
    store: OutboxStore,
) -> None:
    producer = producer_of(*(({"n": n}, f"p{n}") for n in (0, 1, 2, 3, 0, 2)))
    gate = Gate()

    async def script(trigger: ScriptedTrigger, raw: AsyncIterator[Any]) -> AsyncIterator[Any]:
        position = 0
        async for event in raw:
            position += 1
            for i in range(event["n"]):
                yield TriggerEvent({"at": position, "i": i})
            if position == 3:
                await gate.hold(event)

    async with SharedStreamManager(store) as manager:
        sub = Background(manager.subscribe(trigger_id=1, trigger=ScriptedTrigger(script)))
        await gate.arrived(1)
        third = (await event_rows(store))[2]
        assert third["payload"] == "p2"
        # Another process fails this delivery first: the subscriber's acked resolution loses.
        async with store.engine.begin() as conn:
            stream_id = await conn.scalar(
                sa.text("SELECT stream_id FROM outbox_event WHERE id = :e"), {"e": third["id"]}
            )
            lost = await store.resolve(
                conn, [ResolutionRow(stream_id, third["id"], "1", "failed", "ack timeout")]
            )
        assert lost == set()
        gate.release()
        await wait_until(lambda: len(producer.advanced) == 6)
        assert sub.items == [
            {"at": 2, "i": 0},
            {"at": 4, "i": 0},
            {"at": 4, "i": 1},
            {"at": 4, "i": 2},
            {"at": 6, "i": 0},
            {"at": 6, "i": 1},
        ]
    assert [(payload, state) for payload, _, state, _ in await delivery_rows(store)] == [
        ("p0", "acked"),
        ("p1", "acked"),
        ("p2", "failed"),
        ("p3", "acked"),
        ("p0", "acked"),
        ("p2", "acked"),
    ]
    assert [(event, record) for event, _, _, record in await record_rows(store)] == [
        ("p1", {"at": 2, "i": 0}),
        ("p3", {"at": 4, "i": 0}),
        ("p3", {"at": 4, "i": 1}),
        ("p3", {"at": 4, "i": 2}),
        ("p2", {"at": 6, "i": 0}),
        ("p2", {"at": 6, "i": 1}),
    ]

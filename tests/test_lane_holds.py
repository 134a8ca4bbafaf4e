"""Where a lane's broker acknowledgement is held, as its producer says (``describe_hold``): the
committer records it with the cursor move, ``outbox status`` and the metrics show it, and prune
keeps the lane's events from the held one on. Any producer, no broker: a double that says what
the test tells it."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from rich.console import Console

from outbox import LaneCommitter, SharedStreamProducer
from outbox.core import canonical_json
from outbox.display import readable
from outbox.metrics import CommitterMetrics
from outbox.status import collect_status, render_table
from outbox.store import EventToRecord, ResolutionRow

if TYPE_CHECKING:
    from collections.abc import Hashable, Sequence

    from outbox import AdvanceItem, OutboxStore

KEY = ("holds", "q")


class HoldingProducer(SharedStreamProducer):
    """Advances nothing; says the lane is held at ``held`` (whatever the test sets)."""

    def __init__(self) -> None:
        self.held: Any = None
        self.advanced: list[Any] = []

    async def open_stream(self) -> Any:  # pragma: no cover - never opened by the committer
        raise NotImplementedError
        yield

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        self.advanced += [payload for payload, _ in batch]

    def describe_hold(self, lane: Hashable) -> str | None:
        held: str | None = self.held
        return held


async def record(store: OutboxStore, names: Sequence[str]) -> None:
    """Events ``names`` (each its own identity) on one lane, resolved by their one subscriber."""
    stream_id = await store.ensure_stream(
        canonical_json(KEY, what="key"), "tests.test_lane_holds.Nothing", "{}", 300.0
    )
    lane_ids = await store.ensure_lanes(stream_id, [canonical_json(None, what="lane")])
    events = [
        EventToRecord(
            stream_id=stream_id,
            lane_id=next(iter(lane_ids.values())),
            identity=name,
            raw_json=json.dumps(name),
            payload_json=json.dumps(name),
            snapshot=["s"],
        )
        for name in names
    ]
    async with store.engine.begin() as conn:
        await store.record_events(conn, events)
        await store.resolve(
            conn, [ResolutionRow(stream_id, e.event_id, "s", "acked", None) for e in events]
        )


async def held_since(store: OutboxStore) -> Any:
    async with store.engine.connect() as conn:
        return await conn.scalar(sa.text("SELECT held_since FROM outbox_lane"))


async def stored(store: OutboxStore) -> list[str]:
    async with store.engine.connect() as conn:
        rows = await conn.execute(sa.text("SELECT identity FROM outbox_event ORDER BY position"))
        return [r[0] for r in rows]


async def prune_all(store: OutboxStore) -> None:
    while (await store.prune(0.0))[1]:
        pass


async def test_the_hold_is_recorded_shown_and_cleared_with_the_cursor_moves(
    store: OutboxStore,
) -> None:
    producer = HoldingProducer()
    committer = LaneCommitter(store, producers={KEY: producer})
    await record(store, ["e1", "e2", "e3"])
    producer.held = "e2"
    assert await committer.run_once() == 3
    (lane,) = await store.lane_status()
    assert lane.held_identity == "e2" and lane.held_seconds is not None
    since = await held_since(store)

    # Held at the same event after the next advance: the hold keeps its start.
    await record(store, ["e4"])
    assert await committer.run_once() == 1
    assert await held_since(store) == since

    # Shown: status (table and JSON) and the metrics.
    status = await collect_status(store)
    held = [(h["stream"], h["lane"], h["at"]) for h in status["held"]]
    assert held == [(["holds", "q"], None, "e2")]
    console = Console(width=300, record=True)
    console.print(render_table(await store.lane_status(), {}))
    assert "broker held at e2 for" in console.export_text()
    metrics = CommitterMetrics()
    await metrics.refresh(store)
    labels = {"stream": readable(lane.stream), "lane": readable(lane.lane), "held": "e2"}
    assert metrics.registry.get_sample_value("outbox_lane_held_seconds", labels) is not None
    assert metrics.registry.get_sample_value("outbox_held_lanes") == 1

    # Moved to another event: a new start. Released: gone, from the metrics too.
    await record(store, ["e5"])
    producer.held = "e5"
    assert await committer.run_once() == 1
    assert await held_since(store) > since
    await record(store, ["e6"])
    producer.held = None
    assert await committer.run_once() == 1
    (lane,) = await store.lane_status()
    assert (lane.held_identity, lane.held_seconds) == (None, None)
    await metrics.refresh(store)
    assert metrics.registry.get_sample_value("outbox_lane_held_seconds", labels) is None
    assert metrics.registry.get_sample_value("outbox_held_lanes") == 0


async def test_prune_keeps_a_held_lane_from_the_held_event_on(store: OutboxStore) -> None:
    producer = HoldingProducer()
    committer = LaneCommitter(store, producers={KEY: producer})
    await record(store, ["e1", "e2", "e3", "e4"])
    producer.held = "e3"
    assert await committer.run_once() == 4
    await prune_all(store)
    assert await stored(store) == ["e3", "e4"]

    # Held at an event no longer stored (pruned before holds were recorded): keep all.
    await record(store, ["e5"])
    producer.held = "e0"
    assert await committer.run_once() == 1
    await prune_all(store)
    assert await stored(store) == ["e3", "e4", "e5"]

    producer.held = None
    await record(store, ["e6"])
    assert await committer.run_once() == 1
    await prune_all(store)
    assert await stored(store) == []


async def test_a_describe_hold_that_is_not_text_stalls_the_lane_with_one_line(
    store: OutboxStore,
) -> None:
    producer = HoldingProducer()
    producer.held = 3
    committer = LaneCommitter(store, producers={KEY: producer})
    await record(store, ["e1"])
    assert await committer.run_once() == 0
    (lane,) = await store.lane_status()
    assert lane.last_error == (
        "TypeError: describe_hold returned int, expected str or None; "
        "return the held event's identity"
    )
    assert lane.held_identity is None

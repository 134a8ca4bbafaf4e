"""The writer's split of a large batch into concurrent transactions (no database needed)."""

from __future__ import annotations

from typing import Any

from outbox.store import ResolutionRow
from outbox.writer import Writer, _Item


def _resolution(event_id: int, subscriber: str) -> _Item:
    return _Item("resolution", ResolutionRow(1, event_id, subscriber, "acked", None), None)


def test_small_batches_stay_whole() -> None:
    writer = Writer(Any, parallel=2, min_split=3)  # type: ignore[arg-type]
    batch = [_resolution(e, "a") for e in range(5)]
    assert writer._partition(batch) == [list(range(5))]


def test_split_by_contiguous_events_keeps_each_event_together_in_order() -> None:
    writer = Writer(Any, parallel=2, min_split=2)  # type: ignore[arg-type]
    batch = [
        _Item("events", [], None),
        *(_resolution(e, "a") for e in (1, 2, 3, 4)),
        _Item("barrier", None, None),
        *(_resolution(e, "b") for e in (4, 3, 2, 1)),
        _resolution(4, "b"),  # a second contender for (4, "b"): same group, after the first
    ]
    parts = writer._partition(batch)
    assert len(parts) == 2
    assert sorted(i for part in parts for i in part) == list(range(len(batch)))
    for part in parts:
        assert part == sorted(part)
    events_in = [
        {batch[i].value.event_id for i in part if batch[i].kind == "resolution"} for part in parts
    ]
    assert events_in[0].isdisjoint(events_in[1])
    assert max(events_in[0]) < min(events_in[1])
    assert 0 in parts[0] and 5 in parts[0]  # what is not a resolution goes to the first group

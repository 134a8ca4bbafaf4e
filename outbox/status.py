"""``outbox status``: every stream and lane at a glance, or as JSON for scripts."""

from __future__ import annotations

import dataclasses
import json
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from outbox.store import LaneStatus, OutboxStore

__all__ = ("collect_status", "print_status")


async def collect_status(store: OutboxStore) -> dict[str, object]:
    """Lanes and undispatched records, as plain data."""
    lanes = await store.lane_status()
    return {
        "lanes": [
            {
                **dataclasses.asdict(lane),
                "stalled": lane.stalled,
                "state": _state(lane),
                "advanced_by": _advanced_by(lane),
            }
            for lane in lanes
        ],
        "held": [
            f"{lane.stream} {lane.lane} at {lane.held_identity}"
            for lane in lanes
            if lane.held_identity is not None
        ],
        "undispatched": await store.undispatched(),
        "stalled": [f"{lane.stream} {lane.lane}" for lane in lanes if lane.stalled],
    }


def _state(lane: LaneStatus) -> str:
    """``ok``, or ``stalled: `` and why."""
    reasons = lane.stall_reasons()
    return "stalled: " + "; ".join(reasons) if reasons else "ok"


def _advanced_by(lane: LaneStatus) -> str:
    """Who advances the lane: any committer, or only the triggerer reading the stream."""
    if lane.advance_in == "consumer":
        return f"its reader only ({lane.reader or 'none running'})"
    return "any committer"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _table(lanes: list[LaneStatus], undispatched: dict[str, int]) -> Table:
    table = Table(title="outbox lanes", header_style="bold")
    for column in (
        "stream",
        "lane",
        "cursor",
        "recorded",
        "resolved, unadvanced",
        "unresolved",
        "oldest pending",
        "undispatched",
        "state",
    ):
        table.add_column(
            column, justify="right" if column not in ("stream", "lane", "state") else "left"
        )
    shown: set[str] = set()
    for lane in lanes:
        state = f"[red]{escape(_state(lane))}[/red]" if lane.stalled else "ok"
        if lane.held_identity is not None:
            held = f"[yellow]broker held at {lane.held_identity} for {_age(lane.held_seconds)}"
            state = f"{held}[/yellow]" if state == "ok" else f"{held}[/yellow]; {state}"
        if lane.advance_in == "consumer":
            state += f"; advanced by its reader ({escape(lane.reader or 'none running')})"
        table.add_row(
            lane.stream,
            lane.lane,
            str(lane.advanced_through),
            str(lane.last_position),
            str(lane.resolved_unadvanced),
            str(lane.unresolved),
            _age(lane.oldest_pending_seconds),
            str(undispatched.get(lane.stream, 0)) if lane.stream not in shown else "",
            state,
        )
        shown.add(lane.stream)
    return table


async def print_status(url: str, *, as_json: bool = False) -> None:
    async with OutboxStore.from_url(url) as store:
        await store.check_schema()
        if as_json:
            print(json.dumps(await collect_status(store), indent=2))
            return
        lanes = await store.lane_status()
        undispatched = await store.undispatched()
    # Piped output (scripts, logs) gets the whole table rather than an 80-column squeeze.
    console = Console(width=None if sys.stdout.isatty() else 200)
    if not lanes:
        console.print("no streams recorded yet")
        return
    console.print(_table(lanes, undispatched))

"""``outbox status``: every stream and lane at a glance, or as JSON for scripts.

The table fits the terminal, or 100 columns when the output is not a terminal (a file, a pipe,
a log). The JSON holds stream keys and lanes as JSON values, not as JSON text.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import TYPE_CHECKING, Any, Final

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from outbox.display import lane_labels, parsed, readable_labels
from outbox.store import LaneStatus, OutboxStore

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ("PIPED_WIDTH", "collect_status", "print_status", "render_table")

PIPED_WIDTH: Final = 100


async def collect_status(store: OutboxStore) -> dict[str, Any]:
    """Lanes, holds, stalls and undispatched records, as plain data (stream keys and lanes as
    the JSON values they are stored as)."""
    lanes = await store.lane_status()
    undispatched = await store.undispatched()
    return {
        "lanes": [
            {
                **dataclasses.asdict(lane),
                "stream": parsed(lane.stream),
                "lane": parsed(lane.lane),
                "stalled": lane.stalled,
                "state": _state(lane),
                "advanced_by": _advanced_by(lane),
            }
            for lane in lanes
        ],
        "held": [
            {
                "stream": parsed(lane.stream),
                "lane": parsed(lane.lane),
                "at": lane.held_identity,
                "seconds": lane.held_seconds,
            }
            for lane in lanes
            if lane.held_identity is not None
        ],
        "stalled": [
            {
                "stream": parsed(lane.stream),
                "lane": parsed(lane.lane),
                "reasons": lane.stall_reasons(),
            }
            for lane in lanes
            if lane.stalled
        ],
        "undispatched": [
            {"stream": parsed(key), "records": count} for key, count in undispatched.items()
        ],
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


_COLUMNS: Final = (
    ("stream", "left"),
    ("lane", "left"),
    ("cursor", "right"),
    ("last", "right"),
    ("ready", "right"),
    ("owed", "right"),
    ("oldest", "right"),
    ("records", "right"),
    ("state", "left"),
)
_CAPTION: Final = (
    "cursor: advanced through; last: last position recorded; ready: resolved, not advanced; "
    "owed: unresolved; oldest: age of the oldest owed; records: undispatched, per stream"
)


def render_table(lanes: list[LaneStatus], undispatched: Mapping[str, int]) -> Table:
    """The lanes as a table; stream keys and lanes readable (``queue/orders``)."""
    table = Table(
        title="outbox lanes",
        caption=_CAPTION,
        header_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for name, justify in _COLUMNS:
        table.add_column(
            name,
            justify=justify,  # type: ignore[arg-type]
            overflow="fold",
            no_wrap=justify == "right",
        )
    streams = readable_labels(lane.stream for lane in lanes)
    lane_names = lane_labels((lane.stream, lane.lane) for lane in lanes)
    shown: set[str] = set()
    for lane in lanes:
        state = f"[red]{escape(_state(lane))}[/red]" if lane.stalled else "ok"
        if lane.held_identity is not None:
            held = escape(f"broker held at {lane.held_identity} for {_age(lane.held_seconds)}")
            held = f"[yellow]{held}[/yellow]"
            state = held if state == "ok" else f"{held}; {state}"
        if lane.advance_in == "consumer":
            state += f"; advanced by its reader ({escape(lane.reader or 'none running')})"
        table.add_row(
            escape(streams[lane.stream]) if lane.stream not in shown else "",
            escape(lane_names[lane.stream, lane.lane]),
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


async def print_status(url: str, *, as_json: bool = False, **engine_options: Any) -> None:
    async with OutboxStore.from_url(url, **engine_options) as store:
        await store.check_schema()
        if as_json:
            print(json.dumps(await collect_status(store), indent=2))
            return
        lanes = await store.lane_status()
        undispatched = await store.undispatched()
    console = Console(width=None if sys.stdout.isatty() else PIPED_WIDTH)
    if not lanes:
        console.print("no streams recorded yet")
        return
    console.print(render_table(lanes, undispatched))

"""Offsets of a partition: ``OffsetRanges``, what ``advance`` knows of its commit (``Commits``)
and what its reader handed out and must hand out again (``Reading``)."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

__all__ = ("Commits", "OffsetRanges", "Reading")


class OffsetRanges:
    """A set of offsets kept as sorted, disjoint, half-open ranges ``[start, end)``, merged as
    they are added: a million consecutive offsets take one range."""

    __slots__ = ("_ends", "_starts")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __len__(self) -> int:
        """How many ranges (not offsets)."""
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __contains__(self, offset: object) -> bool:
        if not isinstance(offset, int):
            return False
        i = bisect.bisect_right(self._starts, offset) - 1
        return i >= 0 and offset < self._ends[i]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._starts, self._ends, strict=True))

    def __repr__(self) -> str:
        return f"OffsetRanges({list(self)!r})"

    def add(self, start: int, end: int) -> None:
        """Add the offsets ``start <= o < end``."""
        if start >= end:
            return
        starts, ends = self._starts, self._ends
        if not starts or start > ends[-1]:  # the usual case: past everything held
            starts.append(start)
            ends.append(end)
            return
        first = bisect.bisect_left(ends, start)  # ranges that end at or after start touch it
        last = bisect.bisect_right(starts, end)  # ... and those that start at or before end
        if first < last:
            start = min(start, starts[first])
            end = max(end, ends[last - 1])
        starts[first:last] = [start]
        ends[first:last] = [end]

    def discard(self, start: int, end: int) -> None:
        """Remove the offsets ``start <= o < end``."""
        if start >= end or not self._starts:
            return
        starts, ends = self._starts, self._ends
        first = bisect.bisect_right(ends, start)  # ranges that end after start
        last = bisect.bisect_left(starts, end)  # ... and start before end
        if first >= last:
            return
        kept_starts: list[int] = []
        kept_ends: list[int] = []
        if starts[first] < start:
            kept_starts.append(starts[first])
            kept_ends.append(start)
        if ends[last - 1] > end:
            kept_starts.append(end)
            kept_ends.append(ends[last - 1])
        starts[first:last] = kept_starts
        ends[first:last] = kept_ends

    def discard_below(self, offset: int) -> None:
        """Remove every offset below ``offset``."""
        if self._starts and self._starts[0] < offset:
            self.discard(self._starts[0], offset)

    def first(self) -> int | None:
        return self._starts[0] if self._starts else None

    def end_of_run(self, offset: int) -> int:
        """The first offset at or after ``offset`` that is not in the set."""
        i = bisect.bisect_right(self._starts, offset) - 1
        return self._ends[i] if i >= 0 and offset < self._ends[i] else offset


@dataclass(slots=True)
class Commits:
    """What ``advance`` knows of one partition: the handled offsets above its commit, the held
    ones (with how often each was held in this run), and where the commit is held."""

    handled: OffsetRanges = field(default_factory=OffsetRanges)
    held: dict[int, int] = field(default_factory=dict)
    held_at: int | None = None
    remembered: int | None = None  # with contiguous_offsets=False: the lowest held offset
    log_start_checked_at: int | None = None  # the committed offset last compared to it

    def note(self, offsets: Sequence[int], routes: Sequence[str]) -> list[int]:
        """Record a batch: handled offsets join their ranges (a run of consecutive ones at a
        time), held ones are counted. Returns the batch's held offsets."""
        held_now: list[int] = []
        held = self.held
        run_start = run_end = -1
        for offset, route in zip(offsets, routes, strict=True):
            if route == "hold":
                held[offset] = held.get(offset, 0) + 1
                held_now.append(offset)
                continue
            if held:
                held.pop(offset, None)
            if offset == run_end:
                run_end += 1
                continue
            self.handled.add(run_start, run_end)
            run_start, run_end = offset, offset + 1
        self.handled.add(run_start, run_end)
        return held_now

    def reach(self, base: int) -> int:
        """The commit target from ``base``: past every handled offset that follows it without a
        gap. Forgets what lies below the target and notes where the commit is held (at the
        target, when later offsets were handled or held)."""
        target = self.handled.end_of_run(base)
        self.handled.discard_below(target)
        if self.held:
            for offset in [o for o in self.held if o < target]:
                del self.held[offset]
        self.held_at = target if self.handled or self.held else None
        return target


@dataclass(slots=True)
class Reading:
    """What the reader of one partition handed out, and what it must hand out again."""

    start: int  # the first offset this reader read from
    read_to: int  # one past the highest offset handed out
    fetch_at: int  # where the consumer fetches next, as far as this reader positioned it
    again: OffsetRanges = field(default_factory=OffsetRanges)  # below read_to, to hand out again
    due: dict[int, float] = field(default_factory=dict)  # held offsets, when to hand them out
    next_due: float = math.inf  # the earliest of those times
    advanced_here: bool = False  # this producer instance advances the partition too
    read_again_from: int | None = None  # where a reported hold last had it read again ...
    read_again_at: float = -math.inf  # ... and when

    def take(self, offset: int) -> bool:
        """Whether the message at ``offset`` is handed out: it is new, or to be read again."""
        if offset < self.fetch_at:
            return False  # fetched before a seek (aiokafka drops those itself)
        if self.again:
            self.again.discard(self.fetch_at, offset)  # skipped by the log: not there any more
        self.fetch_at = offset + 1
        if offset >= self.read_to:
            self.read_to = offset + 1
            return True
        if offset in self.again:
            self.again.discard(offset, offset + 1)
            return True
        return False

    def next_fetch(self) -> int:
        """Where to fetch next: the first offset to hand out again, else where reading stopped."""
        first = self.again.first()
        return self.read_to if first is None else first

"""What the demo has seen so far (``Progress``), and the live table drawn from it with rich."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich.console import Group
from rich.table import Table
from rich.text import Text

from outbox.demo.trigger import SUBSCRIBERS, fires, is_malformed


@dataclass
class Progress:
    """What the live table shows."""

    messages: int
    partitions: int
    produced: dict[int, int] = field(default_factory=dict)
    committed: dict[int, int] = field(default_factory=dict)
    stored: dict[str, int] = field(default_factory=dict)
    dead: list[int] = field(default_factory=list)
    dead_mislabelled: int = 0
    restarts: int = 0
    phase: str = "starting"
    began: float = field(default_factory=time.monotonic)
    expected: dict[str, int] = field(default_factory=dict)
    malformed: int = 0

    def __post_init__(self) -> None:
        for name in SUBSCRIBERS:
            self.expected[name] = sum(fires(name, n) for n in range(self.messages))
        self.malformed = sum(is_malformed(n) for n in range(self.messages))


def _bar(done: int, total: int, width: int = 20) -> Text:
    share = 0.0 if total == 0 else min(done / total, 1.0)
    filled = round(share * width)
    return Text.assemble(
        ("#" * filled, "green" if share >= 1 else "cyan"), ("." * (width - filled), "dim")
    )


def render(progress: Progress) -> Group:
    elapsed = time.monotonic() - progress.began
    head = Text.assemble(
        ("outbox demo ", "bold"),
        f"{progress.messages:,} messages on {progress.partitions} partitions | ",
        (progress.phase, "yellow"),
        f" | triggerer restarts: {progress.restarts} | {elapsed:.1f}s",
    )
    subscribers = Table(header_style="bold", expand=False)
    for column in ("subscriber", "trigger events stored", "expected", ""):
        subscribers.add_column(column, justify="left" if column == "subscriber" else "right")
    for name in SUBSCRIBERS:
        stored, expected = progress.stored.get(name, 0), progress.expected[name]
        subscribers.add_row(name, f"{stored:,}", f"{expected:,}", _bar(stored, expected))
    subscribers.add_row(
        "dead-lettered",
        f"{len(progress.dead):,}",
        f"{progress.malformed:,}",
        _bar(len(progress.dead), progress.malformed),
    )
    partitions = Table(header_style="bold", expand=False)
    for column in ("partition", "committed offset", "produced", ""):
        partitions.add_column(column, justify="right")
    for p in range(progress.partitions):
        committed, produced = progress.committed.get(p, 0), progress.produced.get(p, 0)
        partitions.add_row(str(p), f"{committed:,}", f"{produced:,}", _bar(committed, produced))
    return Group(head, subscribers, partitions)

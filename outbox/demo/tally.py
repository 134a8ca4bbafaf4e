"""Counting the outbox tables: stored events while the demo runs, a stalled lane, and the final
tally with its checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import sqlalchemy as sa
from rich.table import Table
from rich.text import Text

from outbox.demo.trigger import SUBSCRIBERS, fires, is_malformed

if TYPE_CHECKING:
    from outbox.demo.progress import Progress
    from outbox.store import OutboxStore


async def count_stored(store: OutboxStore, progress: Progress) -> None:
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            sa.text("SELECT subscriber, count(*) FROM outbox_record GROUP BY subscriber")
        )
        progress.stored = {str(name): int(count) for name, count in rows}


async def lane_error(store: OutboxStore) -> str | None:
    async with store.engine.connect() as conn:
        error = await conn.scalar(
            sa.text("SELECT last_error FROM outbox_lane WHERE last_error IS NOT NULL LIMIT 1")
        )
    return None if error is None else f"a lane is stalled: {error}"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


async def tally(store: OutboxStore, progress: Progress) -> tuple[list[Table], list[Check]]:
    """The final counts, straight from the outbox tables and the broker."""
    async with store.engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.text(
                    "SELECT subscriber, (payload->>'n')::int, count(*) FROM outbox_record "
                    "GROUP BY 1, 2"
                )
            )
        ).all()
        failed = int(
            await conn.scalar(sa.text("SELECT count(*) FROM outbox_unacked WHERE state = 'failed'"))
            or 0
        )
    checks: list[Check] = []
    stored_table = Table(
        title="trigger events in the outbox", header_style="bold", title_style="bold"
    )
    for column in ("subscriber", "stored", "expected", "missing", "extra", "duplicates"):
        stored_table.add_column(column, justify="left" if column == "subscriber" else "right")
    stored_table.add_column("")
    for name in SUBSCRIBERS:
        counts = {int(n): int(c) for sub, n, c in rows if sub == name and n is not None}
        expected = {n for n in range(progress.messages) if fires(name, n)}
        stored = sum(c for sub, _, c in rows if sub == name)
        missing = len(expected - set(counts))
        unexpected = len(set(counts) - expected) + sum(
            1 for sub, n, _ in rows if sub == name and n is None
        )
        duplicates = sum(c - 1 for c in counts.values() if c > 1)
        ok = missing == unexpected == duplicates == 0
        checks.append(
            Check(
                f"subscriber {name}",
                ok,
                f"{stored} stored, {len(expected)} expected, {missing} missing, "
                f"{unexpected} unexpected, {duplicates} duplicates",
            )
        )
        stored_table.add_row(
            name,
            f"{stored:,}",
            f"{len(expected):,}",
            str(missing),
            str(unexpected),
            str(duplicates),
            _verdict(ok),
        )
    dead = progress.dead
    malformed = {n for n in range(progress.messages) if is_malformed(n)}
    dead_ok = set(dead) == malformed and progress.dead_mislabelled == 0
    checks.append(
        Check(
            "dead-letter topic",
            dead_ok,
            f"{len(malformed - set(dead))} rejected messages missing, "
            f"{len(set(dead) - malformed)} accepted ones there, "
            f"{progress.dead_mislabelled} with wrong x-outbox-* headers",
        )
    )
    stored_table.add_row(
        "dead letters",
        f"{len(dead):,}",
        f"{len(malformed):,}",
        str(len(malformed - set(dead))),
        str(len(set(dead) - malformed)),
        str(len(dead) - len(set(dead))),
        _verdict(dead_ok),
    )
    checks.append(Check("deliveries failed", failed == 0, f"{failed} failed"))
    stored_table.add_row("failed deliveries", str(failed), "0", "", "", "", _verdict(failed == 0))
    offsets_table = Table(
        title="committed offsets (Kafka)", header_style="bold", title_style="bold"
    )
    for column in ("partition", "produced", "committed"):
        offsets_table.add_column(column, justify="right")
    offsets_table.add_column("")
    for p in range(progress.partitions):
        committed, produced = progress.committed.get(p, 0), progress.produced.get(p, 0)
        ok = committed == produced
        checks.append(Check(f"partition {p}", ok, f"committed {committed} of {produced}"))
        offsets_table.add_row(str(p), f"{produced:,}", f"{committed:,}", _verdict(ok))
    return [stored_table, offsets_table], checks


def _verdict(ok: bool) -> Text:
    return Text("ok", "bold green") if ok else Text("FAIL", "bold red")

"""``outbox status`` and the committer's metrics refresh with a long retained history.

Two databases on their own servers: one holding only the live state, the other the same live
state behind ``--retained`` old events (advanced, each with a dispatched record, as retention
keeps them until ``outbox prune``). The live state: one stream of 4 lanes, each with 100 events
after its cursor (half resolved, half pending) and 50 undispatched records. On each, status
(``collect_status``: every lane's cursor, backlog, oldest pending event, and the undispatched
records per stream; the metrics refresh runs the same statements) is timed ``--repeat`` times
after a warm-up; printed: the median on each and the ratio.

    python bench/status.py              # 2,000,000 retained events (target: under 50 ms)
    python bench/status.py --tiny       # CI: 20,000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pgsupport import bench_database

from outbox import OutboxStore
from outbox.status import collect_status

LANES = 4
BACKLOG = 100  # events after each lane's cursor
UNDISPATCHED = 50
TARGET_MS = 50.0

_STREAM = """
INSERT INTO outbox_stream (key, trigger_class, trigger_kwargs, ack_timeout)
VALUES ('["bench", "status"]', 'bench.Status', '{}', 300) RETURNING id
"""

_LANES = """
INSERT INTO outbox_lane (stream_id, lane_key, next_position, advanced_through)
SELECT :stream_id, g::text, CAST(:history AS bigint) + :backlog + 1, :history
FROM generate_series(1, :lanes) AS g
"""

# Advanced history: positions 1..history of each lane, a week old, each event acked by "a"
# with one dispatched record.
_HISTORY = """
WITH e AS (
    INSERT INTO outbox_event (stream_id, lane_id, position, identity, raw, payload, snapshot,
                              resolved, pending, acked, created_at, resolved_at)
    SELECT l.stream_id, l.id, p, l.id || ':' || p, '{"n": 1}', '"receipt"', '["a"]', '{a}',
           0, 1, now() - interval '7 days', now() - interval '7 days'
    FROM outbox_lane AS l, generate_series(CAST(:first AS bigint), :last) AS p
    RETURNING id, stream_id
)
INSERT INTO outbox_record (stream_id, event_id, subscriber, ordinal, payload, created_at,
                           dispatched_at)
SELECT e.stream_id, e.id, 'a', 0, '{"n": 1}', now() - interval '7 days',
       now() - interval '6 days'
FROM e
"""

# The live backlog after each cursor: the first half resolved, the rest pending; some
# undispatched records.
_BACKLOG = """
WITH e AS (
    INSERT INTO outbox_event (stream_id, lane_id, position, identity, raw, payload, snapshot,
                              resolved, pending, acked, resolved_at)
    SELECT l.stream_id, l.id, l.advanced_through + p, l.id || ':' || (l.advanced_through + p),
           '{"n": 1}', '"receipt"', '["a"]',
           CASE WHEN p <= :backlog / 2 THEN '{a}'::text[] ELSE '{}' END,
           CASE WHEN p <= :backlog / 2 THEN 0 ELSE 1 END,
           CASE WHEN p <= :backlog / 2 THEN 1 ELSE 0 END,
           CASE WHEN p <= :backlog / 2 THEN now() END
    FROM outbox_lane AS l, generate_series(1, CAST(:backlog AS int)) AS p
    RETURNING id, stream_id
)
INSERT INTO outbox_record (stream_id, event_id, subscriber, ordinal, payload)
SELECT stream_id, id, 'a', 0, '{"n": 1}' FROM e ORDER BY id LIMIT :undispatched
"""


async def fill(url: str, retained: int) -> None:
    per_lane = retained // LANES
    async with OutboxStore.from_url(url) as store:
        async with store.engine.begin() as conn:
            stream_id = await conn.scalar(sa.text(_STREAM))
            await conn.execute(
                sa.text(_LANES),
                {"stream_id": stream_id, "history": per_lane, "backlog": BACKLOG, "lanes": LANES},
            )
        chunk = 100_000
        for first in range(1, per_lane + 1, chunk):
            async with store.engine.begin() as conn:
                await conn.execute(
                    sa.text(_HISTORY),
                    {"first": first, "last": min(per_lane, first + chunk - 1)},
                )
        async with store.engine.begin() as conn:
            await conn.execute(
                sa.text(_BACKLOG), {"backlog": BACKLOG, "undispatched": UNDISPATCHED}
            )
        async with store.engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            # What autovacuum does to a history this old: statistics and the visibility map.
            await conn.execute(sa.text("VACUUM ANALYZE"))


async def time_status(url: str, repeat: int) -> tuple[float, dict[str, object]]:
    """Median milliseconds of ``collect_status`` (after a warm-up), and its last result."""
    async with OutboxStore.from_url(url) as store:
        status = await collect_status(store)
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            status = await collect_status(store)
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--retained", type=int, default=2_000_000, help="advanced events kept from history"
    )
    parser.add_argument("--repeat", type=int, default=21, help="timed status reads on each")
    parser.add_argument("--tiny", action="store_true", help="a quick run for CI")
    args = parser.parse_args(argv)
    if args.tiny:
        args.retained, args.repeat = 20_000, 5
    with bench_database(None) as empty, bench_database(None) as full:
        asyncio.run(fill(empty, 0))
        began = time.perf_counter()
        asyncio.run(fill(full, args.retained))
        print(
            f"filled {args.retained:,} retained events (and their dispatched records) "
            f"in {time.perf_counter() - began:.1f} s"
        )
        empty_ms, empty_status = asyncio.run(time_status(empty, args.repeat))
        full_ms, full_status = asyncio.run(time_status(full, args.repeat))
    for status in (empty_status, full_status):
        lanes = status["lanes"]
        assert isinstance(lanes, list) and len(lanes) == LANES
        assert all(lane["unresolved"] == BACKLOG // 2 for lane in lanes), lanes
        expected = [{"stream": ["bench", "status"], "records": UNDISPATCHED}]
        assert status["undispatched"] == expected, status
    verdict = "met" if full_ms < TARGET_MS else "MISSED"
    print(
        f"outbox status, median of {args.repeat}: {full_ms:.1f} ms with {args.retained:,} "
        f"retained events, {empty_ms:.1f} ms on an empty database = {full_ms / empty_ms:.2f} x "
        f"(target: under {TARGET_MS:g} ms, {verdict})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

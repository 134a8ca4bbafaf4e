"""The reader's claim, which holds back records after an event their subscriber still owes.

``OutboxReader`` hands a subscriber's records out in event order even though a large batch of
resolutions commits as concurrent transactions: a claim leaves out the records of an event after
one their subscriber has not resolved yet. This measures what that costs against the plain claim
it replaced (the oldest undispatched records in event order, nothing held back), both claiming
and marking a stream's records in batches of ``--batch`` until none are left, side by side on
the same data, alternating, ``--rounds`` times each; printed: records per second of each, and
the ratio of the medians.

Two states of one stream of 4 lanes, ``--events`` events, each resolved by four subscribers with
one record each:

* ``caught up``: the committer has advanced every lane (no backlog): the usual state.
* ``one stuck``: a fifth subscriber resolves nothing, so every event is still pending and the
  lane cursors have not moved: each claim reads the backlog up to the records it claims.

    python bench/reader_claim.py            # 100,000 events, 400,000 records
    python bench/reader_claim.py --tiny     # CI: 2,000 events
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

import outbox.store.claims as claims_module
from outbox import OutboxReader, OutboxStore

LANES = 4
SUBSCRIBERS = ("s1", "s2", "s3", "s4")

_STREAM = """
INSERT INTO outbox_stream (key, trigger_class, trigger_kwargs, ack_timeout)
VALUES (:key, 'bench.Reader', '{}', 300) RETURNING id
"""

_LANES = """
INSERT INTO outbox_lane (stream_id, lane_key, next_position, advanced_through)
SELECT :stream_id, g::text, CAST(:per_lane AS bigint) + 1,
       CASE WHEN :stuck THEN 0 ELSE :per_lane END
FROM generate_series(1, :lanes) AS g
"""

# Events in id order round-robin over the lanes (as a producer's partitions interleave), each
# resolved by s1..s4 with one record each; with ``stuck``, owed to s5 too, which resolves none.
_EVENTS = """
WITH e AS (
    INSERT INTO outbox_event (stream_id, lane_id, position, identity, raw, payload, snapshot,
                              resolved, pending, acked, resolved_at)
    SELECT l.stream_id, l.id, (n - 1) / :lanes + 1, n::text, '{"n": 1}', '"p"',
           CASE WHEN :stuck
                THEN '{"s1": null, "s2": null, "s3": null, "s4": null, "s5": null}'::jsonb
                ELSE '{"s1": null, "s2": null, "s3": null, "s4": null}'::jsonb END,
           '{s1,s2,s3,s4}', CASE WHEN :stuck THEN 1 ELSE 0 END, 4,
           CASE WHEN :stuck THEN NULL ELSE now() END
    FROM generate_series(CAST(:first AS bigint), :last) AS n
    JOIN outbox_lane AS l ON l.stream_id = :stream_id AND l.lane_key = ((n - 1) % :lanes + 1)::text
    ORDER BY n
    RETURNING id, stream_id
)
INSERT INTO outbox_record (stream_id, event_id, subscriber, ordinal, payload)
SELECT e.stream_id, e.id, s, 0, '{"n": 1}'
FROM e CROSS JOIN unnest(CAST(:subscribers AS text[])) AS s
ORDER BY e.id, s
"""

# The claim before records were held back: the oldest undispatched records in event order.
_PLAIN_CLAIM = sa.text(
    """
    SELECT id, stream_id, event_id, subscriber, ordinal, payload
    FROM outbox_record
    WHERE stream_id = :stream_id AND dispatched_at IS NULL
      AND (CAST(:subscribers AS text[]) IS NULL
           OR subscriber = ANY(CAST(:subscribers AS text[])))
    ORDER BY event_id NULLS FIRST, id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
    """
)
_HOLDING_BACK = claims_module._CLAIM_RECORDS


async def fill(store: OutboxStore, key: str, events: int, *, stuck: bool) -> int:
    async with store.engine.begin() as conn:
        stream_id = int(await conn.scalar(sa.text(_STREAM), {"key": key}))
        await conn.execute(
            sa.text(_LANES),
            {"stream_id": stream_id, "per_lane": events // LANES, "lanes": LANES, "stuck": stuck},
        )
    for first in range(1, events + 1, 50_000):
        async with store.engine.begin() as conn:
            await conn.execute(
                sa.text(_EVENTS),
                {
                    "stream_id": stream_id,
                    "first": first,
                    "last": min(events, first + 49_999),
                    "lanes": LANES,
                    "stuck": stuck,
                    "subscribers": list(SUBSCRIBERS),
                },
            )
    return stream_id


async def reset(store: OutboxStore) -> None:
    async with store.engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(sa.text("UPDATE outbox_record SET dispatched_at = NULL"))
        await conn.execute(sa.text("VACUUM ANALYZE outbox_record"))
        await conn.execute(sa.text("VACUUM ANALYZE outbox_event"))


async def drain(store: OutboxStore, stream_id: int, batch: int, *, plain: bool) -> float:
    """Records per second claiming and marking all of the stream's records (a new reader)."""
    # The same path either way, but for the statement that claims.
    claims_module._CLAIM_RECORDS = _PLAIN_CLAIM if plain else _HOLDING_BACK
    reader = OutboxReader(store, batch_size=batch)
    claimed = 0
    started = time.perf_counter()
    while True:
        async with store.engine.begin() as conn:
            records = await reader.claim(conn)
            if not records:
                break
            await reader.mark_dispatched(conn, records)
            claimed += len(records)
    elapsed = time.perf_counter() - started
    assert claimed == len(SUBSCRIBERS) * _events_of[stream_id], (claimed, stream_id)
    return claimed / elapsed


_events_of: dict[int, int] = {}


async def run(url: str, events: int, batch: int, rounds: int) -> None:
    async with OutboxStore.from_url(url) as store:
        for label, stuck in (("caught up", False), ("one stuck", True)):
            async with store.engine.begin() as conn:
                await conn.execute(sa.text("TRUNCATE outbox_record, outbox_event, outbox_lane"))
                await conn.execute(sa.text("DELETE FROM outbox_stream"))
            stream_id = await fill(store, f'["bench", "{label}"]', events, stuck=stuck)
            _events_of[stream_id] = events
            held: list[float] = []
            plain: list[float] = []
            for _ in range(rounds):
                for is_plain, into in ((False, held), (True, plain)):
                    await reset(store)
                    into.append(await drain(store, stream_id, batch, plain=is_plain))
            held_rate, plain_rate = statistics.median(held), statistics.median(plain)
            print(
                f"{label:>9}: holding back {held_rate:>9,.0f} records/s, plain claim "
                f"{plain_rate:>9,.0f} records/s = {held_rate / plain_rate:.2f} x "
                f"({events:,} events, {len(SUBSCRIBERS) * events:,} records, batches of {batch})"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500, help="records per claim")
    parser.add_argument("--rounds", type=int, default=3, help="timed drains of each claim")
    parser.add_argument("--url", help="a migrated database to use (default: a throwaway one)")
    parser.add_argument("--tiny", action="store_true", help="a quick run for CI")
    args = parser.parse_args(argv)
    if args.tiny:
        args.events, args.rounds = 2_000, 1
    with bench_database(args.url) as url:
        asyncio.run(run(url, args.events, args.batch, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())

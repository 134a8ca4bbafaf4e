"""The `outbox committer` process: SIGKILL between advance and cursor update, graceful stop,
bad configuration."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa

from outbox.core import canonical_json
from outbox.store import EventToRecord, ResolutionRow
from tests.committer_crash_trigger import LOG_TABLE, LoggingTrigger
from tests.polling import eventually

if TYPE_CHECKING:
    from collections.abc import Iterator

    from outbox import OutboxStore

ROOT = Path(__file__).resolve().parent.parent
LANES = ("a", "b", "c")


def start_committer(url: str, *extra: str, ready: bool = False) -> subprocess.Popen[bytes]:
    """Start `outbox committer`; with ``ready``, return once it logged that it started."""
    command = [sys.executable, "-m", "outbox", "committer", "--database-url", url]
    command += ["--allow-module", "tests.committer_crash_trigger", *extra]
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE if ready else subprocess.DEVNULL,
    )
    if ready:
        assert proc.stderr is not None
        for line in proc.stderr:  # ends at EOF if the process dies
            if b"committer started" in line:
                break
        else:
            raise AssertionError("the committer exited before it started")
    return proc


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(30)
    if proc.stderr is not None:
        proc.stderr.close()
    return code


async def setup_stream(store: OutboxStore, url: str, per_lane: int, **kwargs: float) -> int:
    async with store.engine.begin() as conn:
        await conn.execute(sa.text(LOG_TABLE))
    trigger = LoggingTrigger(dsn=url, **kwargs)
    class_path, trigger_kwargs = trigger.serialize()
    stream_id = await store.ensure_stream(
        canonical_json(trigger.shared_stream_key(), what="key"),
        class_path,
        json.dumps(trigger_kwargs),
        300.0,
    )
    lane_ids = await store.ensure_lanes(stream_id, [canonical_json(x, what="lane") for x in LANES])
    events = [
        EventToRecord(
            stream_id,
            lane_ids[canonical_json(lane, what="lane")],
            None,
            "{}",
            json.dumps({"lane": lane, "position": position}),
            ["s1"],
        )
        for position in range(1, per_lane + 1)
        for lane in LANES
    ]
    async with store.engine.begin() as conn:
        await store.record_events(conn, events)
    return stream_id


async def resolve_all(store: OutboxStore, stream_id: int, chunk: int, pause: float) -> None:
    async with store.engine.connect() as conn:
        ids = [r[0] for r in await conn.execute(sa.text("SELECT id FROM outbox_event ORDER BY id"))]
    for start in range(0, len(ids), chunk):
        async with store.engine.begin() as conn:
            await store.resolve(
                conn,
                [
                    ResolutionRow(stream_id, e, "s1", "acked", None)
                    for e in ids[start : start + chunk]
                ],
            )
        await asyncio.sleep(pause)  # resolutions trickle in while the committer works


async def cursors(store: OutboxStore) -> dict[str, int]:
    async with store.engine.connect() as conn:
        rows = await conn.execute(sa.text("SELECT lane_key, advanced_through FROM outbox_lane"))
        return {json.loads(r[0]): r[1] for r in rows}


@pytest.fixture
def seed() -> Iterator[int]:
    value = int(os.environ.get("OUTBOX_CRASH_SEED", random.randrange(1 << 30)))
    print(f"crash seed: {value} (set OUTBOX_CRASH_SEED to replay)")
    yield value


async def test_sigkill_between_advance_and_cursor_update_never_skips_or_reorders(
    store: OutboxStore, database_url: str, seed: int
) -> None:
    rnd = random.Random(seed)
    per_lane = 300
    stream_id = await setup_stream(store, database_url, per_lane, dawdle=0.15)
    resolver = asyncio.create_task(resolve_all(store, stream_id, chunk=60, pause=0.05))
    kills = 0
    deadline = time.monotonic() + 120
    while kills < 12:
        proc = start_committer(
            database_url,
            *("--batch-size", "23", "--lease-seconds", "0.5", "--poll-interval", "0.05"),
            ready=True,
        )
        # Once it runs (its start-up takes longer on a busy machine), the kill lands wherever
        # its passes are; each advance dawdles 0.15 s before its cursor update.
        await asyncio.sleep(rnd.uniform(0.1, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        kills += 1
        assert time.monotonic() < deadline
    await resolver
    proc = start_committer(
        database_url,
        "--batch-size",
        "23",
        "--lease-seconds",
        "0.5",
        "--poll-interval",
        "0.05",
        ready=True,
    )
    try:

        async def at_the_end() -> bool:
            return await cursors(store) == dict.fromkeys(LANES, per_lane)

        await eventually(at_the_end, within=max(1.0, deadline - time.monotonic()), interval=0.1)
    finally:
        assert stop(proc) == 0
    async with store.engine.connect() as conn:
        log = (
            await conn.execute(
                sa.text(
                    "SELECT lane, first_pos, last_pos, outcomes FROM crash_advance_log ORDER BY id"
                )
            )
        ).all()
    repeats = 0
    for lane in LANES:
        batches = [(first, last, outcomes) for name, first, last, outcomes in log if name == lane]
        assert batches[0][0] == 1
        for (first, last, outcomes), (next_first, _, _) in itertools.pairwise(batches):
            assert last >= first and len(outcomes.split(",")) == last - first + 1
            assert set(outcomes.split(",")) == {"1/0/0"}
            # Either the next batch follows on, or the same start is advanced again because the
            # cursor update of this one did not happen: never a gap, never backwards past it.
            assert next_first in (last + 1, first), (lane, first, last, next_first)
            repeats += next_first == first
        assert batches[-1][1] == per_lane
    print(f"{kills} kills, {len(log)} advances, {repeats} advanced again after a kill")
    assert repeats >= 1  # some kills landed between an advance and its cursor update


async def test_sigterm_finishes_the_advance_in_flight_and_releases_leases(
    store: OutboxStore, database_url: str
) -> None:
    stream_id = await setup_stream(store, database_url, 5, hold=1.0)
    await resolve_all(store, stream_id, chunk=100, pause=0)
    proc = start_committer(database_url, "--lease-seconds", "30", ready=True)

    async def advancing() -> bool:
        async with store.engine.connect() as conn:
            return bool(await conn.scalar(sa.text("SELECT count(*) FROM crash_advance_log")))

    await eventually(advancing, within=30)
    assert stop(proc) == 0  # sent while an advance is in flight: it holds for a second
    after = await cursors(store)
    assert sorted(after.values(), reverse=True)[0] == 5  # the advance in flight was finished
    async with store.engine.connect() as conn:
        assert (
            await conn.scalar(
                sa.text("SELECT count(*) FROM outbox_lane WHERE lease_owner IS NOT NULL")
            )
            == 0
        )


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["--database-url", "postgresql://u:pw@127.0.0.1:1/x"], "cannot connect to", 1),
        (["--batch-size", "0"], "--batch-size '0' is below 1", 2),
        (["--lease-seconds", "nope"], "--lease-seconds 'nope' is not a number", 2),
    ],
)
def test_bad_configuration_exits_non_zero_with_one_line(
    database_url: str, args: list[str], message: str, code: int
) -> None:
    argv = ["--database-url", database_url, *args] if args[0] != "--database-url" else args
    result = subprocess.run(
        [sys.executable, "-m", "outbox", "committer", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == code
    lines = [line for line in result.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and message in lines[0], lines
    assert "pw@" not in result.stderr

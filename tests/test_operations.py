"""Operations: `outbox status`, `outbox prune` and the committer's background prune, metrics."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import sqlalchemy as sa
from prometheus_client import generate_latest

from outbox import LaneCommitter, OutboxStore
from outbox.metrics import CommitterMetrics
from tests.polling import eventually
from tests.test_committer import KEY, Producer, add_events, resolve

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "outbox", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def scalar(store: OutboxStore, sql: str) -> object:
    async with store.engine.connect() as conn:
        return await conn.scalar(sa.text(sql))


async def test_status_shows_lanes_backlog_stalls_and_undispatched(
    store: OutboxStore, database_url: str
) -> None:
    ids = await add_events(store, ["a1", "a2", "b1"], lane_of=lambda p: p[0])
    await resolve(store, ids[:2])
    lanes = LaneCommitter(store, producers={KEY: Producer(fail_first=1)})
    await lanes.run_once()  # lane a stalls on the failing producer
    async with store.engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO outbox_record (stream_id, subscriber, ordinal, payload) "
                "SELECT id, 's1', 0, '{}' FROM outbox_stream"
            )
        )
    result = cli("status", "--json", "--database-url", database_url)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    by_lane = {lane["lane"]: lane for lane in status["lanes"]}
    assert by_lane["a"]["stream"] == ["queue", "q"]  # JSON values, not JSON text
    assert by_lane["a"]["resolved_unadvanced"] == 2 and by_lane["a"]["attempts"] == 1
    assert "broker down" in by_lane["a"]["last_error"]
    assert by_lane["b"]["unresolved"] == 1 and by_lane["b"]["oldest_pending_seconds"] >= 0
    assert [(s["stream"], s["lane"]) for s in status["stalled"]] == [(["queue", "q"], "a")]
    assert "broker down" in status["stalled"][0]["reasons"][0]
    assert status["undispatched"] == [{"stream": ["queue", "q"], "records": 1}]
    table = cli("status", "--database-url", database_url)
    assert table.returncode == 0, table.stderr
    assert "stalled" in table.stdout and "queue/q" in table.stdout
    assert max(len(line) for line in table.stdout.splitlines()) <= 100  # piped


async def test_a_lane_pending_past_its_ack_timeout_shows_as_stalled(
    store: OutboxStore, database_url: str
) -> None:
    """Orphans of a dead triggerer (nobody sweeps them: no committer runs) hold a lane up: status
    and the stalled-lanes metric say so, while a lane pending for less than the timeout is ok."""
    await add_events(store, ["a1", "a2", "b1"], lane_of=lambda p: p[0], ack_timeout=30.0)
    async with store.engine.begin() as conn:
        await conn.execute(
            sa.text(
                "UPDATE outbox_event SET created_at = now() - interval '45 seconds' "
                "WHERE payload = '\"a1\"'"
            )
        )
    status = json.loads(cli("status", "--json", "--database-url", database_url).stdout)
    by_lane = {lane["lane"]: lane for lane in status["lanes"]}
    assert status["stalled"] == [
        {"stream": ["queue", "q"], "lane": "a", "reasons": ["pending past ack timeout (30s)"]}
    ]
    assert by_lane["a"]["stalled"] and by_lane["a"]["ack_timeout"] == 30.0
    assert by_lane["a"]["state"] == "stalled: pending past ack timeout (30s)"
    assert by_lane["b"]["state"] == "ok" and not by_lane["b"]["stalled"]
    table = cli("status", "--database-url", database_url)
    assert table.returncode == 0, table.stderr
    assert "pending past ack timeout (30s)" in table.stdout
    lane_b = next(line for line in table.stdout.splitlines() if line.split()[:1] == ["b"])
    assert lane_b.rstrip().endswith("ok")
    metrics = CommitterMetrics()
    await metrics.refresh(store)
    assert "outbox_stalled_lanes 1.0" in generate_latest(metrics.registry).decode()


async def test_status_of_an_unmigrated_database_says_run_migrate(empty_database_url: str) -> None:
    result = cli("status", "--database-url", empty_database_url)
    assert result.returncode == 1  # a run-time failure, not bad usage
    assert "run `outbox migrate`" in result.stderr.strip().splitlines()[-1]


async def test_prune_deletes_only_old_advanced_events_and_old_dispatched_records(
    store: OutboxStore, database_url: str
) -> None:
    ids = await add_events(store, ["p1", "p2", "p3"])
    await resolve(store, ids[:2])
    await LaneCommitter(store, producers={KEY: Producer()}).run_once()  # p1, p2 advanced
    async with store.engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO outbox_record (stream_id, event_id, subscriber, ordinal, payload, "
                "dispatched_at) SELECT stream_id, id, 's1', 0, '{}', "
                "CASE WHEN position = 1 THEN now() - interval '2 days' END FROM outbox_event"
            )
        )
        await conn.execute(
            sa.text("UPDATE outbox_event SET created_at = now() - interval '2 days'")
        )
    result = cli("prune", "--retention", "1d", "--batch-size", "1", "--database-url", database_url)
    assert result.returncode == 0, result.stderr
    assert "pruned 2 events and 1 dispatched records" in result.stdout
    async with store.engine.connect() as conn:
        left = (
            (await conn.execute(sa.text("SELECT e.position FROM outbox_event e ORDER BY position")))
            .scalars()
            .all()
        )
        records = (
            await conn.execute(
                sa.text(
                    "SELECT event_id IS NULL, dispatched_at IS NULL FROM outbox_record ORDER BY id"
                )
            )
        ).all()
        deliveries = await conn.scalar(sa.text("SELECT count(*) FROM outbox_delivery"))
    assert left == [3]  # unadvanced: kept
    # Undispatched records stay, with their event's id (the reader's order), pruned or not.
    assert sorted(records) == [(False, True), (False, True)]
    assert deliveries == 0


async def test_committer_prunes_in_the_background(store: OutboxStore) -> None:
    ids = await add_events(store, ["p1"])
    await resolve(store, ids)
    async with store.engine.begin() as conn:
        await conn.execute(
            sa.text("UPDATE outbox_event SET created_at = now() - interval '1 hour'")
        )
    lanes = LaneCommitter(
        store,
        producers={KEY: Producer()},
        prune_retention=60,
        housekeeping_interval=0.05,
        poll_interval=0.05,
    )
    runner = asyncio.create_task(lanes.run())
    try:

        async def pruned() -> bool:
            return await scalar(store, "SELECT count(*) FROM outbox_event") == 0

        await eventually(pruned, within=10)
    finally:
        lanes.request_stop()
        await runner


async def test_metrics_count_advances_and_read_lane_state(store: OutboxStore) -> None:
    ids = await add_events(store, ["a1", "a2", "b1"], lane_of=lambda p: p[0])
    await resolve(store, ids[:1])
    await resolve(store, ids[1:2], state="rejected")
    metrics = CommitterMetrics()
    lanes = LaneCommitter(store, producers={KEY: Producer()}, metrics=metrics)
    assert await lanes.run_once() == 2
    await metrics.refresh(store)
    text = generate_latest(metrics.registry).decode()
    assert "outbox_advances_total 1.0" in text
    assert "outbox_advanced_events_total 2.0" in text
    assert 'outbox_resolutions_total{outcome="acked"} 1.0' in text
    assert 'outbox_resolutions_total{outcome="rejected"} 1.0' in text
    assert 'outbox_lane_lag{lane="b",stream="queue/q"} 1.0' in text
    assert "outbox_stalled_lanes 0.0" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_committer(url: str, *args: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "outbox", "committer", "--database-url", url, *args]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def test_committer_serves_metrics(database_url: str) -> None:
    port = _free_port()
    proc = start_committer(database_url, "--metrics-port", str(port))

    async def scrape() -> str:
        def get() -> str:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
                    return str(r.read().decode())
            except OSError:
                return ""

        return await asyncio.to_thread(get)

    try:
        text = await eventually(scrape, within=20)
        assert "outbox_advances_total" in text
    finally:
        proc.terminate()
        assert proc.wait(20) == 0

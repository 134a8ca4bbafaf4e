"""Transient database errors (issue 15): what the database says when it is busy or going away is
retried; what says the statement is wrong is not. And the manager's connections killed again
and again mid-stream (``pg_terminate_backend``: the server's admin shutdown of a connection)
are invisible to subscribers: every trigger event handed over once, stored once, advanced.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from outbox import OutboxStore, SharedStreamManager
from outbox.writer import is_transient
from tests.streams import RecordingProducer, StreamTrigger, collect, records, wait_until


@pytest.mark.parametrize(
    ("sqlstate", "transient"),
    [
        ("40001", True),  # serialization failure
        ("40P01", True),  # deadlock detected
        ("57P01", True),  # admin shutdown
        ("53300", True),  # too many connections
        ("55P03", True),  # lock not available
        ("42601", False),  # syntax error: the statement is wrong
        ("23505", False),  # unique violation
        ("22P02", False),  # invalid text representation
    ],
)
async def test_what_the_database_says_decides_whether_to_retry(
    store: OutboxStore, sqlstate: str, transient: bool
) -> None:
    statement = f"DO $$ BEGIN RAISE EXCEPTION 'raised' USING ERRCODE = '{sqlstate}'; END $$"
    with pytest.raises(DBAPIError) as raised:
        async with store.engine.connect() as conn:
            await conn.exec_driver_sql(statement)
    assert is_transient(raised.value) is transient


async def test_connections_killed_mid_stream_are_invisible_to_subscribers(
    store: OutboxStore, database_url: str
) -> None:
    events = 3000
    producer = RecordingProducer([({"n": i}, i) for i in range(events)], lane_for=lambda p: p % 4)
    StreamTrigger.PRODUCERS["q"] = producer
    killed = 0

    async def kill_connections(stop: asyncio.Event) -> None:
        nonlocal killed
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            while not stop.is_set():
                cursor = await conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                row = await cursor.fetchone()
                killed += row[0] if row else 0
                # The fault's cadence, not a wait for a condition: a connection lives long
                # enough to be made and used (on a busy machine that takes a while).
                await asyncio.sleep(0.3)

    stop = asyncio.Event()
    async with SharedStreamManager(store) as manager:
        a = manager.subscribe(trigger_id="a", trigger=StreamTrigger())
        b = manager.subscribe(trigger_id="b", trigger=StreamTrigger())
        killer = asyncio.create_task(kill_connections(stop))
        try:
            got_a, got_b = await asyncio.wait_for(
                asyncio.gather(collect(a, events), collect(b, events)), timeout=120
            )
        finally:
            stop.set()
            await killer
        # ``advance`` is at-least-once: a batch whose cursor move was cut may go out again.
        await wait_until(lambda: len(set(producer.advanced)) == events, within=60)
    assert killed >= 5, killed
    want = [{"n": i} for i in range(events)]
    assert sorted(got_a, key=lambda p: p["n"]) == want
    assert sorted(got_b, key=lambda p: p["n"]) == want
    stored = Counter((name, payload["n"]) for name, payload in await records(store))
    assert set(stored) == {(name, i) for name in "ab" for i in range(events)}
    assert max(stored.values()) == 1
    assert set(producer.advanced) == set(range(events))
    print(f"{killed} connections killed while {events} events went through: none lost or twice")
    async with store.engine.connect() as conn:
        pending = await conn.scalar(sa.text("SELECT count(*) FROM outbox_event WHERE pending > 0"))
    assert pending == 0

"""The committer survives whatever importing a trigger module raises, ``SystemExit`` and other
``BaseException`` s included, failing only that stream; a real Ctrl-C still stops it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import TYPE_CHECKING

import sqlalchemy as sa

from outbox.core import canonical_json
from outbox.store import EventToRecord, ResolutionRow
from tests.polling import eventually
from tests.test_committer_process import ROOT, resolve_all, setup_stream, start_committer, stop

if TYPE_CHECKING:
    from outbox import OutboxStore

PER_LANE = 20
# Trigger class path -> what its lanes' last error must say.
FAILING = {
    "tests.import_raises.exits.Trigger": ("SystemExit: ", "3"),
    "tests.import_raises.custom.Trigger": ("Shutdown: ", "the module shut itself down"),
    "tests.import_raises.interrupts.Trigger": ("KeyboardInterrupt: ", "raised by the module"),
    "tests.import_raises.exits_in_factory.Trigger": ("SystemExit: ", "no producer today"),
}


async def _resolved_stream(store: OutboxStore, class_path: str, events: int) -> int:
    stream_id = await store.ensure_stream(
        canonical_json(("imports", class_path), what="key"), class_path, "{}", 300.0
    )
    lane_id = (await store.ensure_lanes(stream_id, ["null"]))["null"]
    staged = [
        EventToRecord(stream_id, lane_id, None, "{}", json.dumps(n), ["s1"]) for n in range(events)
    ]
    async with store.engine.begin() as conn:
        await store.record_events(conn, staged)
        await store.resolve(
            conn, [ResolutionRow(stream_id, e.event_id, "s1", "acked", None) for e in staged]
        )
    return stream_id


async def _lanes(store: OutboxStore, stream_id: int) -> list[tuple[int, str | None]]:
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT advanced_through, last_error FROM outbox_lane WHERE stream_id = :s "
                "ORDER BY lane_key"
            ),
            {"s": stream_id},
        )
        return [(r[0], r[1]) for r in rows]


async def test_whatever_an_import_raises_fails_only_that_stream(
    store: OutboxStore, database_url: str
) -> None:
    healthy = await setup_stream(store, database_url, PER_LANE)
    await resolve_all(store, healthy, chunk=1000, pause=0)
    failing = {path: await _resolved_stream(store, path, 3) for path in FAILING}
    proc = start_committer(
        database_url, "--allow-module", "tests.import_raises", "--poll-interval", "0.05"
    )
    try:

        async def healthy_advanced_and_each_failure_recorded() -> bool:
            if any(n != PER_LANE for n, _ in await _lanes(store, healthy)):
                return False
            errors = [(await _lanes(store, s))[0][1] for s in failing.values()]
            return all(errors)

        await eventually(healthy_advanced_and_each_failure_recorded, within=60)
        for path, stream_id in failing.items():
            [(advanced, error)] = await _lanes(store, stream_id)
            assert advanced == 0 and error is not None
            raised, message = FAILING[path]
            assert raised in error and message in error and path in error, error
            assert "\n" not in error
        assert proc.poll() is None

        # And the healthy stream keeps advancing.
        more = await setup_stream(store, database_url, 2 * PER_LANE)
        assert more == healthy
        await resolve_all(store, healthy, chunk=1000, pause=0)

        async def advanced_again() -> bool:
            return all(n == 3 * PER_LANE for n, _ in await _lanes(store, healthy))

        await eventually(advanced_again, within=60)
    finally:
        assert stop(proc) == 0


async def test_a_sigint_delivered_while_a_module_loads_still_stops_the_committer(
    store: OutboxStore, database_url: str
) -> None:
    stream_id = await _resolved_stream(store, "tests.import_raises.sigint.Trigger", 3)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.import_raises.run_committer",
        database_url,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode not in (0, None)
    assert b"KeyboardInterrupt" in stderr
    [(advanced, error)] = await _lanes(store, stream_id)
    assert advanced == 0 and error is None  # not taken for the module's failure

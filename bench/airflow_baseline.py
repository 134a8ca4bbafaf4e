#!/usr/bin/env python3
"""Throughput anchor for Airflow's in-memory shared-stream ack channel.

Adapted from /work/shared/reference/bench_airflow.py (same producer, trigger, runner and modes);
additions: the peak RSS of the timed window and ``--json -`` (one JSON line per run on stdout),
so that ``bench/manager_throughput.py`` can run it in a subprocess.

Drives ``airflow.triggers.shared_stream.SharedStreamManager`` (from
``apache-airflow-core==3.3.2``) in ack mode, with a ``SharedStreamProducer``,
the way the triggerer's ``TriggerRunner.run_trigger`` drives it:

    stream = manager.subscribe(trigger_id=..., trigger=..., key=...)
    async for event in trigger.filter_shared_stream(stream):
        seq = manager.bind_pending_event(trigger_id=..., key=...)
        ...persist the TriggerEvent...
        manager.confirm_persisted([seq])

No Airflow metadata database, supervisor or triggerer process is involved:
the manager is pure asyncio. See bench_airflow.md for the results and how to
run this.

Modes (how a bound TriggerEvent gets "persisted" before its seq is confirmed):

* ``instant``      confirm_persisted([seq]) right away (in-memory upper bound).
* ``pg-per-event`` one asyncpg INSERT per TriggerEvent, autocommit (its own
                   transaction), awaited inline by the subscriber's runner,
                   then confirm. Pool shared by all runners.
* ``pg-batched``   runners hand bound events to one writer task, which
                   gathers them for up to --linger-ms or --max-batch events,
                   inserts them in one statement
                   (INSERT ... SELECT * FROM unnest($1::bigint[], $2::jsonb[])),
                   then confirms all their seqs.

Timing: from just before the producer yields its first event until the
producer's ``advance`` has been handed the N-th item.

Needs: apache-airflow-core==3.3.2, asyncpg (pg modes), psutil (optional,
CPU figures). Postgres DSN from --dsn or $BENCH_PG_DSN.
"""

# ruff: noqa: E501, SIM105  (kept close to the reference benchmark it is adapted from)
from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import logging
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections import deque
from typing import Any

# Airflow reads its config on import; keep it away from any real AIRFLOW_HOME.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="afbench-home-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

import structlog
from airflow.triggers.base import BaseEventTrigger, TriggerEvent
from airflow.triggers.shared_stream import (
    AdvanceItem,
    SharedStreamManager,
    SharedStreamProducer,
)

try:
    import psutil
except ImportError:  # CPU figures are optional
    psutil = None

import threading


class RssSampler:
    """Peak resident set size while running, sampled every ``interval`` seconds."""

    def __init__(self, interval=0.005):
        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.before = self.peak = 0

    def _run(self):
        while not self._stop.wait(self._interval):
            rss = self._process.memory_info().rss
            if rss > self.peak:
                self.peak = rss

    def __enter__(self):
        self.before = self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


# The manager logs group start/stop at debug; keep the console quiet.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

MODES = ("instant", "pg-per-event", "pg-batched")


# --------------------------------------------------------------------------
# Shared run state (the manager builds the producer from the first trigger's
# serialize() kwargs through a classmethod, so the producer reaches the
# per-run counters through this module-level slot).
# --------------------------------------------------------------------------
class RunState:
    def __init__(self, n: int, subscribers: int) -> None:
        self.n = n
        self.subscribers = subscribers
        self.produced = 0
        self.advanced_items = 0
        self.advance_calls = 0
        self.unclean = 0
        self.max_outstanding = 0
        self.t_first: float | None = None
        self.t_last_produced: float | None = None
        self.t_done: float | None = None
        self.done = asyncio.Event()
        self.space = asyncio.Event()


STATE: RunState | None = None


class BenchProducer(SharedStreamProducer):
    """Yields N (raw, payload) pairs as fast as the loop lets it, then blocks forever.

    Flow control: at most ``window`` events may be produced but not yet
    advanced (like a broker's max-in-flight / prefetch limit). With
    ``window`` below the subscriber queue size no subscriber can overflow.
    ``window=0`` disables it (then the queue size must exceed N).
    """

    def __init__(self, n: int, lanes: int, window: int, yield_every: int) -> None:
        self.n = n
        self.lanes = lanes
        self.window = window
        self.yield_every = yield_every

    async def open_stream(self):
        st = STATE
        assert st is not None
        n, window, yield_every = self.n, self.window, self.yield_every
        st.t_first = time.perf_counter()
        for i in range(n):
            if window:
                outstanding = i - st.advanced_items
                if outstanding > st.max_outstanding:
                    st.max_outstanding = outstanding
                while i - st.advanced_items >= window:
                    st.space.clear()
                    await st.space.wait()
            st.produced = i + 1
            yield i, i  # (raw_event, broker_payload); payload = int sequence
            if yield_every and (i + 1) % yield_every == 0:
                await asyncio.sleep(0)
        st.t_last_produced = time.perf_counter()
        await asyncio.Event().wait()  # "yield forever, or raise"

    def get_advance_lane(self, broker_payload: Any):
        return broker_payload % self.lanes

    async def advance(self, batch: list[AdvanceItem]) -> None:
        st = STATE
        st.advance_calls += 1
        subs = st.subscribers
        for item in batch:
            o = item.outcome
            if o.acked != subs or o.failed or o.rejected:
                st.unclean += 1
        st.advanced_items += len(batch)
        st.space.set()
        if st.advanced_items >= st.n and st.t_done is None:
            st.t_done = time.perf_counter()
            st.done.set()


class BenchTrigger(BaseEventTrigger):
    """Pass-through subscriber: one TriggerEvent per raw event."""

    def __init__(self, *, stream: str, n: int, lanes: int, window: int, yield_every: int) -> None:
        super().__init__()
        self.stream = stream
        self.n = n
        self.lanes = lanes
        self.window = window
        self.yield_every = yield_every

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{__name__}.BenchTrigger",
            {
                "stream": self.stream,
                "n": self.n,
                "lanes": self.lanes,
                "window": self.window,
                "yield_every": self.yield_every,
            },
        )

    def shared_stream_key(self):
        return ("bench", self.stream)

    @classmethod
    def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> SharedStreamProducer:
        return BenchProducer(kwargs["n"], kwargs["lanes"], kwargs["window"], kwargs["yield_every"])

    async def filter_shared_stream(self, shared_stream):
        async for raw in shared_stream:
            yield TriggerEvent({"seq": raw})

    async def run(self):  # standalone path, unused here
        raise NotImplementedError
        yield  # pragma: no cover


# --------------------------------------------------------------------------
# Postgres side
# --------------------------------------------------------------------------
DDL = """
CREATE TABLE IF NOT EXISTS bench_trigger_event (
    id          bigserial PRIMARY KEY,
    trigger_id  bigint NOT NULL,
    payload     jsonb  NOT NULL
)
"""
INSERT_ONE = "INSERT INTO bench_trigger_event (trigger_id, payload) VALUES ($1, $2::jsonb)"
INSERT_MANY = "INSERT INTO bench_trigger_event (trigger_id, payload) SELECT * FROM unnest($1::bigint[], $2::jsonb[])"


class BatchWriter:
    """Single writer: gathers bound events for up to linger or max_batch, one INSERT, confirm."""

    def __init__(self, pool, manager: SharedStreamManager, linger: float, max_batch: int) -> None:
        self.pool = pool
        self.manager = manager
        self.linger = linger
        self.max_batch = max_batch
        self.buf: deque[tuple[int, str, int | None]] = deque()
        self.nonempty = asyncio.Event()
        self.full = asyncio.Event()
        self.batches = 0
        self.rows = 0

    def put(self, trigger_id: int, payload_json: str, seq: int | None) -> None:
        self.buf.append((trigger_id, payload_json, seq))
        self.nonempty.set()
        if len(self.buf) >= self.max_batch:
            self.full.set()

    async def run(self) -> None:
        buf = self.buf
        while True:
            if not buf:
                self.nonempty.clear()
                await self.nonempty.wait()
            if len(buf) < self.max_batch:
                self.full.clear()
                try:
                    await asyncio.wait_for(self.full.wait(), self.linger)
                except TimeoutError:
                    pass
            k = min(len(buf), self.max_batch)
            tids = []
            payloads = []
            seqs = []
            for _ in range(k):
                tid, pj, seq = buf.popleft()
                tids.append(tid)
                payloads.append(pj)
                if seq is not None:
                    seqs.append(seq)
            await self.pool.execute(INSERT_MANY, tids, payloads)  # one statement = one transaction
            self.batches += 1
            self.rows += k
            self.manager.confirm_persisted(seqs)


# --------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------
async def runner(manager, trigger_id, trigger, key, mode, pool, writer) -> None:
    """Mirror of TriggerRunner.run_trigger's shared-stream branch."""
    stream = manager.subscribe(trigger_id=trigger_id, trigger=trigger, key=key)
    try:
        async for event in trigger.filter_shared_stream(stream):
            # bind before pulling the next raw event (no await in between)
            seq = manager.bind_pending_event(trigger_id=trigger_id, key=key)
            if mode == "instant":
                if seq is not None:
                    manager.confirm_persisted([seq])
            elif mode == "pg-per-event":
                await pool.execute(INSERT_ONE, trigger_id, json.dumps(event.payload))
                if seq is not None:
                    manager.confirm_persisted([seq])
            else:  # pg-batched
                writer.put(trigger_id, json.dumps(event.payload), seq)
    finally:
        await manager.unsubscribe(trigger_id, key)


def _postgres_cpu():
    """CPU seconds of each process of the benchmark's Postgres cluster ($BENCH_PG_POSTMASTER)."""
    pid = os.environ.get("BENCH_PG_POSTMASTER")
    if psutil is None or not pid:
        return {}
    out = {}
    try:
        postmaster = psutil.Process(int(pid))
        procs = [postmaster, *postmaster.children()]
    except psutil.Error:
        return {}
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        out[proc.pid] = times.user + times.system
    return out


def _cpu_snapshot():
    if psutil is None:
        return None
    proc = psutil.Process()
    pt = proc.cpu_times()
    st = psutil.cpu_times()
    busy = st.user + st.nice + st.system + getattr(st, "irq", 0) + getattr(st, "softirq", 0)
    return pt.user + pt.system, busy, st.idle + getattr(st, "iowait", 0), _postgres_cpu()


async def run_once(args, rep: int) -> dict[str, Any]:
    global STATE
    STATE = RunState(args.events, args.subscribers)
    st = STATE
    pool = None
    writer = None
    writer_task = None
    if args.mode != "instant":
        import asyncpg

        pool = await asyncpg.create_pool(args.dsn, min_size=args.pool_size, max_size=args.pool_size)
        await pool.execute(DDL)
        await pool.execute("TRUNCATE bench_trigger_event")
    manager = SharedStreamManager(max_subscriber_queue=args.queue_size)
    if args.mode == "pg-batched":
        writer = BatchWriter(pool, manager, args.linger_ms / 1000.0, args.max_batch)
        writer_task = asyncio.create_task(writer.run(), name="bench-writer")

    key = ("bench", f"s{rep}")
    tasks = []
    gc.collect()
    rss = RssSampler() if psutil is not None else None
    if rss is not None:
        rss.__enter__()
    cpu0 = _cpu_snapshot()
    w0 = time.perf_counter()
    for tid in range(1, args.subscribers + 1):
        trig = BenchTrigger(
            stream=f"s{rep}",
            n=args.events,
            lanes=args.lanes,
            window=args.window,
            yield_every=args.yield_every,
        )
        tasks.append(
            asyncio.create_task(
                runner(manager, tid, trig, key, args.mode, pool, writer), name=f"runner-{tid}"
            )
        )
    try:
        await asyncio.wait_for(st.done.wait(), args.timeout)
    except TimeoutError:
        pass
    w1 = time.perf_counter()
    cpu1 = _cpu_snapshot()
    if rss is not None:
        rss.__exit__(None, None, None)

    for t in tasks:
        t.cancel()
    for t in tasks:
        try:
            await t
        except (asyncio.CancelledError, Exception):
            pass
    await manager.stop_all()
    rows = None
    if writer_task is not None:
        writer_task.cancel()
        try:
            await writer_task
        except asyncio.CancelledError:
            pass
    if pool is not None:
        rows = await pool.fetchval("SELECT count(*) FROM bench_trigger_event")
        await pool.close()

    ok = st.t_done is not None
    elapsed = (st.t_done - st.t_first) if ok else None
    res: dict[str, Any] = {
        "mode": args.mode,
        "subscribers": args.subscribers,
        "lanes": args.lanes,
        "events": args.events,
        "rep": rep,
        "ok": ok,
        "elapsed_s": elapsed,
        "events_per_s": (args.events / elapsed) if ok else None,
        "trigger_events_per_s": (args.events * args.subscribers / elapsed) if ok else None,
        "advanced": st.advanced_items,
        "advance_calls": st.advance_calls,
        "items_per_advance": (st.advanced_items / st.advance_calls) if st.advance_calls else None,
        "unclean": st.unclean,
        "max_outstanding": st.max_outstanding,
        "window": args.window,
        "queue_size": args.queue_size,
        "yield_every": args.yield_every,
        "pool_size": args.pool_size if args.mode != "instant" else None,
        "gc_freeze": args.gc_freeze,
    }
    if rss is not None:
        res["peak_rss_mb"] = rss.peak / 2**20
        res["rss_growth_mb"] = (rss.peak - rss.before) / 2**20
    if rows is not None:
        res["rows"] = rows
    if writer is not None:
        res["writer_batches"] = writer.batches
        res["rows_per_batch"] = writer.rows / writer.batches if writer.batches else None
    if cpu0 is not None and cpu1 is not None:
        wall = w1 - w0
        ncpu = psutil.cpu_count() or 1
        proc = cpu1[0] - cpu0[0]
        busy = cpu1[1] - cpu0[1]
        idle = cpu1[2] - cpu0[2]
        res["proc_cpu_pct"] = 100.0 * proc / wall  # 100 = one core saturated
        res["machine_busy_pct"] = (
            100.0 * busy / (busy + idle) if busy + idle else None
        )  # of all cores
        res["others_cpu_cores"] = max(0.0, busy - proc) / wall  # mostly the Postgres backends
        if cpu1[3]:
            pg = sum(t - cpu0[3].get(pid, 0.0) for pid, t in cpu1[3].items())
            res["pg_cpu_cores"] = pg / wall
            res["foreign_cpu_cores"] = max(0.0, busy - proc - pg) / wall
        res["ncpu"] = ncpu
    return res


def fmt(r: dict[str, Any]) -> str:
    if not r["ok"]:
        return f"{r['mode']} subs={r['subscribers']} lanes={r['lanes']} rep={r['rep']}: TIMEOUT advanced={r['advanced']}"
    s = (
        f"{r['mode']:<12} subs={r['subscribers']:<2} lanes={r['lanes']} n={r['events']} rep={r['rep']}: "
        f"{r['elapsed_s']:.3f}s {r['events_per_s']:,.0f} ev/s {r['trigger_events_per_s']:,.0f} trig-ev/s "
        f"advances={r['advance_calls']} ({r['items_per_advance']:.1f}/call) unclean={r['unclean']}"
    )
    if "rows" in r:
        s += f" rows={r['rows']}"
    if "writer_batches" in r:
        s += f" batches={r['writer_batches']} ({r['rows_per_batch']:.0f} rows/batch)"
    if "proc_cpu_pct" in r:
        s += f" cpu(proc)={r['proc_cpu_pct']:.0f}% others={r['others_cpu_cores']:.2f} cores"
    return s


async def amain(args) -> list[dict[str, Any]]:
    results = []
    for rep in range(args.repeat):
        r = await run_once(args, rep)
        print(fmt(r), file=sys.stderr if args.json == "-" else sys.stdout, flush=True)
        results.append(r)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", "-n", type=int, default=20_000, help="raw events N (default 20000)")
    p.add_argument(
        "--subscribers", "-s", type=int, default=1, help="subscribing triggers (default 1)"
    )
    p.add_argument("--mode", "-m", choices=MODES, default="instant")
    p.add_argument(
        "--lanes", type=int, default=1, help="advance lanes, keyed by payload %% lanes (default 1)"
    )
    p.add_argument(
        "--repeat", "-r", type=int, default=1, help="repetitions in this process (default 1)"
    )
    p.add_argument(
        "--window",
        type=int,
        default=1000,
        help="max produced-but-not-advanced events; 0 = unbounded (default 1000)",
    )
    p.add_argument(
        "--queue-size",
        type=int,
        default=1024,
        help="SharedStreamManager max_subscriber_queue (default 1024, Airflow's)",
    )
    p.add_argument(
        "--yield-every",
        type=int,
        default=0,
        help="producer does asyncio.sleep(0) every K events; 0 = only when the window is full (default 0)",
    )
    p.add_argument(
        "--dsn",
        default=os.environ.get("BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:55432/postgres"),
        help="Postgres DSN for the pg modes (default $BENCH_PG_DSN or postgres@127.0.0.1:55432)",
    )
    p.add_argument("--pool-size", type=int, default=4, help="asyncpg pool size (default 4)")
    p.add_argument(
        "--linger-ms", type=float, default=5.0, help="pg-batched: max gather time (default 5 ms)"
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=1000,
        help="pg-batched: max events per INSERT (default 1000)",
    )
    p.add_argument(
        "--timeout", type=float, default=300.0, help="give up a run after this many seconds"
    )
    p.add_argument(
        "--json", metavar="FILE", help="append one JSON line per run to FILE (- = stdout)"
    )
    p.add_argument(
        "--profile",
        metavar="FILE",
        help="cProfile the run(s); dump stats to FILE and print the top 25",
    )
    p.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() the imported heap before running (the triggerer does not do this)",
    )
    args = p.parse_args(argv)

    if args.window == 0 and args.queue_size <= args.events:
        p.error("--window 0 needs --queue-size > --events, or subscribers overflow")
    if args.gc_freeze:
        gc.collect()
        gc.freeze()

    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        results = asyncio.run(amain(args))
        prof.disable()
        prof.dump_stats(args.profile)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    else:
        results = asyncio.run(amain(args))

    ok = [r for r in results if r["ok"]]
    if len(results) > 1 and ok:
        med = statistics.median(r["events_per_s"] for r in ok)
        print(
            f"median over {len(ok)}/{len(results)}: {med:,.0f} events/s, "
            f"{med * args.subscribers:,.0f} trigger-events/s",
            flush=True,
        )
    if args.json == "-":
        for r in results:
            print(json.dumps(r), flush=True)
    elif args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return 0 if len(ok) == len(results) and all(r["unclean"] == 0 for r in ok) else 1


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end throughput of outbox's ``SharedStreamManager`` against Airflow's in-memory one.

One producer yields N raw events in bursts (no voluntary await; a flow-control window of 1000
produced-but-not-advanced events, like a broker's max-in-flight limit). S pass-through filters
yield one ``TriggerEvent`` each per raw event. A run is timed from the producer's first yield
until ``advance`` has counted N items; every outcome must be clean, and the outbox must hold
N x S records at the end.

Implementations, each run in its own subprocess (imports, heap and GC kept apart):

* ``outbox``       our manager (durable: records + resolution committed, then advanced by the
                   in-process ``LaneCommitter``).
* ``instant``      Airflow 3.3.2's manager, persistence confirmed at once (in-memory bound).
* ``pg-batched``   Airflow, one writer task batching INSERTs (up to 5 ms / 1000 rows).
* ``pg-per-event`` Airflow, one INSERT (own transaction) per trigger event.
* ``unnest``       no manager: the N x S record rows inserted by one
                   ``INSERT ... SELECT unnest(...)`` per batch with asyncpg (physical limit).

The Airflow modes run ``bench/airflow_baseline.py`` (an adaptation of the reference benchmark).
Postgres: ``--database-url`` (or ``$OUTBOX_BENCH_DATABASE_URL``) names a database this benchmark
may TRUNCATE; without it a fresh database is created on ``$PGHOST:$PGPORT`` when set, else a
throwaway cluster is started (initdb + pg_ctl, durable defaults) and removed afterwards.

    python bench/manager_throughput.py              # full: N=20000, 3 repetitions, all cells
    python bench/manager_throughput.py --tiny       # CI: N=300, 1 repetition, a few cells
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pgsupport import OUTBOX_TABLES, bench_database, plain_url

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Hashable, Sequence

    from outbox import AdvanceItem, OutboxStore, SharedStreamManager

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
AIRFLOW_MODES = ("instant", "pg-batched", "pg-per-event")
IMPLS = ("outbox", *AIRFLOW_MODES, "unnest")
WINDOW = 1000


# --------------------------------------------------------------------------------------------
# Measurement helpers shared by the workers
# --------------------------------------------------------------------------------------------


class RssSampler:
    """Peak resident set size of this process while running, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.before = 0
        self.peak = 0

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            rss = self._process.memory_info().rss
            if rss > self.peak:
                self.peak = rss

    def __enter__(self) -> RssSampler:
        self.before = self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def postgres_cpu() -> dict[int, float]:
    """CPU seconds of each process of the benchmark's Postgres cluster, when it runs on this
    machine (the orchestrator passes the postmaster's pid in ``$BENCH_PG_POSTMASTER``)."""
    import psutil

    pid = os.environ.get("BENCH_PG_POSTMASTER")
    if not pid:
        return {}
    out: dict[int, float] = {}
    with contextlib.suppress(psutil.Error):
        postmaster = psutil.Process(int(pid))
        for proc in [postmaster, *postmaster.children()]:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                out[proc.pid] = times.user + times.system
    return out


CpuSnapshot = tuple[float, float, dict[int, float]]


def cpu_snapshot() -> CpuSnapshot:
    import psutil

    pt = psutil.Process().cpu_times()
    st = psutil.cpu_times()
    busy = st.user + st.nice + st.system + getattr(st, "irq", 0) + getattr(st, "softirq", 0)
    return pt.user + pt.system, busy, postgres_cpu()


def cpu_figures(before: CpuSnapshot, after: CpuSnapshot, wall: float) -> dict[str, float]:
    """This process's CPU (100 = one core), the machine's other busy time in cores, and of that
    the benchmark's Postgres and everything else (other workloads on the machine: noise)."""
    proc = after[0] - before[0]
    busy = after[1] - before[1]
    res = {
        "proc_cpu_pct": 100.0 * proc / wall,
        "others_cpu_cores": max(0.0, busy - proc) / wall,
    }
    if after[2]:
        pg = sum(t - before[2].get(pid, 0.0) for pid, t in after[2].items())
        res["pg_cpu_cores"] = pg / wall
        res["foreign_cpu_cores"] = max(0.0, busy - proc - pg) / wall
    return res


# --------------------------------------------------------------------------------------------
# outbox: producer, pass-through trigger, one run
# --------------------------------------------------------------------------------------------


class RunState:
    def __init__(self, n: int, subscribers: int) -> None:
        self.n = n
        self.subscribers = subscribers
        self.advanced_items = 0
        self.advance_calls = 0
        self.unclean = 0
        self.max_outstanding = 0
        self.t_first: float | None = None
        self.t_done: float | None = None
        self.done = asyncio.Event()
        self.space = asyncio.Event()
        self.received = 0


def _outbox_classes() -> tuple[type[Any], type[Any]]:
    """The producer and trigger classes, defined on first use so the Airflow-free workers and the
    orchestrator do not import outbox."""
    from outbox import BaseEventTrigger, SharedStreamProducer, TriggerEvent

    class BenchProducer(SharedStreamProducer):
        """Yields N ``(i, i)`` back to back (flow control only), then blocks forever."""

        state: ClassVar[RunState | None] = None

        def __init__(self, n: int, lanes: int, window: int) -> None:
            self.n = n
            self.lanes = lanes
            self.window = window

        async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
            st = BenchProducer.state
            assert st is not None
            n, window = self.n, self.window
            st.t_first = time.perf_counter()
            for i in range(n):
                if window:
                    outstanding = i - st.advanced_items
                    if outstanding > st.max_outstanding:
                        st.max_outstanding = outstanding
                    while i - st.advanced_items >= window:
                        st.space.clear()
                        await st.space.wait()
                yield i, i
            await asyncio.Event().wait()

        def get_advance_lane(self, broker_payload: Any) -> Hashable:
            return int(broker_payload) % self.lanes

        async def advance(self, batch: Sequence[AdvanceItem]) -> None:
            st = BenchProducer.state
            assert st is not None
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

        def __init__(self, *, stream: str, n: int, lanes: int, window: int) -> None:
            super().__init__()
            self.stream = stream
            self.n = n
            self.lanes = lanes
            self.window = window

        def serialize(self) -> tuple[str, dict[str, Any]]:
            return (
                f"{__name__}.BenchTrigger",
                {"stream": self.stream, "n": self.n, "lanes": self.lanes, "window": self.window},
            )

        def shared_stream_key(self) -> Hashable:
            return ("bench", self.stream)

        @classmethod
        def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> SharedStreamProducer:
            return BenchProducer(kwargs["n"], kwargs["lanes"], kwargs["window"])

        async def filter_shared_stream(
            self, shared_stream: AsyncIterator[Any]
        ) -> AsyncIterator[TriggerEvent]:
            async for raw in shared_stream:
                yield TriggerEvent({"seq": raw})

        async def run(self) -> AsyncIterator[TriggerEvent]:
            raise NotImplementedError
            yield  # pragma: no cover

    return BenchProducer, BenchTrigger


async def _outbox_runner(
    manager: SharedStreamManager, trigger_id: int, trigger: Any, st: RunState
) -> None:
    async for _event in manager.subscribe(trigger_id=trigger_id, trigger=trigger):
        st.received += 1


async def run_outbox(args: argparse.Namespace) -> dict[str, Any]:
    import sqlalchemy as sa

    from outbox import OutboxStore, SharedStreamManager

    producer_cls, trigger_cls = _outbox_classes()
    store: OutboxStore = OutboxStore.from_url(args.database_url)
    async with store.engine.begin() as conn:
        await conn.execute(sa.text(f"TRUNCATE {OUTBOX_TABLES} RESTART IDENTITY CASCADE"))
    st = RunState(args.events, args.subscribers)
    producer_cls.state = st
    manager = SharedStreamManager(store)
    tasks = []
    gc.collect()
    with RssSampler() as rss:
        cpu0 = cpu_snapshot()
        w0 = time.perf_counter()
        for tid in range(1, args.subscribers + 1):
            trigger = trigger_cls(stream="s", n=args.events, lanes=args.lanes, window=WINDOW)
            tasks.append(asyncio.create_task(_outbox_runner(manager, tid, trigger, st)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(st.done.wait(), args.timeout)
        w1 = time.perf_counter()
        cpu1 = cpu_snapshot()
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    await manager.stop_all()
    async with store.engine.connect() as conn:
        records = await conn.scalar(sa.text("SELECT count(*) FROM outbox_record"))
        acked = await conn.scalar(
            sa.text("SELECT count(*) FROM outbox_delivery WHERE state = 'acked'")
        )
        unresolved = await conn.scalar(
            sa.text("SELECT count(*) FROM outbox_event WHERE pending > 0")
        )
        transactions = manager._writer.transactions  # a figure for the report only
    await store.aclose()
    ok = st.t_done is not None and st.t_first is not None
    res: dict[str, Any] = {
        "ok": ok,
        "elapsed_s": (st.t_done - st.t_first) if ok else None,  # type: ignore[operator]
        "advanced": st.advanced_items,
        "advance_calls": st.advance_calls,
        "unclean": st.unclean,
        "rows": records,
        "acked_deliveries": acked,
        "unresolved_events": unresolved,
        "write_transactions": transactions,
        "max_outstanding": st.max_outstanding,
        "peak_rss_mb": rss.peak / 2**20,
        "rss_growth_mb": (rss.peak - rss.before) / 2**20,
        **cpu_figures(cpu0, cpu1, w1 - w0),
    }
    res["clean"] = bool(
        ok
        and st.unclean == 0
        and records == acked == args.events * args.subscribers
        and unresolved == 0
    )
    return res


# --------------------------------------------------------------------------------------------
# The physical limit: the same record rows, batched INSERT ... SELECT unnest(...), asyncpg
# --------------------------------------------------------------------------------------------

LIMIT_DDL = """
DROP TABLE IF EXISTS bench_record_limit;
CREATE TABLE bench_record_limit (
    id bigserial PRIMARY KEY,
    stream_id bigint NOT NULL,
    event_id bigint,
    subscriber text NOT NULL,
    ordinal integer NOT NULL,
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    dispatched_at timestamptz,
    UNIQUE (event_id, subscriber, ordinal)
);
CREATE INDEX ON bench_record_limit (stream_id, id) WHERE dispatched_at IS NULL;
"""

LIMIT_INSERT = """
INSERT INTO bench_record_limit (stream_id, event_id, subscriber, ordinal, payload)
SELECT s, e, sub, o, p::jsonb
FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::int[], $5::text[]) AS x(s, e, sub, o, p)
"""


async def run_unnest(args: argparse.Namespace) -> dict[str, Any]:
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(plain_url(args.database_url))
    await conn.execute(LIMIT_DDL)
    n, subs, batch = args.events, args.subscribers, args.limit_batch
    names = [str(t) for t in range(1, subs + 1)]
    gc.collect()
    with RssSampler() as rss:
        cpu0 = cpu_snapshot()
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            events = range(start, min(n, start + batch))
            event_ids: list[int] = []
            subscribers: list[str] = []
            payloads: list[str] = []
            for i in events:
                payload = json.dumps({"seq": i}, separators=(",", ":"))
                for name in names:
                    event_ids.append(i + 1)
                    subscribers.append(name)
                    payloads.append(payload)
            k = len(event_ids)
            await conn.execute(LIMIT_INSERT, [1] * k, event_ids, subscribers, [0] * k, payloads)
        t1 = time.perf_counter()
        cpu1 = cpu_snapshot()
    rows = await conn.fetchval("SELECT count(*) FROM bench_record_limit")
    await conn.execute("DROP TABLE bench_record_limit")
    await conn.close()
    return {
        "ok": True,
        "elapsed_s": t1 - t0,
        "rows": rows,
        "clean": rows == n * subs,
        "peak_rss_mb": rss.peak / 2**20,
        "rss_growth_mb": (rss.peak - rss.before) / 2**20,
        "batch_events": batch,
        **cpu_figures(cpu0, cpu1, t1 - t0),
    }


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------


def find_postmaster(url: str) -> int | None:
    """The pid of the Postgres postmaster behind ``url`` if it runs on this machine."""
    import asyncpg
    import psutil

    async def parent_of_backend() -> psutil.Process | None:
        conn = await asyncpg.connect(plain_url(url))
        try:  # while the backend lives
            return psutil.Process(int(await conn.fetchval("SELECT pg_backend_pid()"))).parent()
        finally:
            await conn.close()

    try:
        postmaster = asyncio.run(parent_of_backend())
    except (psutil.Error, OSError):
        return None
    return postmaster.pid if postmaster is not None and "postgres" in postmaster.name() else None


def run_measured(impl: str, subs: int, lanes: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run; repeated (up to ``--retries`` times) while other work on the machine took more
    than ``--max-foreign`` cores during it, keeping the least disturbed run."""
    best: dict[str, Any] | None = None
    for attempt in range(1 + args.retries):
        r = run_worker(impl, subs, lanes, args)
        r["attempts"] = attempt + 1
        foreign = r.get("foreign_cpu_cores")
        if best is None or (
            r.get("ok") and (foreign or 0.0) < (best.get("foreign_cpu_cores") or 0.0)
        ):
            best = r
        if not r.get("ok") or foreign is None or foreign <= args.max_foreign:
            break
        if attempt < args.retries:
            print(f"        (noisy: {foreign:.2f} foreign cores; again) {fmt(r)}", flush=True)
    assert best is not None
    best["attempts"] = r["attempts"]
    return best


def run_worker(impl: str, subs: int, lanes: int, args: argparse.Namespace) -> dict[str, Any]:
    common = ["--events", str(args.events), "--subscribers", str(subs), "--lanes", str(lanes)]
    common += ["--timeout", str(args.timeout)]
    if args.gc_freeze:
        common.append("--gc-freeze")
    env = dict(os.environ)
    if impl in AIRFLOW_MODES:
        env.setdefault("AIRFLOW_HOME", args.airflow_home)
        env["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
        cmd = [args.airflow_python, str(HERE / "airflow_baseline.py"), "--mode", impl, *common]
        cmd += ["--dsn", plain_url(args.database_url), "--json", "-"]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, *common]
        cmd += ["--database-url", args.database_url, "--limit-batch", str(args.limit_batch)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.timeout + 120
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode not in (0, 1) or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        return {"impl": impl, "subscribers": subs, "lanes": lanes, "ok": False, "clean": False}
    res: dict[str, Any] = json.loads(lines[-1])
    res.update(impl=impl, subscribers=subs, lanes=lanes, events=args.events)
    if impl in AIRFLOW_MODES:
        rows_ok = impl == "instant" or res.get("rows") == args.events * subs
        res["clean"] = bool(res["ok"] and res["unclean"] == 0 and rows_ok)
    if res.get("ok") and res.get("elapsed_s"):
        res["events_per_s"] = args.events / res["elapsed_s"]
    return res


def fmt(r: dict[str, Any]) -> str:
    head = f"{r['impl']:<12} subs={r['subscribers']:<2} lanes={r['lanes']}"
    if not r.get("ok"):
        return f"{head}: FAILED (timeout or crash) {r.get('advanced', '')}"
    return (
        f"{head}: {r['events_per_s']:>9,.0f} ev/s {r['events_per_s'] * r['subscribers']:>9,.0f} "
        f"trig-ev/s  peak {r['peak_rss_mb']:.0f} MiB (+{r['rss_growth_mb']:.1f})  "
        f"cpu {r.get('proc_cpu_pct', 0):.0f}% pg {r.get('pg_cpu_cores', 0):.2f} "
        f"foreign {r.get('foreign_cpu_cores', 0):.2f} cores"
        f"{'' if r['clean'] else '  NOT CLEAN'}"
    )


def _cores(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def summarise(results: list[dict[str, Any]], args: argparse.Namespace) -> tuple[str, bool]:
    """A markdown table of medians and ratios; and whether every run was clean. With more than
    ``args.repeat`` runs of a cell (several passes), the least disturbed ones count."""
    cells: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in results:
        cells.setdefault((r["impl"], r["subscribers"], r["lanes"]), []).append(r)
    for key, runs in cells.items():
        runs.sort(key=lambda r: (not r.get("ok"), r.get("foreign_cpu_cores") or 0.0))
        cells[key] = runs[: args.repeat]

    def med(impl: str, subs: int, lanes: int, field: str = "events_per_s") -> float | None:
        vals = [r[field] for r in cells.get((impl, subs, lanes), []) if r.get("ok") and field in r]
        return statistics.median(vals) if vals else None

    def spread(impl: str, subs: int, lanes: int) -> str:
        vals = [r["events_per_s"] for r in cells.get((impl, subs, lanes), []) if r.get("ok")]
        return f"{min(vals):,.0f}-{max(vals):,.0f}" if len(vals) > 1 else "-"

    impls = [i for i in IMPLS if i in args.impls]
    lines = [
        f"N = {args.events:,} raw events, {args.repeat} repetition(s), median; "
        "events/s = raw events through the whole channel (trigger events/s = events/s x S).",
        "",
        "| impl | lanes | subs | events/s | min-max | trigger-events/s | peak RSS MiB "
        "(growth) | bench CPU | Postgres CPU | foreign CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for impl in impls:
        for lanes in args.lanes:
            for subs in args.subscribers:
                eps = med(impl, subs, lanes)
                if eps is None:
                    if (impl, subs, lanes) in cells:
                        lines.append(f"| {impl} | {lanes} | {subs} | FAILED | | | | | | |")
                    continue
                lines.append(
                    f"| {impl} | {lanes} | {subs} | {eps:,.0f} | {spread(impl, subs, lanes)} | "
                    f"{eps * subs:,.0f} | {med(impl, subs, lanes, 'peak_rss_mb'):.0f} "
                    f"(+{med(impl, subs, lanes, 'rss_growth_mb'):.1f}) | "
                    f"{med(impl, subs, lanes, 'proc_cpu_pct'):.0f}% | "
                    f"{_cores(med(impl, subs, lanes, 'pg_cpu_cores'))} | "
                    f"{_cores(med(impl, subs, lanes, 'foreign_cpu_cores'))} |"
                )
    if "outbox" in impls:
        others = [i for i in impls if i != "outbox"]
        lines += _table_head(
            "outbox events/s as a ratio of each baseline (same run, medians):",
            ["lanes", "subs", "outbox events/s", *(f"÷ {i}" for i in others)],
        )
        for lanes in args.lanes:
            for subs in args.subscribers:
                ours = med("outbox", subs, lanes)
                if ours is None:
                    continue
                ratios = []
                for other in others:
                    base = med(other, subs, lanes)
                    ratios.append(f"{ours / base:.2f}" if base else "-")
                lines.append(f"| {lanes} | {subs} | {ours:,.0f} | " + " | ".join(ratios) + " |")
        lines += _paired_ratios(results, args, others)
    clean = all(r.get("clean") for r in results)
    lines += ["", f"all runs clean: {'yes' if clean else 'NO'} ({len(results)} runs)"]
    return "\n".join(lines), clean


def _table_head(title: str, columns: list[str]) -> list[str]:
    return ["", title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _paired_ratios(
    results: list[dict[str, Any]], args: argparse.Namespace, others: list[str]
) -> list[str]:
    """Each outbox run against the baseline runs of its own repetition (a cell's
    implementations run back to back), median of those ratios: steadier than a ratio of
    medians on a machine whose speed drifts during a pass."""
    by_rep: dict[tuple[int, int, str, int], dict[str, float]] = {}
    for r in results:
        if r.get("ok") and "rep" in r:
            key = (r["lanes"], r["subscribers"], r.get("invocation", ""), r["rep"])
            by_rep.setdefault(key, {})[r["impl"]] = r["events_per_s"]
    lines = _table_head(
        "paired by repetition (median of per-repetition ratios):",
        ["lanes", "subs", *(f"÷ {i}" for i in others)],
    )
    for lanes in args.lanes:
        for subs in args.subscribers:
            reps = [v for (ln, sb, _, _), v in sorted(by_rep.items()) if (ln, sb) == (lanes, subs)]
            cells = []
            for other in others:
                ratios = [v["outbox"] / v[other] for v in reps if "outbox" in v and v.get(other)]
                cells.append(f"{statistics.median(ratios):.2f}" if ratios else "-")
            lines.append(f"| {lanes} | {subs} | " + " | ".join(cells) + " |")
    return lines


def orchestrate(args: argparse.Namespace) -> int:
    results: list[dict[str, Any]] = []
    with (
        bench_database(args.database_url) as url,
        tempfile.TemporaryDirectory(prefix="afbench-home-") as airflow_home,
    ):
        args.database_url = url
        args.airflow_home = airflow_home
        postmaster = find_postmaster(url)
        if postmaster is not None:
            os.environ["BENCH_PG_POSTMASTER"] = str(postmaster)
        invocation = uuid.uuid4().hex[:8]  # pairs runs of one invocation only (--summarise)
        for rep in range(args.repeat):
            for lanes in args.lanes:
                for subs in args.subscribers:
                    for impl in IMPLS:
                        if impl not in args.impls:
                            continue
                        r = run_measured(impl, subs, lanes, args)
                        r["rep"] = rep
                        r["invocation"] = invocation
                        print(f"rep {rep} {fmt(r)}", flush=True)
                        results.append(r)
    table, clean = summarise(results, args)
    print()
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(table)
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return 0 if clean else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CI size: N=300, 1 repetition, few cells")
    p.add_argument("--events", "-n", type=int, default=20_000, help="raw events N (20000)")
    p.add_argument("--repeat", "-r", type=int, default=3, help="repetitions per cell (3)")
    p.add_argument("--subscribers", "-s", default="1,4,16", help="comma-separated S (1,4,16)")
    p.add_argument("--lanes", "-l", default="1,4", help="comma-separated lane counts (1,4)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {','.join(IMPLS)}")
    p.add_argument("--database-url", default=os.environ.get("OUTBOX_BENCH_DATABASE_URL"))
    p.add_argument(
        "--airflow-python",
        default=os.environ.get("BENCH_AIRFLOW_PYTHON", sys.executable),
        help="interpreter with apache-airflow-core==3.3.2 (default: this one)",
    )
    p.add_argument(
        "--limit-batch", type=int, default=WINDOW, help="unnest: raw events per INSERT (1000)"
    )
    p.add_argument("--timeout", type=float, default=300.0, help="give up a run after this (s)")
    p.add_argument("--json", metavar="FILE", help="append one JSON line per run to FILE")
    p.add_argument(
        "--max-foreign",
        type=float,
        default=0.3,
        help="a run during which other work on the machine took more cores than this is "
        "repeated (0.3)",
    )
    p.add_argument("--retries", type=int, default=2, help="repeats of a noisy run (2)")
    p.add_argument(
        "--gc-freeze",
        action="store_true",
        help="every worker gc.freeze()s its imported heap first (sensitivity; the default, like "
        "Airflow's triggerer, does not)",
    )
    p.add_argument(
        "--summarise",
        metavar="JSONL",
        nargs="+",
        help="print the tables from the runs in these --json files (no run); per cell the "
        "--repeat least disturbed runs count",
    )
    p.add_argument("--worker", choices=("outbox", "unnest"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        if args.gc_freeze:
            import asyncpg  # noqa: F401  (the imported heap is what gets frozen)
            import sqlalchemy  # noqa: F401

            if args.worker == "outbox":
                import outbox  # noqa: F401
            gc.collect()
            gc.freeze()
        args.subscribers = int(args.subscribers)
        args.lanes = int(args.lanes)
        runner = run_outbox if args.worker == "outbox" else run_unnest
        res = asyncio.run(runner(args))
        print(json.dumps(res), flush=True)
        return 0 if res.get("clean") else 1

    if args.tiny:
        args.events, args.repeat = 300, 1
        if args.subscribers == "1,4,16":
            args.subscribers = "1,4"
        if args.lanes == "1,4":
            args.lanes = "4"
    args.subscribers = [int(x) for x in args.subscribers.split(",")]
    args.lanes = [int(x) for x in args.lanes.split(",")]
    args.impls = [x.strip() for x in args.impls.split(",")]
    unknown = set(args.impls) - set(IMPLS)
    if unknown:
        p.error(f"unknown --impls {sorted(unknown)}; choose from {list(IMPLS)}")
    if args.summarise:
        runs = []
        for name in args.summarise:
            with open(name) as f:
                runs += [json.loads(line) for line in f if line.strip()]
        args.events = max(r["events"] for r in runs)
        table, clean = summarise([r for r in runs if r["events"] == args.events], args)
        print(table)
        return 0 if clean else 1
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())

"""Prometheus metrics of a committer: what it advanced (counted as it happens), the state of the
lanes and the outbox (read from the database with status's statements), and the process's.

Lane and outbox state come from a collector: ``outbox committer`` has it read the database on
each scrape (on the committer's event loop, bounded by ``SCRAPE_TIMEOUT``), so the values are
as fresh as the scrape and nothing is read when nobody scrapes; a lane that is gone is gone
from the next scrape. Used as a library, ``refresh(store)`` reads them for the next scrapes.
Every metric is there from the start: the counters at zero, ``outbox_resolutions_total`` with
each outcome.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.registry import Collector

from outbox.display import lane_labels, readable_labels
from outbox.logs import one_line

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from wsgiref.simple_server import WSGIServer

    from prometheus_client.metrics_core import Metric

    from outbox.protocol import AdvanceOutcome
    from outbox.store import LaneStatus, OutboxStore

__all__ = ("OUTCOMES", "SCRAPE_TIMEOUT", "CommitterMetrics")

log = logging.getLogger("outbox.metrics")

OUTCOMES = ("acked", "failed", "rejected")
SCRAPE_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class _State:
    """Lane and outbox state as read from the database (``ok`` False: the read failed)."""

    ok: bool
    lanes: list[LaneStatus] = field(default_factory=list)
    undispatched: dict[str, int] = field(default_factory=dict)


async def _read(store: OutboxStore) -> _State:
    return _State(True, await store.lane_status(), await store.undispatched())


class _LaneCollector(Collector):
    """The gauges of lane and outbox state, made at each collection."""

    def __init__(self) -> None:
        self.state = _State(ok=False)
        self.live: tuple[OutboxStore, asyncio.AbstractEventLoop, int] | None = None
        self._failing = False

    def describe(self) -> list[Metric]:
        return list(self._families(_State(ok=False)))

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self._current())

    def _current(self) -> _State:
        if self.live is None:
            return self.state
        store, loop, loop_thread = self.live
        if threading.get_ident() == loop_thread or loop.is_closed():
            return self.state  # a collection on the loop itself cannot wait for it
        future = asyncio.run_coroutine_threadsafe(_read(store), loop)
        try:
            state = future.result(SCRAPE_TIMEOUT)
        except Exception as exc:
            future.cancel()
            if isinstance(exc, concurrent.futures.TimeoutError):
                reason = f"no answer within {SCRAPE_TIMEOUT:g}s"
            else:
                reason = one_line(exc)
            if not self._failing:
                log.warning("metrics cannot read the lanes' state (%s)", reason)
            self._failing = True
            return _State(ok=False)
        if self._failing:
            log.info("metrics read the lanes' state again")
        self._failing = False
        self.state = state
        return state

    @staticmethod
    def _families(state: _State) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "outbox_database_up",
            "1 if the lanes' state was read from the database for this scrape",
            value=1.0 if state.ok else 0.0,
        )
        per_stream = ["stream"]
        per_lane = ["stream", "lane"]
        recorded = GaugeMetricFamily(
            "outbox_events_recorded", "events recorded (last lane positions)", labels=per_stream
        )
        lag = GaugeMetricFamily(
            "outbox_lane_lag", "events recorded but not yet advanced", labels=per_lane
        )
        unresolved = GaugeMetricFamily(
            "outbox_lane_unresolved", "events some subscriber still owes", labels=per_lane
        )
        oldest = GaugeMetricFamily(
            "outbox_lane_oldest_pending_seconds",
            "age of the oldest unresolved event",
            labels=per_lane,
        )
        held = GaugeMetricFamily(
            "outbox_lane_held_seconds",
            "how long the lane's broker acknowledgement has been held at the event `held` "
            "(only lanes held now)",
            labels=[*per_lane, "held"],
        )
        undispatched = GaugeMetricFamily(
            "outbox_undispatched_records", "outbox records not yet dispatched", labels=per_stream
        )
        stalled = GaugeMetricFamily(
            "outbox_stalled_lanes",
            "lanes whose last advance failed or whose oldest pending event is past its ack timeout",
        )
        held_lanes = GaugeMetricFamily(
            "outbox_held_lanes", "lanes whose broker acknowledgement is held"
        )
        if state.ok:
            streams = readable_labels(
                [lane.stream for lane in state.lanes] + list(state.undispatched)
            )
            lane_names = lane_labels((lane.stream, lane.lane) for lane in state.lanes)
            totals: dict[str, int] = {}
            for lane in state.lanes:
                labels = [streams[lane.stream], lane_names[lane.stream, lane.lane]]
                totals[lane.stream] = totals.get(lane.stream, 0) + lane.last_position
                lag.add_metric(labels, lane.last_position - lane.advanced_through)
                unresolved.add_metric(labels, lane.unresolved)
                oldest.add_metric(labels, lane.oldest_pending_seconds or 0.0)
                if lane.held_identity is not None:
                    held.add_metric([*labels, lane.held_identity], lane.held_seconds or 0.0)
            for stream, total in totals.items():
                recorded.add_metric([streams[stream]], total)
            for stream, count in state.undispatched.items():
                undispatched.add_metric([streams[stream]], count)
            stalled.add_metric([], sum(lane.stalled for lane in state.lanes))
            held_lanes.add_metric([], sum(lane.held_identity is not None for lane in state.lanes))
        yield up
        yield from (recorded, lag, unresolved, oldest, held, undispatched)
        if state.ok:
            yield from (stalled, held_lanes)


class CommitterMetrics:
    """The committer's metrics, in a registry of their own (with the process's ``process_*``
    and ``python_*`` metrics), or in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        own_registry = registry is None
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.advances = Counter(
            "outbox_advances", "producer.advance calls that returned", registry=r
        )
        self.advance_failures = Counter(
            "outbox_advance_failures", "producer.advance calls that raised", registry=r
        )
        self.advanced_events = Counter(
            "outbox_advanced_events", "events advanced on the broker", registry=r
        )
        self.resolutions = Counter(
            "outbox_resolutions",
            "resolutions of advanced events, by outcome",
            ["outcome"],
            registry=r,
        )
        for outcome in OUTCOMES:
            self.resolutions.labels(outcome=outcome)
        self.advance_seconds = Histogram(
            "outbox_advance_seconds",
            "duration of producer.advance",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.last_pass = Gauge(
            "outbox_committer_last_pass_timestamp_seconds",
            "Unix time by which the committer had last completed a pass over its lanes (0: "
            "none yet)",
            registry=r,
        )
        self._lanes = _LaneCollector()
        r.register(self._lanes)
        if own_registry:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self._server: WSGIServer | None = None

    def serve(self, port: int, host: str = "127.0.0.1") -> tuple[str, int]:
        """Serve ``/metrics`` on ``host:port`` from a background thread; the address it listens
        on (port 0 picks a free port)."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        bound_host, bound_port = self._server.server_address[:2]
        return str(bound_host), int(bound_port)

    def close(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def read_on_scrape(self, store: OutboxStore, loop: asyncio.AbstractEventLoop) -> None:
        """Read the lanes' state from ``store`` on ``loop`` for each scrape, rather than from
        ``refresh``; call it on the loop's thread (scrapes come from the server's)."""
        self._lanes.live = (store, loop, threading.get_ident())

    def advanced(self, outcomes: Sequence[AdvanceOutcome], seconds: float) -> None:
        self.advances.inc()
        self.advance_seconds.observe(seconds)
        self.advanced_events.inc(len(outcomes))
        for name in OUTCOMES:
            self.resolutions.labels(outcome=name).inc(sum(getattr(o, name) for o in outcomes))

    def failed(self, seconds: float) -> None:
        self.advance_failures.inc()
        self.advance_seconds.observe(seconds)

    async def refresh(self, store: OutboxStore) -> None:
        """Read the lanes' state for the next scrapes (nothing to do when each scrape reads
        it)."""
        if self._lanes.live is None:
            self._lanes.state = await _read(store)

"""Prometheus metrics of a committer: what it advanced (counted as it happens) and the state of
the lanes and the outbox (read from the database on a refresh)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from collections.abc import Sequence

    from outbox.protocol import AdvanceOutcome
    from outbox.store import OutboxStore

__all__ = ("CommitterMetrics",)


class CommitterMetrics:
    """The committer's metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
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
        self.advance_seconds = Histogram(
            "outbox_advance_seconds",
            "duration of producer.advance",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.events_recorded = Gauge(
            "outbox_events_recorded",
            "events recorded (last lane positions)",
            ["stream"],
            registry=r,
        )
        self.lane_lag = Gauge(
            "outbox_lane_lag",
            "events recorded but not yet advanced",
            ["stream", "lane"],
            registry=r,
        )
        self.lane_unresolved = Gauge(
            "outbox_lane_unresolved",
            "events some subscriber still owes",
            ["stream", "lane"],
            registry=r,
        )
        self.oldest_pending = Gauge(
            "outbox_lane_oldest_pending_seconds",
            "age of the oldest unresolved event",
            ["stream", "lane"],
            registry=r,
        )
        self.stalled_lanes = Gauge(
            "outbox_stalled_lanes",
            "lanes whose last advance failed or whose oldest pending event is past its ack timeout",
            registry=r,
        )
        self.held_seconds = Gauge(
            "outbox_lane_held_seconds",
            "how long the lane's broker acknowledgement has been held at the event `held` "
            "(only lanes held now)",
            ["stream", "lane", "held"],
            registry=r,
        )
        self.held_lanes = Gauge(
            "outbox_held_lanes", "lanes whose broker acknowledgement is held", registry=r
        )
        self.undispatched = Gauge(
            "outbox_undispatched_records",
            "outbox records not yet dispatched",
            ["stream"],
            registry=r,
        )

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve ``/metrics`` on ``port`` from a background thread."""
        start_http_server(port, addr=addr, registry=self.registry)

    def advanced(self, outcomes: Sequence[AdvanceOutcome], seconds: float) -> None:
        self.advances.inc()
        self.advance_seconds.observe(seconds)
        self.advanced_events.inc(len(outcomes))
        for name in ("acked", "failed", "rejected"):
            self.resolutions.labels(outcome=name).inc(sum(getattr(o, name) for o in outcomes))

    def failed(self, seconds: float) -> None:
        self.advance_failures.inc()
        self.advance_seconds.observe(seconds)

    async def refresh(self, store: OutboxStore) -> None:
        """Read lane and outbox state from the database into the gauges."""
        lanes = await store.lane_status()
        recorded: dict[str, int] = {}
        for lane in lanes:
            labels = {"stream": lane.stream, "lane": lane.lane}
            recorded[lane.stream] = recorded.get(lane.stream, 0) + lane.last_position
            self.lane_lag.labels(**labels).set(lane.last_position - lane.advanced_through)
            self.lane_unresolved.labels(**labels).set(lane.unresolved)
            self.oldest_pending.labels(**labels).set(lane.oldest_pending_seconds or 0.0)
        for stream, count in recorded.items():
            self.events_recorded.labels(stream=stream).set(count)
        self.stalled_lanes.set(sum(lane.stalled for lane in lanes))
        self.held_seconds.clear()  # a hold that ended (or moved to another event) goes
        for lane in lanes:
            if lane.held_identity is not None:
                self.held_seconds.labels(
                    stream=lane.stream, lane=lane.lane, held=lane.held_identity
                ).set(lane.held_seconds or 0.0)
        self.held_lanes.set(sum(lane.held_identity is not None for lane in lanes))
        for stream, count in (await store.undispatched()).items():
            self.undispatched.labels(stream=stream).set(count)

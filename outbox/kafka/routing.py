"""Where ``advance`` sends what not every subscriber accepted: ``RoutingPolicy``, and the flood
guard that stalls a lane (``DeadLetterFlood``) rather than dead-letter it whole."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from collections.abc import Sequence

    from outbox.protocol import AdvanceOutcome

__all__ = ("DeadLetterFlood", "FloodGuard", "RoutingPolicy")


class DeadLetterFlood(RuntimeError):
    """Too many events of a lane would be dead-lettered at once (a bad deploy?): the lane
    stalls instead, until the subscribers are fixed or the limits raised."""


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    """What ``advance`` does with events that were not accepted by every subscriber.

    :param rejected: ``"dead-letter"`` (produce to the dead-letter topic, commit past) or
        ``"drop"`` (commit past); unless another subscriber failed the message: ``failed``
        decides then.
    :param failed: ``"hold"`` (do not commit past; read again, see ``outbox.kafka``'s
        docstring) or ``"dead-letter"``.
    :param unsubscribed: for an event nobody was subscribed to: ``"hold"`` or ``"commit"``.
    :param flood_run: stall the lane when this many consecutive events would be dead-lettered.
    :param flood_ratio: stall the lane when more than this share of the last ``flood_window``
        events would be dead-lettered (checked once ``flood_window`` events were seen).
    """

    rejected: Literal["dead-letter", "drop"] = "dead-letter"
    failed: Literal["hold", "dead-letter"] = "hold"
    unsubscribed: Literal["hold", "commit"] = "hold"
    flood_run: int | None = 100
    flood_ratio: float | None = 0.5
    flood_window: int = 1000

    def __post_init__(self) -> None:
        if self.rejected not in ("dead-letter", "drop"):
            raise ValueError(f"rejected must be 'dead-letter' or 'drop', got {self.rejected!r}")
        if self.failed not in ("hold", "dead-letter"):
            raise ValueError(f"failed must be 'hold' or 'dead-letter', got {self.failed!r}")
        if self.unsubscribed not in ("hold", "commit"):
            raise ValueError(f"unsubscribed must be 'hold' or 'commit', got {self.unsubscribed!r}")

    def route(self, outcome: AdvanceOutcome) -> Literal["commit", "dead-letter", "hold"]:
        # A failure decides first: a message one subscriber rejected and another failed is
        # held (or dead-lettered) for the one that failed it, never committed past as a reject
        # (that subscriber would not get it again). Read again, the rejection is carried over,
        # and the message is routed as rejected once the others have resolved it.
        if outcome.failed:
            return "dead-letter" if self.failed == "dead-letter" else "hold"
        if outcome.rejected:
            return "dead-letter" if self.rejected == "dead-letter" else "commit"
        if outcome.acked == 0:
            return "hold" if self.unsubscribed == "hold" else "commit"
        return "commit"


class FloodGuard:
    """Counts, per lane, the recent events that were dead-lettered (a running count over the
    window: an advance costs its batch, not its batch times the window)."""

    def __init__(self, policy: RoutingPolicy) -> None:
        self.policy = policy
        self.run: dict[tuple[str, int], int] = {}
        self.window: dict[tuple[str, int], deque[bool]] = {}
        self.dead: dict[tuple[str, int], int] = {}  # how many of the window were dead-lettered

    def check(self, lane: tuple[str, int], routes: Sequence[bool]) -> None:
        """Raise ``DeadLetterFlood`` if ``routes`` (True = dead-letter) would pass a limit."""
        if not any(routes):
            return  # nothing dead-lettered: both measures can only fall
        policy = self.policy
        run = self.run.get(lane, 0)
        window = deque(self.window.get(lane, ()), maxlen=policy.flood_window)
        dead = self.dead.get(lane, 0)
        for is_dead in routes:
            run = run + 1 if is_dead else 0
            if len(window) == policy.flood_window:
                dead -= window[0]
            window.append(is_dead)
            dead += is_dead
            if policy.flood_run is not None and run >= policy.flood_run:
                raise DeadLetterFlood(
                    f"lane {lane}: {run} consecutive events would be dead-lettered (limit "
                    f"{policy.flood_run}); fix the subscribers, or raise flood_run"
                )
            if (
                policy.flood_ratio is not None
                and len(window) == policy.flood_window
                and dead / len(window) > policy.flood_ratio
            ):
                raise DeadLetterFlood(
                    f"lane {lane}: {dead} of the last {len(window)} events would be "
                    f"dead-lettered (limit {policy.flood_ratio:.0%}); fix the subscribers, "
                    "or raise flood_ratio"
                )

    def record(self, lane: tuple[str, int], routes: Sequence[bool]) -> None:
        run = self.run.get(lane, 0)
        window = self.window.setdefault(lane, deque(maxlen=self.policy.flood_window))
        dead = self.dead.get(lane, 0)
        full = self.policy.flood_window
        for is_dead in routes:
            run = run + 1 if is_dead else 0
            if len(window) == full:
                dead -= window[0]
            window.append(is_dead)
            dead += is_dead
        self.run[lane] = run
        self.dead[lane] = dead

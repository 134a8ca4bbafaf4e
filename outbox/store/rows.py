"""What the store takes and returns on the hot paths: events to record, resolutions, leases,
ready lanes and advanced batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, NamedTuple, TypeAlias

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from outbox.core import (
        LaneEvent,
    )


@dataclass(slots=True)
class EventToRecord:
    """One event as the manager stages it, before its lane position is allocated.

    ``snapshot``: who must resolve it. ``None`` (what the manager stages): the stream's
    subscribers registered at the moment Postgres records it, on whichever triggerer. A list of
    names (tests, tools) records them owed through no known registration: such deliveries end by
    the ack timeout alone.
    """

    stream_id: int
    lane_id: int
    identity: str | None
    raw_json: str | None
    payload_json: str
    snapshot: Sequence[str] | None = None
    # Filled by ``record_events``:
    event_id: int = 0
    deliver_to: Sequence[str] = ()
    # The registrations in force when it was recorded, by subscriber name (shared by the events
    # of a stream in one batch): a subscriber here is handed the event only through its own.
    owners: Mapping[str, int] = field(default_factory=dict)
    # A redelivery of an occurrence still pending: it is handed to those who still owe it.
    reused: bool = False


class ResolutionRow(NamedTuple):
    """One subscriber's resolution of one event, with the trigger events it derived."""

    stream_id: int
    event_id: int
    subscriber: str
    state: str
    reason: str | None
    records: Sequence[str] = ()
    # Never stored: whose trigger events these are, for the writer's ``on_resolved``.
    owner: int | None = None


# A resolution as the store and the writer take it: a ``ResolutionRow``, or a plain tuple of the
# same seven fields, which is what the manager queues. The cyclic garbage collector stops tracking
# a plain tuple once it has seen that it holds only numbers, strings and such tuples (never a
# ``NamedTuple``): the thousands of resolutions waiting for their commit at any time are then not
# visited again by each collection, and do not push the oldest generation into full collections
# (they were two fifths of what reached it, none since: 19,493 -> 20,699 events/s at S = 4, median
# of 6 alternating pairs, every pair faster; fifth pass in bench/results/history.md).
Resolution: TypeAlias = "tuple[int, int, str, str, str | None, Sequence[str], int | None]"
# Its fields by position.
STREAM_ID: Final = 0
EVENT_ID: Final = 1
SUBSCRIBER: Final = 2
STATE: Final = 3
REASON: Final = 4
RECORDS: Final = 5
OWNER: Final = 6


@dataclass(frozen=True, slots=True)
class LaneLease:
    lane_id: int
    stream_id: int
    lane_key: str
    advanced_through: int
    fencing_token: int
    attempts: int


@dataclass(slots=True)
class ReadyLane:
    """A lane whose next event is resolved: its cursor and the resolved events after it."""

    lane_id: int
    advanced_through: int
    events: list[LaneEvent]
    # How many times a redelivery had changed one of the lane's events when it was read.
    rewrites: int = 0


class AdvancedBatch(NamedTuple):
    """What a committer advanced on one lane, for its cursor move."""

    lease: LaneLease
    rewrites: int  # the lane's ``rewrites`` read with the events
    events: Sequence[LaneEvent]
    held: str | None = None  # the identity the lane's broker acknowledgement is held at

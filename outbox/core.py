"""Pure decisions: canonical keys, redelivery plans, lane prefixes, retry and lease timing.

Nothing here does I/O or reads a clock; callers pass time in.
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Hashable, Iterable, Mapping, Sequence

__all__ = (
    "ACKED",
    "FAILED",
    "REJECTED",
    "LaneEvent",
    "PriorOccurrence",
    "RedeliveryPlan",
    "State",
    "backoff_delay",
    "canonical_json",
    "contiguous_resolved_prefix",
    "is_expired",
    "plan_redelivery",
    "short_repr",
    "storable_key",
    "timeout_cadence",
)

State = Literal["acked", "rejected", "failed"]
ACKED: Final = "acked"
REJECTED: Final = "rejected"
FAILED: Final = "failed"
SETTLED_STATES: Final = frozenset({ACKED, REJECTED})
# Why the sweep fails a delivery of an event without identity whose reader died: the broker
# delivers the message again, as a new event. A subscriber handed the old one meanwhile did
# nothing wrong: its resolution of the old event is dropped, and it gets the new one.
BROKER_REDELIVERS: Final = "the triggerer that read it is gone; the broker delivers it again"
# Why the sweep fails a delivery owed through a registration that is gone. When the subscriber's
# current registration is the one it was handed through, the failure was meant for an earlier
# one (an event recorded on another triggerer while it joined again): it goes on, and the
# producer's failure handling decides whether the message comes back (Kafka: held, read again).
REGISTRATION_GONE: Final = "its subscriber left, or joined again"
# Why the sweep fails a delivery whose ack timeout passed by the database clock (counted from
# when the event was recorded: a lane is never held longer than that).
DATABASE_CLOCK_TIMEOUT: Final = "ack timeout (database clock)"
# What a subscriber whose resolution lost finds when it looks (a moment later) and no failure or
# rejection of its delivery is recorded any more: the winner was an acceptance (an earlier
# process of the subscriber stored its trigger events), or a redelivery of the held message
# re-opened the delivery since (it is owed again and handed out again). Every failure records
# its reason, so this is never a failure of the subscriber's own.
NO_FAILURE_LEFT: Final = "no failure recorded any more"

# What a subscriber does when another resolution of its delivery won over its own.
LostDelivery = Literal["moved", "goes on", "ack timeout"]


def after_lost_delivery(
    *,
    registration: int | None,
    current: int | None,
    reason: str | None,
    recorded_before_join: bool,
) -> LostDelivery:
    """Why a subscriber's resolution lost, as what it does next: ``moved`` (it joined the stream
    on another triggerer since: it leaves this one quietly), ``goes on`` (the failure was not its
    own: the broker delivers the message again, the failure was meant for an earlier
    registration, or the delivery came with its join from an earlier registration and the
    database clock failed it: its ack timeout, counted from the recording, or the session it is
    owed through, ran out before it could finish it), or ``ack timeout`` (it held an event of
    its own registration past the ack timeout, or its triggerer's session was failed)."""
    if registration is not None and current is not None and current != registration:
        return "moved"
    if reason == BROKER_REDELIVERS:
        return "goes on"
    own_registration = current is not None and current == registration
    if reason == REGISTRATION_GONE and own_registration:
        return "goes on"
    if reason == DATABASE_CLOCK_TIMEOUT and own_registration and recorded_before_join:
        return "goes on"
    if reason == NO_FAILURE_LEFT and own_registration:
        return "goes on"
    return "ack timeout"


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("mapping keys must be strings")
        return {k: _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"{value!r} has no JSON form")
        return value
    raise TypeError(f"values of type {type(value).__name__} have no canonical JSON form")


def canonical_json(value: Hashable | Any, *, what: str) -> str:
    """Canonical JSON text of a stream key or lane value (tuples become lists, keys sorted).

    Raises ``TypeError`` naming ``what`` when the value is made of anything but JSON scalars,
    lists, tuples and string-keyed mappings.
    """
    try:
        return json.dumps(_jsonable(value), sort_keys=True, separators=(",", ":"))
    except (TypeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise TypeError(
            f"{what} {short_repr(value)} cannot be stored ({reason}); "
            "use JSON scalars, lists and tuples"
        ) from None


# Stream keys, lane keys and event identities are indexed (btree): keep each well under the
# largest entry Postgres can index (about 2,700 bytes).
MAX_KEY_BYTES: Final = 2000


def storable_key(text: str, *, what: str) -> str:
    """``text`` if Postgres can store and index it as a key; else a one-line ``TypeError``
    naming ``what`` and the fix."""
    problem = None
    if "\x00" in text:
        problem = "contains a NUL character"
    else:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            problem = "is not valid Unicode (lone surrogate)"
        else:
            if size > MAX_KEY_BYTES:
                problem = f"is {size} bytes, more than the {MAX_KEY_BYTES} a key may have"
    if problem is not None:
        raise TypeError(
            f"{what} {short_repr(text)} {problem}; use a short text (e.g. a hash of the value)"
        )
    return text


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 3, 60, 60, 40


def short_repr(value: Any) -> str:
    """``repr(value)``, cut short (long strings, deep or wide structures) for one-line errors."""
    try:
        return _SHORT.repr(value)
    except Exception:
        return f"<{type(value).__name__}>"


@dataclass(frozen=True, slots=True)
class PriorOccurrence:
    """An earlier recording of the same event identity, as the database holds it."""

    event_id: int
    advanced: bool
    pending: int
    snapshot: Sequence[str]
    states: Mapping[str, str]


@dataclass(slots=True)
class RedeliveryPlan:
    """What to do with an event as it arrives, given its earlier occurrences.

    ``reuse_event_id`` set: deliver to ``deliver_to`` as part of that unadvanced occurrence,
    adding ``add_to_snapshot`` and re-opening ``reopen_failed``. Otherwise record a new
    occurrence with ``snapshot``, deliver to ``deliver_to``, and store ``carried`` (subscribers
    that already accepted or rejected the identity) as resolved without delivering.
    """

    snapshot: list[str]
    deliver_to: list[str]
    reuse_event_id: int | None = None
    add_to_snapshot: list[str] = field(default_factory=list)
    reopen_failed: list[str] = field(default_factory=list)
    carried: dict[str, str] = field(default_factory=dict)


def plan_redelivery(snapshot: Sequence[str], prior: Iterable[PriorOccurrence]) -> RedeliveryPlan:
    """Decide who gets an arriving event, so that each (identity, subscriber) that accepted or
    rejected it once never gets it again.

    An occurrence that is not advanced yet is reused: its lane position stays, so the lane keeps
    the broker's order and nothing overtakes it, and its payload is refreshed. Once advanced, a
    redelivery becomes a new occurrence at the end of the lane.
    """
    occurrences = sorted(prior, key=lambda o: o.event_id)
    settled: dict[str, str] = {}
    for occurrence in occurrences:
        for subscriber, state in occurrence.states.items():
            if state in SETTLED_STATES:
                settled.setdefault(subscriber, state)
    open_occurrence = next((o for o in reversed(occurrences) if not o.advanced), None)
    if open_occurrence is None:
        carried = {s: settled[s] for s in snapshot if s in settled}
        return RedeliveryPlan(
            snapshot=list(snapshot),
            deliver_to=[s for s in snapshot if s not in settled],
            carried=carried,
        )
    members = set(open_occurrence.snapshot)
    plan = RedeliveryPlan(
        snapshot=list(open_occurrence.snapshot),
        deliver_to=[],
        reuse_event_id=open_occurrence.event_id,
    )
    for subscriber in snapshot:
        if subscriber in settled:
            continue
        if subscriber not in members:
            plan.add_to_snapshot.append(subscriber)
        elif open_occurrence.states.get(subscriber) == FAILED:
            plan.reopen_failed.append(subscriber)
        plan.deliver_to.append(subscriber)
    plan.snapshot.extend(plan.add_to_snapshot)
    return plan


class LaneEvent(NamedTuple):
    """An event of a lane after its cursor, as the committer reads it (a tuple: one is made
    per event and pass)."""

    event_id: int
    position: int
    pending: int
    acked: int
    failed: int
    rejected: int
    payload: Any
    # Read without identity by a triggerer that is gone: passed over, not advanced (the broker
    # delivers the message again, as a later event).
    superseded: bool = False


def contiguous_resolved_prefix(
    events: Iterable[LaneEvent], advanced_through: int
) -> list[LaneEvent]:
    """The events right after the cursor, in position order, up to the first unresolved one.

    Stops at a gap in positions too: a position not yet committed by its writer may still
    arrive, and nothing may overtake it.
    """
    prefix: list[LaneEvent] = []
    expected = advanced_through + 1
    for item in sorted(events, key=lambda e: e.position):
        if item.position != expected or item.pending > 0:
            break
        prefix.append(item)
        expected += 1
    return prefix


def backoff_delay(attempts: int, *, base: float = 0.5, cap: float = 60.0) -> float:
    """Seconds to wait before retry number ``attempts`` (1-based): doubling from ``base``,
    never above ``cap``."""
    if attempts <= 0:
        return 0.0
    return min(cap, base * 2.0 ** min(attempts - 1, 62))


def timeout_cadence(ack_timeout: float) -> float:
    """How often the ack-timeout check runs: a tenth of the timeout, at least every 10 ms."""
    return max(0.01, ack_timeout / 10)


def is_expired(now: float, broadcast_at: float, ack_timeout: float) -> bool:
    """Whether an event broadcast at ``broadcast_at`` timed out at ``now`` (inclusive)."""
    return now - broadcast_at >= ack_timeout

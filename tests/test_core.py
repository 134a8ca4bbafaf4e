"""Property tests of the pure core: keys, redelivery plans, lane prefixes, timing decisions."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outbox import AdvanceOutcome
from outbox.core import (
    ACKED,
    BROKER_REDELIVERS,
    DATABASE_CLOCK_TIMEOUT,
    FAILED,
    NO_FAILURE_LEFT,
    REGISTRATION_GONE,
    REJECTED,
    LaneEvent,
    PriorOccurrence,
    after_lost_delivery,
    backoff_delay,
    canonical_json,
    contiguous_resolved_prefix,
    is_expired,
    plan_redelivery,
    timeout_cadence,
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(json_values)
def test_canonical_json_is_valid_json_and_stable(value: object) -> None:
    text = canonical_json(value, what="key")
    assert canonical_json(json.loads(text), what="key") == text


@given(st.dictionaries(st.text(max_size=5), st.integers(), min_size=2, max_size=6))
def test_canonical_json_ignores_mapping_order(mapping: dict[str, int]) -> None:
    reordered = dict(reversed(list(mapping.items())))
    assert canonical_json(mapping, what="k") == canonical_json(reordered, what="k")


def test_canonical_json_treats_tuples_as_lists() -> None:
    assert canonical_json(("queue", "q", 1), what="k") == canonical_json(
        ["queue", "q", 1], what="k"
    )


@pytest.mark.parametrize("bad", [object(), {1: "x"}, float("nan"), b"bytes", {"s": {1, 2}}])
def test_canonical_json_rejects_values_without_a_json_form(bad: object) -> None:
    with pytest.raises(TypeError, match=r"^lane .* cannot be stored"):
        canonical_json(bad, what="lane")


subscribers = st.sampled_from(["a", "b", "c", "d", "e"])
states = st.sampled_from([ACKED, REJECTED, FAILED])


@st.composite
def occurrences(draw: st.DrawFn) -> list[PriorOccurrence]:
    count = draw(st.integers(0, 3))
    result = []
    for event_id in range(1, count + 1):
        snapshot = draw(st.lists(subscribers, unique=True, max_size=5))
        resolved = draw(st.dictionaries(st.sampled_from(snapshot), states)) if snapshot else {}
        pending = len(snapshot) - len(resolved)
        advanced = pending == 0 and draw(st.booleans())
        result.append(PriorOccurrence(event_id, advanced, pending, snapshot, resolved))
    return result


@given(st.lists(subscribers, unique=True, max_size=5), occurrences())
def test_redelivery_never_reaches_a_subscriber_that_settled(
    snapshot: list[str], prior: list[PriorOccurrence]
) -> None:
    plan = plan_redelivery(snapshot, prior)
    settled = {s for o in prior for s, state in o.states.items() if state in (ACKED, REJECTED)}
    assert not settled & set(plan.deliver_to)
    assert set(plan.deliver_to) == set(snapshot) - settled
    assert len(plan.deliver_to) == len(set(plan.deliver_to))


@given(st.lists(subscribers, unique=True, max_size=5), occurrences())
def test_redelivery_reuses_only_an_open_occurrence(
    snapshot: list[str], prior: list[PriorOccurrence]
) -> None:
    plan = plan_redelivery(snapshot, prior)
    open_ids = [o.event_id for o in prior if not o.advanced]
    if open_ids:
        assert plan.reuse_event_id == max(open_ids)
        reused = next(o for o in prior if o.event_id == plan.reuse_event_id)
        assert set(plan.add_to_snapshot) == set(plan.deliver_to) - set(reused.snapshot)
        assert set(plan.reopen_failed) <= {s for s, st_ in reused.states.items() if st_ == FAILED}
        assert not plan.carried
    else:
        assert plan.reuse_event_id is None
        assert plan.snapshot == snapshot
        assert set(plan.carried) | set(plan.deliver_to) == set(snapshot)
        assert all(state in (ACKED, REJECTED) for state in plan.carried.values())


def test_redelivery_carries_earlier_accepts_into_the_outcome() -> None:
    prior = [PriorOccurrence(1, True, 0, ["a", "b"], {"a": ACKED, "b": FAILED})]
    plan = plan_redelivery(["a", "b", "c"], prior)
    assert plan.reuse_event_id is None
    assert plan.deliver_to == ["b", "c"]
    assert plan.carried == {"a": ACKED}


def _lane(draw: st.DrawFn) -> tuple[int, list[LaneEvent]]:
    cursor = draw(st.integers(0, 5))
    positions = draw(st.lists(st.integers(cursor + 1, cursor + 12), unique=True, max_size=10))
    events = [
        LaneEvent(p, p, draw(st.integers(0, 2)) if draw(st.booleans()) else 0, 1, 0, 0, p)
        for p in positions
    ]
    return cursor, events


lanes = st.composite(_lane)


@given(lanes(), st.randoms())
def test_prefix_is_contiguous_resolved_and_maximal(
    lane: tuple[int, list[LaneEvent]], rnd: object
) -> None:
    cursor, events = lane
    shuffled = list(events)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    prefix = contiguous_resolved_prefix(shuffled, cursor)
    assert [e.position for e in prefix] == list(range(cursor + 1, cursor + 1 + len(prefix)))
    assert all(e.pending == 0 for e in prefix)
    following = {e.position: e for e in events}.get(cursor + 1 + len(prefix))
    assert following is None or following.pending > 0


@given(st.integers(0, 80), st.integers(0, 80))
def test_backoff_grows_and_is_capped(a: int, b: int) -> None:
    low, high = sorted((a, b))
    assert backoff_delay(low) <= backoff_delay(high) <= 60.0
    assert backoff_delay(0) == 0.0


def test_ack_timeout_boundary_is_inclusive_and_cadence_has_a_floor() -> None:
    assert is_expired(0.1, 0.0, 0.1)
    assert not is_expired(0.099, 0.0, 0.1)
    assert timeout_cadence(0.05) == 0.01
    assert timeout_cadence(0.2) == pytest.approx(0.02)


@pytest.mark.parametrize(
    ("outcome", "clean"),
    [
        (AdvanceOutcome(2, 0, 0), True),
        (AdvanceOutcome(2, 0, 1), False),
        (AdvanceOutcome(2, 1, 0), False),
        (AdvanceOutcome(0, 0, 0), False),
        (AdvanceOutcome(0, 0), False),
    ],
)
def test_is_clean_requires_an_accept_and_no_reject_or_failure(
    outcome: AdvanceOutcome, clean: bool
) -> None:
    assert outcome.is_clean is clean
    assert AdvanceOutcome(acked=1, failed=0) == AdvanceOutcome(1, 0, 0)


@pytest.mark.parametrize(
    ("registration", "current", "reason", "recorded_before_join", "verdict"),
    [
        # It joined the stream on another triggerer since: it leaves this one.
        (7, 9, None, False, "moved"),
        (7, 9, DATABASE_CLOCK_TIMEOUT, True, "moved"),
        # The broker delivers the message again: not its failure.
        (7, 7, BROKER_REDELIVERS, False, "goes on"),
        (None, None, BROKER_REDELIVERS, False, "goes on"),
        # Meant for an earlier registration of it.
        (7, 7, REGISTRATION_GONE, False, "goes on"),
        (7, None, REGISTRATION_GONE, False, "ack timeout"),
        # Came with its join and ran out of time before it could finish it.
        (7, 7, DATABASE_CLOCK_TIMEOUT, True, "goes on"),
        # Its own delivery, held past the ack timeout.
        (7, 7, DATABASE_CLOCK_TIMEOUT, False, "ack timeout"),
        (7, None, DATABASE_CLOCK_TIMEOUT, True, "ack timeout"),
        # Failed with its triggerer's session, or no reason recorded.
        (7, 7, None, False, "ack timeout"),
        (7, 7, "unsubscribed before pulling", True, "ack timeout"),
        # No failure left when it looks: accepted by an earlier process of it, or re-opened by
        # a redelivery since (owed again): not its failure.
        (7, 7, NO_FAILURE_LEFT, False, "goes on"),
        (7, 7, NO_FAILURE_LEFT, True, "goes on"),
        (7, None, NO_FAILURE_LEFT, False, "ack timeout"),
    ],
)
def test_what_a_subscriber_does_when_its_resolution_lost(
    registration: int | None,
    current: int | None,
    reason: str | None,
    recorded_before_join: bool,
    verdict: str,
) -> None:
    assert (
        after_lost_delivery(
            registration=registration,
            current=current,
            reason=reason,
            recorded_before_join=recorded_before_join,
        )
        == verdict
    )

"""Where ``KafkaSharedStreamProducer.advance`` commits when a batch mixes messages read again
after a restart with new ones (regressions found by the end-to-end crash test)."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from outbox.kafka import KafkaSharedStreamProducer
from tests.test_kafka import ACK, FAIL, committed, create_topic, items

if TYPE_CHECKING:
    from outbox import AdvanceOutcome


def run(*offsets: int, outcome: AdvanceOutcome = ACK) -> list[tuple[int, AdvanceOutcome]]:
    return [(o, outcome) for o in offsets]


async def advance_all(
    bootstrap: str, batches: list[list[tuple[int, AdvanceOutcome]]], **options: Any
) -> dict[int, int | None]:
    topic = await create_topic(bootstrap)
    group = f"g-{uuid.uuid4().hex[:8]}"
    producer = KafkaSharedStreamProducer(
        [topic], bootstrap_servers=bootstrap, group_id=group, **options
    )
    try:
        for batch in batches:
            await producer.advance(items(*batch, topic=topic))
    finally:
        await producer.aclose()
    return await committed(bootstrap, group, topic, 1)


async def test_a_batch_ending_with_messages_read_again_commits_through_the_newest(
    kafka_bootstrap: str,
) -> None:
    # A triggerer died with 10..14 resolved but not advanced, 15..19 owed; its successor read
    # from 10 again: 10..14 came back as new occurrences (after 15..19, which it reused), so
    # the lane's batch ends with lower offsets than it holds. It used to commit 15 (last + 1),
    # and then every later batch looked held behind 15 for good.
    batches = [run(*range(10)), run(*range(10, 20), *range(10, 15)), run(*range(20, 30))]
    assert await advance_all(kafka_bootstrap, batches) == {0: 30}


async def test_a_hold_before_a_run_read_again_is_passed_once_the_held_message_is_handled(
    kafka_bootstrap: str,
) -> None:
    batches = [
        [*run(0, 1), (2, FAIL), *run(3, 4, 5)],  # 2 is held: commit 2
        run(6, 7),  # handled while 2 is held: no commit past 2
        run(2),  # read again and handled: everything up to 7 was handled once, commit 8
    ]
    assert await advance_all(kafka_bootstrap, batches) == {0: 8}
    batches.append(run(3, 4, 5, 6, 7, 8))  # the rest read again too: never backwards
    assert await advance_all(kafka_bootstrap, batches) == {0: 9}


async def test_a_first_batch_out_of_order_never_commits_past_messages_still_owed(
    kafka_bootstrap: str,
) -> None:
    # Nothing committed yet; after a restart the lane carries 5..7 (reused) before 0..4.
    batches = [run(5, 6, 7)]
    assert await advance_all(kafka_bootstrap, batches) == {0: None}
    batches.append(run(0, 1, 2, 3, 4))
    assert await advance_all(kafka_bootstrap, batches) == {0: 8}


async def test_without_contiguous_offsets_a_remembered_hold_needs_the_held_message(
    kafka_bootstrap: str,
) -> None:
    batches = [
        [*run(0), (1, FAIL), *run(2)],  # held at 1
        run(0),  # an old message advanced again does not release the hold
        run(3, 4),
    ]
    assert await advance_all(kafka_bootstrap, batches, contiguous_offsets=False) == {0: 1}
    batches.append(run(1, 2, 3, 4, 5))
    assert await advance_all(kafka_bootstrap, batches, contiguous_offsets=False) == {0: 6}

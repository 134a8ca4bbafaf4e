"""The seed's SQS-like producer (``examples/sqs_like.py``, unchanged) through the manager and a
standalone ``LaneCommitter``, on the in-memory fake SQS.

The manager runs without its own committer (``run_committer=False``); the committer runs in the
same process with a producer instance of its own handed in by stream key (its client reaches the
same in-memory queue, as a separate connection would reach the same real one). One subscriber
fails the first delivery of some messages (its filter raises; like a triggerer restarting a
crashed trigger, the test unsubscribes and subscribes it again). Deletes must happen only for
clean events; the others stay in the queue, come back after the visibility timeout and are then
handled by everyone.

The seed's producer gives no event identity (its payload is the receipt handle only), so a
redelivered message is a new event for every subscriber: those that accepted it the first time
store its trigger events again. The test checks exactly that (records per event, not per
message).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import TYPE_CHECKING, Any, ClassVar

import pytest
import sqlalchemy as sa

from examples import fake_brokers
from examples.sqs_like import SqsSharedStreamProducer, SqsSharedTrigger
from outbox import AdvanceItem, LaneCommitter, SharedStreamManager, TriggerEvent
from tests.polling import eventually

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from outbox import AdvanceOutcome, OutboxStore

QUEUE_URL = "https://sqs.example/queue/e2e"
KEY = ("sqs", QUEUE_URL)
MESSAGES = 40
VISIBILITY = 3.0


class PickyTrigger(SqsSharedTrigger):
    """Joins the same stream; its filter raises on the first delivery of every message whose
    ``order % 10 == 1``, and handles it when it comes back. Each crash also fails the events
    queued for it (never pulled), which come back too."""

    SEEN: ClassVar[set[int]] = set()

    async def filter_shared_stream(
        self, shared_stream: AsyncIterator[Any]
    ) -> AsyncIterator[TriggerEvent]:
        async for raw in shared_stream:
            order = int(raw["order"])
            if order % 10 == 1 and order not in self.SEEN:
                self.SEEN.add(order)
                raise RuntimeError(f"picky trigger cannot handle order {order} yet")
            yield TriggerEvent(raw)


class RecordingSqsProducer(SqsSharedStreamProducer):
    """The committer's instance: records every ``(receipt handle, outcome)`` it advances."""

    def __init__(self, queue_url: str) -> None:
        super().__init__(queue_url)
        self.advanced: list[tuple[str, AdvanceOutcome]] = []

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        self.advanced.extend((handle, outcome) for handle, outcome in batch)
        await super().advance(batch)


@pytest.fixture
def sqs(monkeypatch: pytest.MonkeyPatch) -> fake_brokers.FakeSqs:
    service = fake_brokers.FakeSqs(visibility_timeout=VISIBILITY)
    monkeypatch.setattr(fake_brokers, "SQS", service)
    monkeypatch.setattr(PickyTrigger, "SEEN", set())
    return service


async def test_sqs_deletes_only_clean_events_and_redelivers_the_rest(
    store: OutboxStore, sqs: fake_brokers.FakeSqs
) -> None:
    regions = ("us", "eu")
    for i in range(MESSAGES):
        sqs.send(QUEUE_URL, {"order": i, "region": regions[i % 2]})
    producer = RecordingSqsProducer(QUEUE_URL)
    producer.client = await fake_brokers.create_sqs_client()
    committer = LaneCommitter(store, producers={KEY: producer}, poll_interval=0.1)
    committing = asyncio.create_task(committer.run())
    received: Counter[tuple[str, int]] = Counter()
    failures: list[str] = []

    async def drain(name: str, events: AsyncIterator[TriggerEvent]) -> None:
        async for event in events:
            received[name, event.payload["order"]] += 1

    manager = SharedStreamManager(store, ack_timeout=30.0, run_committer=False)

    async def picky() -> None:
        """Runs the picky trigger; when it crashes, a new instance joins before the crashed
        one leaves, so every event has a picky subscriber in its snapshot."""
        generation = 0
        events = manager.subscribe(trigger_id="picky-0", trigger=PickyTrigger(queue_url=QUEUE_URL))
        while True:
            try:
                await drain("picky", events)
                return
            except RuntimeError as exc:
                failures.append(str(exc))
                generation += 1
                events = manager.subscribe(
                    trigger_id=f"picky-{generation}", trigger=PickyTrigger(queue_url=QUEUE_URL)
                )
                await manager.unsubscribe(f"picky-{generation - 1}", KEY)

    tasks = [
        asyncio.create_task(drain(name, manager.subscribe(trigger_id=name, trigger=trigger)))
        for name, trigger in (
            ("all", SqsSharedTrigger(queue_url=QUEUE_URL)),  # first: the stream's class
            ("eu", SqsSharedTrigger(queue_url=QUEUE_URL, region="eu")),
        )
    ]
    tasks.append(asyncio.create_task(picky()))
    try:

        async def done() -> bool:
            if sqs.remaining(QUEUE_URL):
                return False
            async with store.engine.connect() as conn:
                behind = await conn.scalar(
                    sa.text(
                        "SELECT count(*) FROM outbox_lane "
                        "WHERE advanced_through <> next_position - 1"
                    )
                )
            return bool(behind == 0)

        await eventually(done, within=60, interval=0.1)
    finally:
        await manager.stop_all()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        committer.request_stop()
        await committing

    messages = {f"m-{i}": i for i in range(MESSAGES)}
    flaky = {i for i in range(MESSAGES) if i % 10 == 1}
    assert sorted(failures) == sorted(f"picky trigger cannot handle order {i} yet" for i in flaky)

    # Deletes happen exactly for clean events: each message once, with the receipt handle of
    # its last receive, which everyone accepted; every earlier receive of it was unclean (some
    # subscriber failed it) and was not deleted, so it came back after the visibility timeout.
    assert sorted(sqs.deleted) == sorted(messages)
    outcomes: dict[str, dict[int, bool]] = {m: {} for m in messages}
    for handle, outcome in producer.advanced:
        message_id, receive = handle.split("#")
        assert int(receive) not in outcomes[message_id], handle  # one event per receive
        outcomes[message_id][int(receive)] = outcome.is_clean
    receives: dict[int, int] = {}
    for message_id, by_receive in outcomes.items():
        last = max(by_receive)
        assert sorted(by_receive) == list(range(1, last + 1)), (message_id, by_receive)
        assert by_receive[last], (message_id, by_receive)
        assert not any(by_receive[r] for r in range(1, last)), (message_id, by_receive)
        receives[messages[message_id]] = last
    assert all(receives[i] >= 2 for i in flaky), receives

    # Each event's trigger events are stored once per subscriber that accepted it.
    async with store.engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.text(
                    """
                    SELECT e.payload #>> '{}', d.subscriber, d.state,
                           (SELECT count(*) FROM outbox_record AS r
                            WHERE r.event_id = e.id AND r.subscriber = d.subscriber)
                    FROM outbox_event AS e JOIN outbox_delivery AS d ON d.event_id = e.id
                    """
                )
            )
        ).all()
        pending = await conn.scalar(sa.text("SELECT count(*) FROM outbox_event WHERE pending > 0"))
    assert pending == 0
    stored: Counter[tuple[str, int]] = Counter()
    for handle, name, state, count in rows:
        order = messages[handle.split("#")[0]]
        subscriber = name.partition("-")[0]
        wanted = subscriber != "eu" or order % 2 == 1
        assert count == (1 if state == "acked" and wanted else 0), (handle, name, state)
        stored[subscriber, order] += count
    for i in range(MESSAGES):
        assert stored["all", i] == receives[i]
        assert stored["eu", i] == (receives[i] if i % 2 == 1 else 0)
        assert stored["picky", i] >= 1
    assert dict(received) == {key: n for key, n in stored.items() if n}
    print(
        f"{len(failures)} picky crashes; {len(producer.advanced)} events advanced for "
        f"{MESSAGES} messages; receives per message: {sorted(Counter(receives.values()).items())}"
    )

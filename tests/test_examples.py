"""The design's examples run on outbox with only their imports changed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from examples import fake_brokers
from examples.run import run_kafka, run_sqs

if TYPE_CHECKING:
    from outbox import OutboxStore


@pytest.fixture(autouse=True)
def fresh_fake_brokers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fake_brokers, "SQS", fake_brokers.FakeSqs())
    monkeypatch.setattr(fake_brokers, "KAFKA", fake_brokers.FakeKafka())
    import examples.run

    monkeypatch.setattr(examples.run, "SQS", fake_brokers.SQS)
    monkeypatch.setattr(examples.run, "KAFKA", fake_brokers.KAFKA)


async def test_sqs_example_deletes_each_message_once_all_subscribers_accepted(
    store: OutboxStore,
) -> None:
    tally = await run_sqs(store, messages=30)
    assert tally["deleted"] == 30
    assert sorted(fake_brokers.SQS.deleted) == sorted(f"m-{i}" for i in range(30))
    assert tally["received"] == {"us": 10, "eu": 10, "all": 30}
    assert tally["stored"] == {"sqs-us": 10, "sqs-eu": 10, "sqs-all": 30}


async def test_kafka_example_commits_each_partition_in_order_to_its_end(
    store: OutboxStore,
) -> None:
    tally = await run_kafka(store, messages=60)
    assert tally["committed"] == tally["produced"] == {("orders", p): 20 for p in range(3)}
    last: dict[tuple[str, int], int] = {}
    for topic, partition, offset in fake_brokers.KAFKA.commits:
        assert offset > last.get((topic, partition), 0)
        last[(topic, partition)] = offset

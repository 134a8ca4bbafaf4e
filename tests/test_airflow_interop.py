"""A trigger written for Airflow's ``airflow.triggers.shared_stream`` API (its base class, its
producer ABC, its reject function) runs unchanged on outbox's manager and committer."""

from __future__ import annotations

import asyncio
from typing import Any

import sqlalchemy as sa

from outbox import AdvanceOutcome, LaneCommitter, OutboxStore, SharedStreamManager
from tests.airflow_triggers import AirflowQueueTrigger, QueueProducer
from tests.streams import records, wait_until

MESSAGES = [
    {"n": 0, "kind": "a"},
    {"n": 1, "kind": "b"},
    {"n": 2, "kind": "a", "bad": True},
    {"n": 3, "kind": "b"},
]


async def _drain(stream: Any, into: list[Any]) -> None:
    async for event in stream:
        into.append(event.payload)


async def test_airflow_trigger_runs_on_outbox_manager(store: OutboxStore) -> None:
    QueueProducer.MESSAGES["q1"] = MESSAGES
    QueueProducer.ADVANCED.clear()
    got: dict[str, list[Any]] = {"all": [], "a": []}
    async with SharedStreamManager(store) as manager:
        tasks = [
            asyncio.create_task(
                _drain(
                    manager.subscribe(
                        trigger_id=name,
                        trigger=AirflowQueueTrigger(
                            queue="q1", kind=None if name == "all" else name
                        ),
                    ),
                    into,
                )
            )
            for name, into in got.items()
        ]
        await wait_until(lambda: len(QueueProducer.ADVANCED) == 4)
        for task in tasks:
            task.cancel()
    assert got == {"all": [MESSAGES[0], MESSAGES[1], MESSAGES[3]], "a": [MESSAGES[0]]}
    assert dict(QueueProducer.ADVANCED) == {
        "receipt-0": AdvanceOutcome(2, 0),
        "receipt-1": AdvanceOutcome(2, 0),
        "receipt-2": AdvanceOutcome(0, 0, rejected=2),
        "receipt-3": AdvanceOutcome(2, 0),
    }
    assert sorted((s, p["n"]) for s, p in await records(store)) == [
        ("a", 0),
        ("all", 0),
        ("all", 1),
        ("all", 3),
    ]


async def test_airflow_trigger_advanced_by_a_separate_committer(store: OutboxStore) -> None:
    QueueProducer.MESSAGES["q2"] = MESSAGES
    QueueProducer.ADVANCED.clear()
    got: list[Any] = []
    async with SharedStreamManager(store, run_committer=False) as manager:
        task = asyncio.create_task(
            _drain(
                manager.subscribe(trigger_id="all", trigger=AirflowQueueTrigger(queue="q2")), got
            )
        )
        await wait_until(lambda: len(got) == 3)
        committer = LaneCommitter(store, allowed_modules=["tests.airflow_triggers"])
        advanced = 0
        async with asyncio.timeout(10):
            while advanced < 4:
                advanced += await committer.run_once()
        task.cancel()
    assert [r for r, _ in QueueProducer.ADVANCED] and {
        r: o.rejected for r, o in QueueProducer.ADVANCED
    } == {"receipt-0": 0, "receipt-1": 0, "receipt-2": 1, "receipt-3": 0}
    async with store.engine.connect() as conn:
        trigger_class = await conn.scalar(sa.text("SELECT trigger_class FROM outbox_stream"))
    assert trigger_class == "tests.airflow_triggers.AirflowQueueTrigger"

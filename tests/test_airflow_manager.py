"""``outbox.airflow.SharedStreamManager``, driven as Airflow's ``TriggerRunner.run_trigger``
drives its manager (``subscribe`` -> the trigger's ``filter_shared_stream`` -> one
``bind_pending_event`` per trigger event -> ``confirm_persisted`` once Airflow stored them ->
``unsubscribe``; ``stop_all`` at the end), with Airflow's scenarios for these calls and the two
rules the runner relies on."""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import TYPE_CHECKING, Any

import pytest

from outbox import AckTimeout, AdvanceOutcome, OutboxStore, TriggerEvent
from outbox.airflow import SharedStreamManager
from outbox.errors import ConfigurationError
from tests.streams import (
    FastTrigger,
    Gate,
    ScriptedTrigger,
    StreamTrigger,
    delivery_rows,
    event_rows,
    producer_of,
    record_rows,
    settle,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Hashable

KEY = ("queue", "q")


class Runner:
    """Airflow's ``TriggerRunner`` as far as shared streams go: each trigger runs in a task of
    its own; trigger events go to ``events`` as ``(trigger id, payload, seq)``; ``confirm``
    plays the supervisor confirming what it stored."""

    def __init__(self, manager: SharedStreamManager) -> None:
        self.manager = manager
        self.events: list[tuple[Any, Any, int | None]] = []
        self.tasks: dict[Any, asyncio.Task[None]] = {}
        self.errors: dict[Any, BaseException] = {}
        self.confirmed: set[int] = set()

    def run(self, trigger_id: Any, trigger: Any) -> None:
        key: Hashable = trigger.shared_stream_key()

        async def run_trigger() -> None:
            try:
                stream = self.manager.subscribe(trigger_id=trigger_id, trigger=trigger, key=key)
                async for event in trigger.filter_shared_stream(stream):
                    # Bind and queue back to back, no await in between (as the runner does).
                    seq = self.manager.bind_pending_event(trigger_id=trigger_id, key=key)
                    self.events.append((trigger_id, event.payload, seq))
            except Exception as exc:
                self.errors[trigger_id] = exc
            finally:
                await self.manager.unsubscribe(trigger_id, key)

        self.tasks[trigger_id] = asyncio.get_running_loop().create_task(run_trigger())

    def seqs(self, trigger_id: Any = None) -> list[int]:
        return [
            seq
            for tid, _, seq in self.events
            if seq is not None and (trigger_id is None or tid == trigger_id)
        ]

    def confirm(self, *seqs: int) -> None:
        self.manager.confirm_persisted(seqs)
        self.confirmed.update(seqs)

    def confirm_all(self) -> None:
        self.confirm(*[s for s in self.seqs() if s not in self.confirmed])

    async def cancel(self, trigger_id: Any) -> None:
        task = self.tasks[trigger_id]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def stop(self) -> None:
        """The runner's shutdown: ``stop_all`` first, then its trigger tasks are cancelled
        (each unsubscribes as it ends)."""
        await self.manager.stop_all()
        for trigger_id in list(self.tasks):
            await self.cancel(trigger_id)


def holding(gate: Gate, *, per_event: int = 1, reject: bool = False) -> ScriptedTrigger:
    """A trigger that yields ``per_event`` trigger events per raw event, then stays on it
    until ``gate`` lets it go (its window open, its trigger events bound)."""

    async def script(trigger: ScriptedTrigger, raw: AsyncIterator[Any]) -> AsyncIterator[Any]:
        from airflow.triggers.shared_stream import reject_shared_stream_event

        async for event in raw:
            if reject:
                reject_shared_stream_event()
            for part in range(per_event):
                yield TriggerEvent({**event, "part": part})
            await gate.hold(event)

    return ScriptedTrigger(script)


def manager_for(store: OutboxStore, **options: Any) -> SharedStreamManager:
    """Built as Airflow's runner builds its manager, plus the store."""
    return SharedStreamManager(
        log=logging.getLogger("airflow.jobs.triggerer_job_runner"),
        max_subscriber_queue=options.pop("max_subscriber_queue", 1024),
        ack_timeout=options.pop("ack_timeout", 300.0),
        cohort_grace_period=0.0,
        store=store,
        **options,
    )


async def test_resolution_waits_for_airflow_to_confirm(store: OutboxStore) -> None:
    """Scenario 23/26: p1's trigger event is bound; moving past p1 does not resolve it; the
    confirmation does, with the trigger event kept as a record."""
    producer = producer_of(({"n": 1}, "p1"), ({"n": 2}, "p2"))
    gate = Gate()
    manager = manager_for(store)
    runner = Runner(manager)
    try:
        runner.run(1, holding(gate))
        await gate.arrived(1)
        gate.release()  # moved past p1, its trigger event not confirmed
        await gate.arrived(2)
        await settle(manager)
        assert producer.advanced == []
        assert await record_rows(store) == []
        runner.confirm(*runner.seqs())  # p1's only: p2 is still open
        await wait_until(lambda: producer.advanced == ["p1"])
        assert producer.outcomes == [AdvanceOutcome(1, 0)]
        assert [r[3] for r in await record_rows(store)] == [{"n": 1, "part": 0}]
    finally:
        await runner.stop()


async def test_filtered_out_event_resolves_on_next_pull_without_confirmation(
    store: OutboxStore,
) -> None:
    """Scenario 25."""
    producer = producer_of(({"n": 1, "region": "eu"}, "p1"))
    manager = manager_for(store)
    runner = Runner(manager)
    try:
        runner.run(1, StreamTrigger(region="us"))
        await wait_until(lambda: producer.advanced == ["p1"])
        assert producer.outcomes == [AdvanceOutcome(acked=1, failed=0)]
        assert runner.events == []
    finally:
        await runner.stop()


async def test_every_bound_trigger_event_must_be_confirmed(store: OutboxStore) -> None:
    """Scenario 26: two trigger events from p1, two distinct seqs; one confirmation is not
    enough."""
    producer = producer_of(({"n": 1}, "p1"))
    gate = Gate()
    manager = manager_for(store)
    runner = Runner(manager)
    try:
        runner.run(1, holding(gate, per_event=2))
        await gate.arrived(1)
        first, second = runner.seqs()
        assert first != second
        gate.release()
        runner.confirm(first)
        await settle(manager)
        assert producer.advanced == []
        runner.confirm(second)
        await wait_until(lambda: producer.advanced == ["p1"])
        assert [r[3]["part"] for r in await record_rows(store)] == [0, 1]
    finally:
        await runner.stop()


async def test_out_of_order_confirmation_advances_in_fanout_order(store: OutboxStore) -> None:
    """Scenario 27: p2 and p3 confirmed first: nothing; then p1: one batch in order."""
    producer = producer_of(*[({"n": i}, f"p{i}") for i in (1, 2, 3)], ({"n": 4}, "p4"))
    gate = Gate()
    manager = manager_for(store)
    runner = Runner(manager)
    try:
        runner.run(1, holding(gate))
        for i in (1, 2, 3):
            await gate.arrived(i)
            gate.release()
        await gate.arrived(4)  # p3's window closed
        s1, s2, s3, _ = runner.seqs()
        runner.confirm(s2, s3)
        await settle(manager)
        assert producer.advanced == []
        runner.confirm(s1)
        await wait_until(lambda: producer.advanced == ["p1", "p2", "p3"])
        assert producer.batches == [["p1", "p2", "p3"]]
    finally:
        await runner.stop()


async def test_unsubscribe_acks_what_it_pulled_once_confirmed_and_fails_the_rest(
    store: OutboxStore,
) -> None:
    """Rule 23: p1 pulled (its trigger event bound, not confirmed), p2 queued, never pulled;
    the trigger is cancelled (the runner unsubscribes): p2 fails at once; p1 resolves acked
    when Airflow's confirmation arrives, after the unsubscribe."""
    producer_of(({"n": 1}, "p1"), ({"n": 2}, "p2"))
    gate = Gate()
    manager = manager_for(store, run_committer=False)
    runner = Runner(manager)
    try:
        runner.run(1, holding(gate))
        await gate.arrived(1)
        await wait_until(lambda: len(manager._streams[KEY].subscribers["1"].raw) == 1)
        await runner.cancel(1)
        assert KEY not in manager._streams
        await manager._writer.barrier()
        states = {p: st for p, _, st, _ in await delivery_rows(store)}
        assert states == {"p2": "failed"}
        runner.confirm_all()
        await manager._writer.barrier()
        states = {p: st for p, _, st, _ in await delivery_rows(store)}
        assert states == {"p1": "acked", "p2": "failed"}
        assert [r[3] for r in await record_rows(store)] == [{"n": 1, "part": 0}]
    finally:
        await runner.stop()


async def test_stop_all_leaves_raw_streams_open_and_a_later_unsubscribe_does_nothing(
    store: OutboxStore,
) -> None:
    """Scenario 15, and the runner's order on shutdown: ``stop_all`` first (it must not end a
    subscriber's raw stream: the runner cancels its trigger tasks), then each trigger's
    ``unsubscribe`` as its task is cancelled."""
    producer_of()
    manager = manager_for(store)
    stream = manager.subscribe(trigger_id=1, trigger=StreamTrigger(), key=KEY)
    consumer = asyncio.ensure_future(stream.__anext__())
    await wait_until(lambda: manager._streams[KEY].producer is not None)
    await manager.stop_all()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(consumer), 0.2)
    await manager.unsubscribe(1, KEY)
    consumer.cancel()
    await asyncio.gather(consumer, return_exceptions=True)


async def test_a_trigger_event_yielded_after_a_reject_fires_but_does_not_bind(
    store: OutboxStore,
) -> None:
    """Scenario 55 as Airflow has it: the trigger event still reaches the runner (Airflow stores
    it), ``bind_pending_event`` returns None, the event is counted rejected."""
    producer = producer_of(({"n": 1}, "p1"))
    gate = Gate()
    manager = manager_for(store)
    runner = Runner(manager)
    try:
        runner.run(1, holding(gate, reject=True))
        await gate.arrived(1)
        assert runner.events == [(1, {"n": 1, "part": 0}, None)]
        await wait_until(lambda: producer.advanced == ["p1"])
        assert producer.outcomes == [AdvanceOutcome(0, 0, rejected=1)]
        assert await record_rows(store) == []
    finally:
        await runner.stop()


async def test_bind_without_a_window_returns_none_and_draws_no_seq(store: OutboxStore) -> None:
    """Scenario 76: unknown key, a fast-path stream, a subscriber between events: None, and
    the next seq drawn is the next one."""

    async def source(kwargs: dict[str, Any], invocation: int) -> AsyncIterator[Any]:
        await asyncio.Event().wait()
        yield None  # pragma: no cover

    FastTrigger.SOURCES["fast"] = source
    producer_of(({"n": 1}, "p1"))
    gate = Gate()
    manager = manager_for(store)
    runner = Runner(manager)
    try:
        assert manager.bind_pending_event(trigger_id=1, key=("nope",)) is None
        manager.subscribe(trigger_id=9, trigger=FastTrigger(), key=("fast", "fast"))
        assert manager.bind_pending_event(trigger_id=9, key=("fast", "fast")) is None
        runner.run(1, holding(gate))
        await gate.arrived(1)
        (first,) = runner.seqs()
        gate.release()
        await wait_until(lambda: manager._streams[KEY].subscribers["1"].window is None)
        assert manager.bind_pending_event(trigger_id=1, key=KEY) is None
        assert first == 0
        assert next(manager._seqs) == 1
    finally:
        await runner.stop()


async def test_confirm_persisted_with_a_one_shot_iterator_reaches_every_group(
    store: OutboxStore,
) -> None:
    """Scenario 77."""
    a = producer_of(({"n": 1}, "a1"))
    StreamTrigger.PRODUCERS["r"] = b = producer_of(({"n": 2}, "b1"))
    StreamTrigger.PRODUCERS["q"] = a
    gates = [Gate(), Gate()]
    manager = manager_for(store)
    runner = Runner(manager)
    try:
        runner.run(1, holding(gates[0]))
        second = holding(gates[1])
        second.name = "r"
        runner.run(2, second)
        for gate in gates:
            await gate.arrived(1)
            gate.release()
        await wait_until(lambda: all(g.pulled for g in gates))
        manager.confirm_persisted(iter(runner.seqs()))
        for gate in gates:
            await gate.arrived(1)
        # Moved past: both resolve (the confirmations reached both groups).
        await wait_until(lambda: a.advanced == ["a1"] and b.advanced == ["b1"])
    finally:
        await runner.stop()


async def test_an_event_never_confirmed_times_out(store: OutboxStore) -> None:
    """The ack timeout covers trigger events never confirmed: the subscriber gets
    ``AckTimeout``, the event is advanced as failed."""
    producer = producer_of(({"n": 1}, "p1"), ({"n": 2}, "p2"))
    gate = Gate()
    manager = manager_for(store, ack_timeout=0.3)
    runner = Runner(manager)
    try:
        runner.run(1, holding(gate))
        await gate.arrived(1)
        gate.release()
        await gate.arrived(2)
        await wait_until(lambda: manager._streams[KEY].subscribers["1"].failed, within=15)
        gate.release()  # its next pull raises
        await wait_until(lambda: 1 in runner.errors, within=15)
        assert isinstance(runner.errors[1], AckTimeout)
        await wait_until(lambda: "p1" in producer.advanced, within=15)
        assert producer.outcomes[0] == AdvanceOutcome(0, 1)
    finally:
        await runner.stop()


async def test_a_backlog_bigger_than_the_queue_pauses_instead_of_failing(
    store: OutboxStore,
) -> None:
    """Airflow fails a subscriber whose queue overflows; here the producer waits."""
    events = [({"n": i}, f"p{i}") for i in range(40)]
    producer = producer_of(*events)
    manager = manager_for(store, max_subscriber_queue=4)
    runner = Runner(manager)
    try:
        runner.run(1, StreamTrigger())
        runner.run(2, StreamTrigger())
        confirming = itertools.count()
        while len(producer.advanced) < 40:
            runner.confirm_all()
            await asyncio.sleep(0.01) if next(confirming) > 10_000 else await asyncio.sleep(0)
            assert not runner.errors
        assert producer.outcomes == [AdvanceOutcome(2, 0)] * 40
        assert len(await record_rows(store)) == 80
        assert all(e["pending"] == 0 for e in await event_rows(store))
    finally:
        await runner.stop()


def test_constructed_as_the_runner_does_with_the_url_from_airflows_configuration(
    monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    monkeypatch.setenv("AIRFLOW__OUTBOX__DATABASE_URL", database_url)
    monkeypatch.setenv("AIRFLOW__OUTBOX__OUTAGE_LIMIT", "12")
    manager = SharedStreamManager(
        log=None, max_subscriber_queue=7, ack_timeout=9.0, cohort_grace_period=0.5
    )
    assert (manager.max_subscriber_queue, manager.ack_timeout, manager.cohort_grace_period) == (
        7,
        9.0,
        0.5,
    )
    assert manager.session_ttl == 12
    monkeypatch.delenv("AIRFLOW__OUTBOX__DATABASE_URL")
    monkeypatch.delenv("OUTBOX_DATABASE_URL", raising=False)
    with pytest.raises(ConfigurationError, match=r"needs \[outbox\] database_url"):
        SharedStreamManager(log=None)
    monkeypatch.setenv("AIRFLOW__OUTBOX__DATABASE_URL", database_url)
    monkeypatch.setenv("AIRFLOW__OUTBOX__SESSION_TTL", "soon")
    with pytest.raises(ConfigurationError, match=r"\[outbox\] session_ttl = 'soon' is not a"):
        SharedStreamManager(log=None)

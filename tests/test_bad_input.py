"""Bad input gets a one-line error naming the stream or subscriber; others go on."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import pytest
import sqlalchemy as sa

from outbox import (
    OutboxReader,
    OutboxStore,
    SharedStreamManager,
    SharedStreamProducer,
    TriggerEvent,
)
from outbox.codec import Codec
from outbox.store import EventToRecord, ResolutionRow
from tests.streams import RecordingProducer, StreamTrigger, collect, wait_until

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Hashable


class OtherTrigger(StreamTrigger):
    PRODUCERS: ClassVar[dict[str, SharedStreamProducer]] = {}

    def shared_stream_key(self) -> Hashable:
        return ("other", self.name)


async def test_unserialisable_payload_fails_its_stream_only(store: OutboxStore) -> None:
    StreamTrigger.PRODUCERS["bad"] = RecordingProducer([({"n": 1}, object())])
    good = RecordingProducer([({"n": i}, f"p{i}") for i in range(3)])
    OtherTrigger.PRODUCERS["good"] = good
    async with SharedStreamManager(store) as manager:
        bad_stream = manager.subscribe(trigger_id=1, trigger=StreamTrigger(name="bad"))
        good_stream = manager.subscribe(trigger_id=2, trigger=OtherTrigger(name="good"))
        with pytest.raises(TypeError) as failure:
            await collect(bad_stream, 1)
        message = str(failure.value)
        assert "('queue', 'bad')" in message and "broker payload" in message
        assert "serialize_payload" in message and "\n" not in message
        assert await collect(good_stream, 3) == [{"n": 0}, {"n": 1}, {"n": 2}]
        await wait_until(lambda: good.advanced[:2] == ["p0", "p1"])
        assert ("queue", "bad") not in manager._streams


async def test_unserialisable_raw_event_names_the_stream(store: OutboxStore) -> None:
    StreamTrigger.PRODUCERS["raw"] = RecordingProducer([({"when": object()}, "p")])
    async with SharedStreamManager(store) as manager:
        with pytest.raises(TypeError, match=r"stream \('queue', 'raw'\): raw event") as failure:
            await collect(manager.subscribe(trigger_id=1, trigger=StreamTrigger(name="raw")), 1)
    message = str(failure.value)
    assert "serialize_event" in message and "type object at ['when']" in message, message
    assert "\n" not in message


async def test_a_set_raw_event_is_stored_as_a_set(store: OutboxStore) -> None:
    """Sets were refused once (no JSON form); the codec stores them."""
    StreamTrigger.PRODUCERS["raw"] = RecordingProducer([({1, 2}, "p")])
    async with SharedStreamManager(store) as manager:
        assert await collect(
            manager.subscribe(trigger_id=1, trigger=StreamTrigger(name="raw")), 1
        ) == [{1, 2}]
    async with store.engine.connect() as conn:
        stored = await conn.scalar(sa.text("SELECT raw FROM outbox_event"))
    assert Codec().decode_parsed(stored) == {1, 2}


async def test_lane_that_cannot_be_stored_names_the_stream(store: OutboxStore) -> None:
    StreamTrigger.PRODUCERS["lane"] = RecordingProducer(
        [({"n": 1}, "p")], lane_for=lambda p: object()
    )
    async with SharedStreamManager(store) as manager:
        with pytest.raises(
            TypeError, match=r"stream \('queue', 'lane'\): lane .* cannot be stored"
        ):
            await collect(manager.subscribe(trigger_id=1, trigger=StreamTrigger(name="lane")), 1)


class Unserialisable(StreamTrigger):
    def serialize(self) -> tuple[str, dict[str, Any]]:
        return "tests.test_bad_input.Unserialisable", {"name": self.name, "when": object()}


async def test_trigger_kwargs_that_do_not_serialise_fail_subscribe_and_leave_nothing(
    store: OutboxStore,
) -> None:
    async with SharedStreamManager(store) as manager:
        with pytest.raises(TypeError, match=r"stream \('queue', 'kw'\): trigger kwargs"):
            manager.subscribe(trigger_id=1, trigger=Unserialisable(name="kw"))
        assert manager._streams == {}


class EmitsObjects(StreamTrigger):
    async def filter_shared_stream(
        self, shared_stream: AsyncIterator[Any]
    ) -> AsyncIterator[TriggerEvent]:
        async for raw in shared_stream:
            yield TriggerEvent({"ids": [raw["n"], object()]})


class EmitsSets(StreamTrigger):
    async def filter_shared_stream(
        self, shared_stream: AsyncIterator[Any]
    ) -> AsyncIterator[TriggerEvent]:
        async for raw in shared_stream:
            yield TriggerEvent({"ids": {raw["n"]}})


async def test_unserialisable_trigger_event_fails_that_subscriber_only(store: OutboxStore) -> None:
    producer = RecordingProducer([({"n": i}, f"p{i}") for i in range(2)])
    StreamTrigger.PRODUCERS["te"] = producer
    async with SharedStreamManager(store) as manager:
        broken = manager.subscribe(trigger_id="broken", trigger=EmitsObjects(name="te"))
        fine = manager.subscribe(trigger_id="fine", trigger=StreamTrigger(name="te"))
        with pytest.raises(TypeError, match="trigger event of subscriber broken"):
            await collect(broken, 1)
        assert await collect(fine, 2) == [{"n": 0}, {"n": 1}]
        await wait_until(lambda: producer.advanced[:1] == ["p0"])
    assert producer.outcomes[0].failed == 1 and producer.outcomes[0].acked == 1


async def test_a_trigger_event_holding_a_set_is_stored_and_read_back_as_one(
    store: OutboxStore,
) -> None:
    """Sets were refused once (no JSON form); the codec stores them."""
    StreamTrigger.PRODUCERS["sets"] = RecordingProducer([({"n": 7}, "p7")])
    async with SharedStreamManager(store) as manager:
        stream = manager.subscribe(trigger_id="sets", trigger=EmitsSets(name="sets"))
        assert await collect(stream, 1) == [{"ids": {7}}]
    async with store.engine.begin() as conn:
        claimed = await OutboxReader(store).claim(conn)
    assert [r.payload for r in claimed] == [{"ids": {7}}]


async def test_key_none_and_double_subscribe_are_rejected(store: OutboxStore) -> None:
    class NoKey(StreamTrigger):
        def shared_stream_key(self) -> Hashable:
            return None

    StreamTrigger.PRODUCERS["dup"] = RecordingProducer([])
    async with SharedStreamManager(store) as manager:
        with pytest.raises(ValueError, match="must not be None"):
            manager.subscribe(trigger_id=1, trigger=NoKey())
        manager.subscribe(trigger_id=1, trigger=StreamTrigger(name="dup"))
        with pytest.raises(RuntimeError, match="already subscribed"):
            manager.subscribe(trigger_id=1, trigger=StreamTrigger(name="dup"))


async def test_a_trigger_id_holding_a_separator_is_refused_at_subscribe(store: OutboxStore) -> None:
    StreamTrigger.PRODUCERS["sep"] = RecordingProducer([])
    async with SharedStreamManager(store) as manager:
        for trigger_id in ("a\x1fb", "\x1e"):
            with pytest.raises(ValueError, match=r"contains a control character .* separator"):
                manager.subscribe(trigger_id=trigger_id, trigger=StreamTrigger(name="sep"))


async def test_the_store_refuses_a_subscriber_name_holding_a_separator(
    store: OutboxStore,
) -> None:
    """The guard under the manager's check: a name that would split wrongly fails its batch
    (the writer then isolates it) instead of resolving for the wrong subscribers."""
    stream_id = await store.ensure_stream('["sep"]', "x.T", "{}", 300.0)
    lane_id = (await store.ensure_lanes(stream_id, ["null"]))["null"]
    event = EventToRecord(stream_id, lane_id, None, "{}", "1", ["a\x1fb"])
    async with store.engine.begin() as conn:
        await store.record_events(conn, [event])
    async with store.engine.begin() as conn:
        with pytest.raises(ValueError, match=r"subscriber 'a\\x1fb' contains a control"):
            await store.resolve(
                conn, [ResolutionRow(stream_id, event.event_id, "a\x1fb", "acked", None)]
            )

"""``outbox.codec``: every type in the zoo survives a trip through a real jsonb column, equal in
type and value; plain JSON is stored as the JSON ``to_json`` wrote; classes are rebuilt only from
the allow-list or from what this process encoded; what cannot be stored is a one-line error."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import json
import zoneinfo
from typing import TYPE_CHECKING, Any, NamedTuple

import pytest
import sqlalchemy as sa
from airflow.providers.apache.kafka.triggers.shared_stream import KafkaBrokerPayload
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from outbox import LaneCommitter, OutboxReader, OutboxStore, UndecodableValue
from outbox.codec import TAG, Codec, encode, forget_seen_classes
from outbox.core import canonical_json
from outbox.protocol import to_json
from outbox.store import EventToRecord, ResolutionRow
from tests.test_committer import Producer
from tests.typezoo import Colour, Point, Priority, plain_json, same, zoo

if TYPE_CHECKING:
    from collections.abc import Iterator

MAX_MESSAGE = 600


class JsonbRoundTrip:
    """One event loop and engine across examples: store a value's text in jsonb, read it back
    as text (what the committer's read gives) and as parsed JSON (what asyncpg gives)."""

    def __init__(self, database_url: str) -> None:
        self.runner = asyncio.Runner()
        self.store = OutboxStore.from_url(database_url)

    def __call__(self, text: str) -> tuple[str, Any]:
        async def trip() -> tuple[str, Any]:
            async with self.store.engine.connect() as conn:
                row = (
                    await conn.execute(
                        sa.text("SELECT CAST(:t AS jsonb)::text, CAST(:t AS jsonb)"), {"t": text}
                    )
                ).one()
            return row[0], row[1]

        result: tuple[str, Any] = self.runner.run(trip())
        return result

    def close(self) -> None:
        self.runner.run(self.store.aclose())
        self.runner.close()


@pytest.fixture
def jsonb(database_url: str) -> Iterator[JsonbRoundTrip]:
    trip = JsonbRoundTrip(database_url)
    try:
        yield trip
    finally:
        trip.close()


@given(value=zoo)
@example(
    value={
        1: [(b"\x00\x00\x00\x00\x07avro", "nul\x00", "\ud800"), Point(b"\x00", None)],
        (2, "k"): [
            datetime.datetime(2024, 3, 31, 2, 30, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")),
            datetime.datetime(2024, 3, 31, 2, 30),
            decimal.Decimal("-0.000"),
            None,
        ],
        "k": KafkaBrokerPayload("orders", 0, 7, b"\x00\x00\x00\x00\x02pb", None),
    }
)
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
def test_every_type_survives_a_jsonb_column(jsonb: JsonbRoundTrip, value: Any) -> None:
    text = encode(value, what="value")
    as_text, parsed = jsonb(text)
    codec = Codec()  # the classes were encoded by this process: no allow-list needed
    assert same(value, codec.decode(as_text)), (value, as_text)
    assert same(value, codec.decode_parsed(parsed)), (value, as_text)
    assert same(value, codec.decode(text))


@given(value=plain_json)
@settings(max_examples=300, deadline=None, database=None)
def test_plain_json_is_stored_as_to_json_writes_it(value: Any) -> None:
    text = encode(value, what="value")
    assert text == to_json(value, what="value")
    assert TAG not in text
    assert same(value, Codec().decode(text))


def test_tags_in_user_data_are_escaped() -> None:
    codec = Codec()
    for value in (
        {TAG: "bytes", "v": "AA=="},
        {"outer": {TAG: "tuple", "v": [1]}},
        [{TAG: None}],
        {"v": TAG},
    ):
        assert same(value, codec.decode(encode(value, what="value"))), value


def test_the_text_of_the_tagged_types() -> None:
    """The format is read by SQL too: each tag as documented."""
    assert encode(b"\x00\x01", what="v") == '{"__outbox__":"bytes","v":"AAE="}'
    assert encode("a\x00", what="v") == '{"__outbox__":"str","v":"YQA="}'
    assert encode((1, [2]), what="v") == '{"__outbox__":"tuple","v":[1,[2]]}'
    assert encode({1: "a"}, what="v") == '{"__outbox__":"dict","v":[[1,"a"]]}'
    assert encode(Point(1, 2), what="v") == (
        '{"__outbox__":"namedtuple","c":"tests.typezoo:Point","v":[1,2]}'
    )
    assert encode(Priority.HIGH, what="v") == (
        '{"__outbox__":"enum","c":"tests.typezoo:Priority","v":2}'
    )
    assert encode(float("nan"), what="v") == '{"__outbox__":"float","v":"nan"}'
    assert encode(1e16, what="v") == '{"__outbox__":"float","v":"1e+16"}'
    assert encode(datetime.date(2024, 2, 29), what="v") == (
        '{"__outbox__":"date","v":"2024-02-29"}'
    )
    # Plain JSON stays plain inside tagged values, and around them.
    assert encode({"k": [b"", 1.5]}, what="v") == ('{"k":[{"__outbox__":"bytes","v":""},1.5]}')


def assert_one_line(error: BaseException, *names: str) -> None:
    message = str(error)
    assert "\n" not in message and len(message) <= MAX_MESSAGE, message
    for name in names:
        assert name in message, message


def _deep(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (object(), "type object"),
        (lambda: None, "type function"),
        ({"a": [1, {"b": object()}]}, "type object at ['a'][1]['b']"),
        ((1, {2: print}), "builtin_function_or_method at [1][2]"),
        (Point(x=Point), "type type"),
        (_deep(50_000), "nested too deeply"),
    ],
)
def test_what_cannot_be_stored_is_a_one_line_type_error(value: Any, named: str) -> None:
    with pytest.raises(TypeError) as failure:
        encode(value, what="stream 'orders': broker payload")
    assert_one_line(failure.value, "stream 'orders': broker payload", named)
    if named != "nested too deeply":
        assert_one_line(failure.value, "convert it to")


class Local(NamedTuple):
    value: bytes


def _stored_point() -> str:
    text = encode(Point(b"\x00", 1), what="v")
    forget_seen_classes()  # as in a process that never encoded a Point
    return text


def test_classes_from_allowed_modules_only() -> None:
    text = _stored_point()
    with pytest.raises(UndecodableValue) as failure:
        Codec().decode(text)
    assert_one_line(failure.value, "NamedTuple", "tests.typezoo.Point", "--allow-module")
    with pytest.raises(UndecodableValue):
        Codec(["tests.typ"]).decode(text)  # prefixes are whole module names
    assert same(Point(b"\x00", 1), Codec(["tests"]).decode(text))
    assert same(Point(b"\x00", 1), Codec(["tests.typezoo."]).decode(text))


def test_classes_this_process_encoded_need_no_allow_list() -> None:
    def made_here() -> Any:
        class Inner(NamedTuple):  # not importable at all: "<locals>" in its name
            value: Any

        return Inner

    inner = made_here()
    for value in (Local(b"\x00"), inner(Colour.BLUE), [Priority.LOW]):
        assert same(value, Codec().decode(encode(value, what="v"))), value
    text = encode(inner(1), what="v")
    forget_seen_classes()
    with pytest.raises(UndecodableValue, match=r"Inner.*cannot be imported"):
        Codec(["tests"]).decode(text)


@pytest.mark.parametrize(
    ("stored", "problem"),
    [
        ({"c": "tests.typezoo:same", "v": [1]}, "not a NamedTuple class"),
        ({"c": "tests.typezoo:Colour", "v": ["red"]}, "not a NamedTuple class"),
        ({"c": "tests.no_such_module:X", "v": []}, "cannot be imported"),
        ({"c": "tests.typezoo:Nope", "v": []}, "cannot be imported"),
        ({"c": "os:system", "v": ["true"]}, "outside the allowed modules"),
    ],
)
def test_what_the_stored_class_path_names_is_checked(stored: dict[str, Any], problem: str) -> None:
    text = json.dumps({TAG: "namedtuple", **stored})
    with pytest.raises(UndecodableValue) as failure:
        Codec(["tests"]).decode(text)
    assert_one_line(failure.value, problem)


@pytest.mark.parametrize(
    "stored",
    [
        {TAG: "no-such-tag", "v": 1},
        {TAG: "bytes", "v": "not base64!"},
        {TAG: "tuple", "v": "abc"},
        {TAG: "dict", "v": [[1, 2, 3]]},
        {TAG: "enum", "c": "tests.typezoo:Colour", "v": "green"},
        {TAG: "datetime", "v": "yesterday"},
    ],
)
def test_malformed_tags_are_one_line_errors(stored: dict[str, Any]) -> None:
    with pytest.raises(UndecodableValue) as failure:
        Codec(["tests"]).decode(json.dumps(stored))
    assert_one_line(failure.value, repr(stored[TAG]))


async def test_payloads_written_before_the_codec_read_back_unchanged(store: OutboxStore) -> None:
    """Rows written by ``to_json`` (before the codec) are advanced and handed out as they were
    (a tuple, stored by to_json as a list, stays a list); jsonb queries see plain JSON."""
    payloads = [
        {"topic": "orders", "partition": 1, "offset": 7, "key": "a2V5"},
        ["orders", 1, 8],
        ("orders", 1, 9),
        "receipt-10",
        11,
    ]
    stream_id = await store.ensure_stream(
        canonical_json(("legacy",), what="key"), "tests.not.Used", "{}", 300.0
    )
    lane_id = (await store.ensure_lanes(stream_id, ["null"]))["null"]
    events = [
        EventToRecord(
            stream_id, lane_id, None, to_json(p, what="raw"), to_json(p, what="payload"), ["s"]
        )
        for p in payloads
    ]
    async with store.engine.begin() as conn:
        await store.record_events(conn, events)
        await store.resolve(
            conn,
            [
                ResolutionRow(stream_id, e.event_id, "s", "acked", None, [e.payload_json])
                for e in events
            ],
        )
    producer = Producer()
    committer = LaneCommitter(store, producers={("legacy",): producer})
    assert await committer.run_once() == len(payloads)
    as_json = [json.loads(to_json(p, what="p")) for p in payloads]
    assert [p for batch in producer.batches for p in batch] == as_json
    async with store.engine.begin() as conn:
        records = await OutboxReader(store).claim(conn)
    assert [r.payload for r in records] == as_json
    # The codec writes plain JSON the same way: a jsonb query reads it.
    async with store.engine.connect() as conn:
        topic = await conn.scalar(
            sa.text("SELECT CAST(:p AS jsonb) ->> 'topic'"),
            {"p": encode(payloads[0], what="payload")},
        )
    assert topic == "orders"


@given(value=st.sampled_from([b"\x00", "\x00", ("t", 1)]))
@settings(max_examples=3, database=None)
def test_decode_parsed_leaves_its_argument_alone(value: Any) -> None:
    parsed = json.loads(encode([{"k": value}], what="v"))
    before = json.dumps(parsed)
    assert same([{"k": value}], Codec().decode_parsed(parsed))
    assert json.dumps(parsed) == before

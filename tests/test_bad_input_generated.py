"""Bad input, generated: raw events, broker payloads, lanes, event keys, trigger kwargs and
trigger class paths of every awkward kind. Each gets a one-line error naming its stream (or
subscriber); a healthy stream in the same manager keeps working; nothing committed is lost.
Raw events and payloads that plain JSON cannot hold (bytes, datetimes, NUL characters, ...) are
no longer bad input: they are stored and come back as they were (``outbox.codec``).

One manager (and one database) serves all the examples of a test: each example opens a stream
of its own, and the healthy stream is checked after every example.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import itertools
import json
import math
import uuid
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from outbox import LaneCommitter, OutboxStore, SharedStreamManager
from outbox.codec import Codec, encode
from outbox.core import canonical_json
from outbox.protocol import to_json
from tests.streams import ScriptedProducer, StreamTrigger, collect, wait_until
from tests.test_committer import Producer
from tests.typezoo import same

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from outbox import TriggerEvent

# No shrinking: each example costs Postgres round trips; the first failing one is reported.
PHASES = (Phase.explicit, Phase.reuse, Phase.generate)
EXAMPLES = settings(
    max_examples=50,
    deadline=None,
    phases=PHASES,
    # One store and manager serve every example on purpose (a Postgres round trip each).
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
MAX_MESSAGE = 600


class _HugeText(str):
    """A 5 MB string that hypothesis can show (its repr is short)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<{len(self) // 2**20} MB of x>"


HUGE = _HugeText("x" * (5 * 2**20))


def _as_str(value: Any) -> Any:
    """``value`` with its ``_HugeText`` as plain ``str`` (what the codec gives back)."""
    if isinstance(value, _HugeText):
        return str(value)
    if isinstance(value, dict):
        return {k: _as_str(v) for k, v in value.items()}
    return value


def _deep(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


class _Opaque:
    def __repr__(self) -> str:
        return "<opaque>"


# Values with no JSON form, alone or inside an otherwise fine structure: refused as lanes, stream
# keys and trigger kwargs (plain JSON there); raw events and payloads store them (the codec).
not_json_leaf = st.one_of(
    st.binary(max_size=8),
    st.frozensets(st.integers(), min_size=1, max_size=3),
    st.sets(st.integers(), min_size=1, max_size=3),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.datetimes(),
    st.dates(),
    st.uuids(),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.complex_numbers(allow_nan=False, allow_infinity=False),
    st.dictionaries(st.tuples(st.integers()), st.integers(), min_size=1, max_size=2),
)
# Values nothing can store: arbitrary objects and functions.
unstorable_leaf = st.one_of(
    st.builds(object),
    st.builds(_Opaque),
    st.sampled_from([len, _deep, lambda: None]),
)
# JSON, but Postgres' jsonb refuses them: NUL characters and lone surrogates (as canonical JSON
# text, in a key, both are escaped and fine).
not_jsonb_leaf = st.one_of(
    st.text(max_size=4).map(lambda s: s + "\x00"),
    st.sampled_from(["\ud800", "a\udfff", "\udc00z"]),
)


def _nested(leaf: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        leaf,
        leaf.map(lambda v: {"ok": 1, "bad": [v]}),
        leaf.map(lambda v: [1, "two", {"three": v}]),
    )


unstorable = _nested(unstorable_leaf)
not_json = _nested(st.one_of(not_json_leaf, unstorable_leaf, not_jsonb_leaf))
no_canonical_form = _nested(st.one_of(not_json_leaf, unstorable_leaf))
# Refused once as raw events and payloads (no JSON form, or not in jsonb); stored now.
formerly_refused = _nested(st.one_of(not_json_leaf, not_jsonb_leaf))
# Awkward but storable: each must go through and be advanced.
storable = st.one_of(
    st.just(HUGE),
    st.just({"big": HUGE}),
    st.just(_deep(200)),
    # any unicode, NUL and lone surrogates too: escapes, quotes, astral characters
    st.text(st.characters(blacklist_categories=()), max_size=20),
    st.floats(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.dictionaries(st.integers().map(str), st.none(), max_size=3),
)


class Harness:
    """One event loop, store and manager across examples, with a healthy control stream."""

    def __init__(self, database_url: str) -> None:
        self.runner = asyncio.Runner()
        self.counter = itertools.count()
        self.store = OutboxStore.from_url(database_url)
        self.manager: SharedStreamManager
        self.control = ScriptedProducer()
        self.control_seen = 0
        self.runner.run(self._start())

    async def _start(self) -> None:
        self.manager = SharedStreamManager(self.store, ack_timeout=30.0)
        StreamTrigger.PRODUCERS["control"] = self.control
        self.control_stream = self.manager.subscribe(
            trigger_id="control", trigger=StreamTrigger(name="control")
        )

    def run(self, coro: Any) -> Any:
        return self.runner.run(asyncio.wait_for(coro, 60))

    async def control_still_works(self) -> None:
        n = self.control_seen
        self.control.push({"control": n}, f"c{n}")
        assert await collect(self.control_stream, 1) == [{"control": n}]
        self.control_seen += 1
        await wait_until(lambda: f"c{n}" in self.control.advanced, within=30)

    async def subscriber_records(self, subscriber: str) -> list[Any]:
        async with self.store.engine.connect() as conn:
            rows = await conn.execute(
                sa.text("SELECT payload FROM outbox_record WHERE subscriber = :s ORDER BY id"),
                {"s": subscriber},
            )
            return [r[0] for r in rows]

    def close(self) -> None:
        async def stop() -> None:
            await self.manager.stop_all()
            await self.store.aclose()

        self.runner.run(stop())
        self.runner.close()


@pytest.fixture
def harness(database_url: str) -> Iterator[Harness]:
    h = Harness(database_url)
    try:
        yield h
    finally:
        h.close()


def assert_one_line(error: BaseException, *names: str) -> None:
    message = str(error)
    assert "\n" not in message, message[:2000]
    assert len(message) <= MAX_MESSAGE, message[:2000]
    for name in names:
        assert name in message, message


async def _outcome(stream: AsyncIterator[TriggerEvent], count: int) -> tuple[list[Any], Any]:
    """The payloads ``stream`` yields (up to ``count``), and the error that ended it."""
    got: list[Any] = []
    try:
        async for event in stream:
            got.append(event.payload)
            if len(got) == count:
                return got, None
    except Exception as exc:
        return got, exc
    return got, None


async def _bad_stream_example(
    h: Harness, events: list[tuple[Any, Any]], **producer_options: Any
) -> tuple[str, list[Any], Any, ScriptedProducer]:
    """Open a fresh stream with ``events`` (the first a good one), consume it until it ends."""
    name = f"s{next(h.counter)}"
    producer = ScriptedProducer(events, **producer_options)
    StreamTrigger.PRODUCERS[name] = producer
    stream = h.manager.subscribe(trigger_id=f"{name}-sub", trigger=StreamTrigger(name=name))
    got, error = await _outcome(stream, len(events))
    return name, got, error, producer


@given(where=st.sampled_from(["raw", "payload"]), value=unstorable)
@EXAMPLES
def test_unstorable_raw_events_and_payloads(harness: Harness, where: str, value: Any) -> None:
    async def example() -> None:
        bad = ({"n": 1, "v": value}, "p1") if where == "raw" else ({"n": 1}, {"v": value})
        name, got, error, _ = await _bad_stream_example(harness, [({"n": 0}, "p0"), bad])
        assert error is not None, got
        assert_one_line(
            error,
            f"'{name}'",
            "raw event" if where == "raw" else "broker payload",
            "serialize_event" if where == "raw" else "serialize_payload",
            "value of type",
            "convert it to",
        )
        # What was yielded was committed, and stays.
        assert await harness.subscriber_records(f"{name}-sub") == got
        await harness.control_still_works()

    harness.run(example())


@given(raw=formerly_refused, payload=formerly_refused)
@EXAMPLES
def test_values_plain_json_cannot_hold_are_stored_and_advanced_as_they_were(
    harness: Harness, raw: Any, payload: Any
) -> None:
    """Bytes, sets, NaN, datetimes, UUIDs, decimals, complex numbers, tuple-keyed mappings, NUL
    characters and lone surrogates: the subscriber, the outbox, the stored raw event and
    ``advance`` see them equal in type and value."""

    async def example() -> None:
        name, got, error, producer = await _bad_stream_example(
            harness, [({"v": raw}, {"v": payload})]
        )
        assert error is None and same(got, [{"v": raw}]), (error, got)
        await wait_until(lambda: len(producer.advanced) == 1, within=30)
        assert same(producer.advanced, [{"v": payload}]), producer.advanced
        stored = await harness.subscriber_records(f"{name}-sub")
        assert same([Codec().decode_parsed(r) for r in stored], got)
        await harness.control_still_works()

    harness.run(example())


@given(raw=storable, payload=storable)
@EXAMPLES
def test_awkward_but_storable_values_go_through(harness: Harness, raw: Any, payload: Any) -> None:
    async def example() -> None:
        name, got, error, producer = await _bad_stream_example(
            harness, [({"v": raw}, {"v": payload})]
        )
        assert error is None and same(got, [{"v": raw}]), (error, got)
        await wait_until(lambda: len(producer.advanced) == 1, within=30)
        # Floats stay floats (jsonb alone would give 1e16 back as an integer), NaN included;
        # a str subclass comes back a str.
        assert same(producer.advanced, [{"v": _as_str(payload)}]), producer.advanced
        stored = await harness.subscriber_records(f"{name}-sub")
        assert same([Codec().decode_parsed(r) for r in stored], [{"v": _as_str(raw)}])
        await harness.control_still_works()

    harness.run(example())


odd_lane = st.one_of(
    no_canonical_form,
    st.just(HUGE),
    st.just(("topic", HUGE)),
    st.dictionaries(st.integers(), st.integers(), min_size=1, max_size=2),  # int keys
)
odd_event_key = st.one_of(
    st.integers(),
    st.floats(),
    st.binary(),
    st.tuples(st.text(max_size=3)),
    st.builds(object),
    st.just(HUGE),
    st.text(max_size=4).map(lambda s: s + "\x00"),
    st.sampled_from(["\ud800", "k\udfff"]),
)


@given(value=odd_lane)
@EXAMPLES
def test_lanes_that_cannot_be_stored(harness: Harness, value: Any) -> None:
    async def example() -> None:
        name, got, error, _ = await _bad_stream_example(
            harness,
            [({"n": 0}, "ok"), ({"n": 1}, "bad")],
            lane_for=lambda p: None if p == "ok" else value,
        )
        # The good event before it may not have been recorded yet: then it was never
        # broadcast either, and the broker redelivers it.
        assert got in ([], [{"n": 0}]) and error is not None
        assert_one_line(error, f"'{name}'", "lane")
        assert await harness.subscriber_records(f"{name}-sub") == got
        await harness.control_still_works()

    harness.run(example())


@given(value=odd_event_key)
@EXAMPLES
def test_event_keys_that_cannot_be_stored(harness: Harness, value: Any) -> None:
    async def example() -> None:
        name, got, error, _ = await _bad_stream_example(
            harness,
            [({"n": 0}, "ok"), ({"n": 1}, "bad")],
            key_for=lambda p: "k0" if p == "ok" else value,
        )
        # The good event before it may not have been recorded yet: then it was never
        # broadcast either, and the broker redelivers it.
        assert got in ([], [{"n": 0}]) and error is not None
        assert_one_line(error, f"'{name}'", "get_event_key")
        assert await harness.subscriber_records(f"{name}-sub") == got
        await harness.control_still_works()

    harness.run(example())


class KwargsTrigger(StreamTrigger):
    """A trigger whose serialised kwargs carry ``extra``."""

    def __init__(self, *, name: str, extra: Any) -> None:
        super().__init__(name=name)
        self.extra = extra

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return "tests.test_bad_input_generated.KwargsTrigger", {
            "name": self.name,
            "extra": self.extra,
        }


@given(extra=not_json)
@EXAMPLES
def test_trigger_kwargs_that_do_not_serialise(harness: Harness, extra: Any) -> None:
    async def example() -> None:
        name = f"kw{next(harness.counter)}"
        with pytest.raises(TypeError) as failure:
            harness.manager.subscribe(
                trigger_id=f"{name}-sub", trigger=KwargsTrigger(name=name, extra=extra)
            )
        assert_one_line(failure.value, f"'{name}'", "trigger kwargs")
        assert ("queue", name) not in harness.manager._streams
        await harness.control_still_works()

    harness.run(example())


odd_stream_key = st.one_of(no_canonical_form, st.just(("queue", HUGE)))


@given(key=odd_stream_key)
@EXAMPLES
def test_stream_keys_that_cannot_be_stored(harness: Harness, key: Any) -> None:
    async def example() -> None:
        with pytest.raises(TypeError) as failure:
            harness.manager.subscribe(
                trigger_id="k", trigger=StreamTrigger(name="unused"), key=_Unhashable.wrap(key)
            )
        assert_one_line(failure.value, "shared stream key")
        await harness.control_still_works()

    harness.run(example())


class _Unhashable:
    """Stream keys must be hashable; wrap what is not (its canonical form is still refused)."""

    @staticmethod
    def wrap(value: Any) -> Any:
        try:
            hash(value)
        except TypeError:
            return _HashableBox(value)
        return value


class _HashableBox:
    def __init__(self, value: Any) -> None:
        self.value = value

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        return f"box({self.value!r})"


# -- the committer's allow-list and imports -----------------------------------------------------

module_name = st.from_regex(r"[a-z_][a-z0-9_]{0,8}(\.[a-z_][a-z0-9_]{0,8}){0,2}", fullmatch=True)
bad_class_path = st.one_of(
    # inside the allow-list (``tests``), but not importable or not a trigger class
    st.sampled_from(
        [
            "tests.no_such_module.Trigger",
            "tests.streams.NoSuchClass",
            "tests.streams.wait_until",  # a function
            "tests.streams",  # a module
            "tests.streams.StreamTrigger.nested",
            "tests..Trigger",
            "tests.test_bad_input_generated.KwargsTrigger",  # producer build fails (kwargs)
            "tests.bad_import_" + uuid.uuid4().hex[:6] + ".X",
        ]
    ),
    # outside the allow-list
    st.tuples(module_name, st.from_regex(r"[A-Z][A-Za-z0-9]{0,8}", fullmatch=True))
    .filter(lambda t: not (t[0] == "tests" or t[0].startswith("tests.")))
    .map(".".join),
    st.sampled_from(["os.system", "subprocess.Popen", "builtins.eval", "", ".", "X"]),
    # any text a class path column can hold (NUL and lone surrogates are refused at subscribe)
    st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), max_size=30),
)


@given(class_path=bad_class_path)
@settings(
    max_examples=60,
    deadline=None,
    phases=PHASES,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
def test_trigger_class_paths_the_committer_cannot_use(
    class_path: str, committer_env: CommitterEnv
) -> None:
    committer_env.run(committer_env.example(class_path))


class CommitterEnv:
    """A committer allowed to import from ``tests`` with one healthy stream handed in, and a
    fresh stream per example whose stored trigger class it must rebuild."""

    def __init__(self, database_url: str) -> None:
        self.runner = asyncio.Runner()
        self.store = OutboxStore.from_url(database_url)
        self.good = Producer()
        self.committer = LaneCommitter(
            self.store,
            allowed_modules=["tests"],
            producers={("good",): self.good},
            retry_base=3600.0,
        )
        self.counter = itertools.count()

    def run(self, coro: Any) -> Any:
        return self.runner.run(asyncio.wait_for(coro, 60))

    async def _add(self, key: Any, class_path: str, payload: str) -> int:
        store = self.store
        stream_id = await store.ensure_stream(
            canonical_json(key, what="key"), class_path, json.dumps({"kw": 1}), 300.0
        )
        lanes = await store.ensure_lanes(stream_id, ["null"])
        from outbox.store import EventToRecord, ResolutionRow

        event = EventToRecord(stream_id, lanes["null"], None, None, json.dumps(payload), ["s"])
        async with store.engine.begin() as conn:
            await store.record_events(conn, [event])
            await store.resolve(
                conn,
                [ResolutionRow(stream_id, event.event_id, "s", "acked", None, ['{"r": 1}'])],
            )
        return stream_id

    async def example(self, class_path: str) -> None:
        n = next(self.counter)
        key = ("bad", n)
        await self._add(key, class_path, f"bad{n}")
        await self._add(("good",), "tests.not.Used", f"good{n}")
        await self.committer.run_once()
        assert [p for batch in self.good.batches for p in batch][-1] == f"good{n}"
        async with self.store.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.text(
                        "SELECT l.advanced_through, l.last_error, "
                        "(SELECT count(*) FROM outbox_record r WHERE r.stream_id = s.id) "
                        "FROM outbox_lane l JOIN outbox_stream s ON s.id = l.stream_id "
                        "WHERE s.key = :key"
                    ),
                    {"key": canonical_json(key, what="key")},
                )
            ).one()
        advanced_through, last_error, stored = row
        assert advanced_through == 0 and stored == 1  # not advanced, nothing lost
        assert last_error is not None and "\n" not in last_error, last_error
        assert len(last_error) <= MAX_MESSAGE, last_error
        assert canonical_json(key, what="key") in last_error, last_error
        assert "--allow-module" in last_error or "class" in last_error, last_error

    def close(self) -> None:
        self.runner.run(self.store.aclose())
        self.runner.close()


@pytest.fixture
def committer_env(database_url: str) -> Iterator[CommitterEnv]:
    env = CommitterEnv(database_url)
    try:
        yield env
    finally:
        env.close()


def test_values_nested_past_the_recursion_limit_get_a_short_message() -> None:
    """Outside hypothesis: a RecursionError inside its engine trips CPython 3.11's AST check."""
    deep = _deep(50_000)
    with pytest.raises(TypeError) as failure:
        encode({"v": deep}, what="stream 'deep': raw event")
    assert_one_line(failure.value, "'deep'", "nested too deeply")
    with pytest.raises(TypeError) as failure:
        to_json({"v": deep}, what="stream 'deep': trigger kwargs")
    assert_one_line(failure.value, "'deep'", "nested too deeply")
    with pytest.raises(TypeError) as failure:
        canonical_json(deep, what="lane")
    assert_one_line(failure.value, "lane", "nested too deeply")


def test_odd_values_have_no_canonical_form_but_a_short_message() -> None:
    for value in (
        object(),
        {1: 2},
        [HUGE, object()],
        datetime.date(2020, 1, 1),
        decimal.Decimal(1),
    ):
        with pytest.raises(TypeError) as failure:
            canonical_json(value, what="lane")
        assert_one_line(failure.value, "lane")

"""The values brokers and triggers hand over, as hypothesis strategies, and an equality that
also compares types (``1 == 1.0 == True``, ``(1,) != [1]`` but ``nan != nan``)."""

from __future__ import annotations

import datetime
import decimal
import enum
import math
from typing import Any, NamedTuple

from airflow.providers.apache.kafka.triggers.shared_stream import KafkaBrokerPayload
from hypothesis import strategies as st


class Colour(enum.Enum):
    RED = "red"
    BLUE = (0, 0, 255)


class Priority(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Point(NamedTuple):
    x: Any
    y: Any = None


class Framed(NamedTuple):
    """A Kafka-shaped broker payload of our own (the real one is ``KafkaBrokerPayload``)."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None


# Strings that look like what the codec reads on the text, or holds jsonb refuses.
tricky_text = st.sampled_from(
    [
        "",
        "\x00",
        "a\x00b",
        "\ud800",
        "x\udfff",
        "\udc00\ud800",  # a low then a high: two lone surrogates
        "\U0001f600",  # a pair when escaped, fine
        "\\u0000",  # a backslash, then "u0000"
        "\\ud800",
        "__outbox__",
        '"__outbox__"',
        "1e+16",
        "-0.0",
        "e+",
    ]
)
any_text = st.one_of(
    st.text(st.characters(blacklist_categories=()), max_size=12),  # NUL and surrogates included
    tricky_text,
)
framed_bytes = st.binary(max_size=12).map(lambda b: b"\x00\x00\x00\x00\x07" + b)
any_bytes = st.one_of(st.binary(max_size=12), framed_bytes)
fixed_offsets = st.builds(
    datetime.timezone,
    st.timedeltas(
        min_value=datetime.timedelta(hours=-23, minutes=-59),
        max_value=datetime.timedelta(hours=23, minutes=59),
    ),
)
zones = st.one_of(st.none(), st.timezones(), fixed_offsets)
floats = st.one_of(
    st.floats(),
    st.sampled_from([0.0, -0.0, 1e16, -1e16, 1.5e300, 5e-324, 1e-7, math.inf, -math.inf]),
)
# Past int/str's 4,300-digit limit too (the codec stores those as hex).
huge_integers = st.integers(4001, 4400).map(lambda digits: 10**digits)
integers = st.one_of(
    st.integers(), st.sampled_from([2**63, -(2**64)]), huge_integers, huge_integers.map(int.__neg__)
)
decimals = st.one_of(
    st.decimals(),
    st.sampled_from([decimal.Decimal(t) for t in ("1.10", "-0", "1E+2", "NaN", "-Infinity")]),
)

# Values that can be dict keys and set members (no NaN: a NaN key is only equal to itself).
hashable_leaf = st.one_of(
    st.none(),
    st.booleans(),
    integers,
    st.floats(allow_nan=False),
    any_text,
    any_bytes,
    st.dates(),
    st.uuids(),
    st.sampled_from([*Colour, *Priority]),
)
hashable = st.recursive(
    hashable_leaf,
    lambda inner: st.one_of(
        st.tuples(inner, inner),
        st.frozensets(inner, max_size=3),
        st.builds(Point, inner, inner),
    ),
    max_leaves=4,
)

leaf = st.one_of(
    hashable_leaf,
    floats,
    decimals,
    st.complex_numbers(),
    any_bytes.map(bytearray),
    st.datetimes(timezones=zones),
    st.times(timezones=zones),
    st.timedeltas(),
    st.builds(
        Framed,
        st.text(max_size=5),
        st.integers(0, 99),
        st.integers(0, 2**63),
        st.none() | any_bytes,
        st.none() | any_bytes,
    ),
    st.builds(
        KafkaBrokerPayload,
        st.text(max_size=5),
        st.integers(0, 99),
        st.integers(0, 2**63),
        st.none() | any_bytes,
        st.none() | any_bytes,
    ),
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=5), inner, max_size=4),
        st.dictionaries(st.sampled_from(["__outbox__", "v", "c"]), inner, max_size=3),
        st.dictionaries(hashable, inner, max_size=3),
        st.sets(hashable, max_size=3),
        st.frozensets(hashable, max_size=3),
        st.builds(Point, inner, inner),
    )


zoo = st.recursive(leaf, _containers, max_leaves=12)

# What plain JSON holds, jsonb too (no NUL, no lone surrogate, no float jsonb turns into an int,
# no key that is the codec's own tag: such a dict is escaped).
plain_text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]))
plain_key = plain_text.filter(lambda key: key != "__outbox__")
plain_json = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False, min_value=-1e15, max_value=1e15).filter(
            lambda f: math.copysign(1.0, f) > 0 or f != 0
        ),
        plain_text,
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(plain_key, inner, max_size=4)
    ),
    max_leaves=12,
)


def same(expected: Any, actual: Any) -> bool:
    """Equal in type and value, all the way down; NaN is the same as NaN, -0.0 is not 0.0,
    ``Decimal("1.10")`` is not ``Decimal("1.1")``, datetimes keep their zone and fold."""
    if type(expected) is not type(actual):
        return False
    if isinstance(expected, float):
        if math.isnan(expected):
            return math.isnan(actual)
        return expected == actual and math.copysign(1, expected) == math.copysign(1, actual)
    if isinstance(expected, complex):
        return same(expected.real, actual.real) and same(expected.imag, actual.imag)
    if isinstance(expected, decimal.Decimal):
        return str(expected) == str(actual)
    if isinstance(expected, datetime.datetime | datetime.time):
        return bool(
            expected.replace(tzinfo=None) == actual.replace(tzinfo=None)
            and expected.fold == actual.fold
            and expected.tzinfo == actual.tzinfo
            and expected.utcoffset() == actual.utcoffset()
        )
    if isinstance(expected, list | tuple):
        return len(expected) == len(actual) and all(map(same, expected, actual))
    if isinstance(expected, dict):
        if expected.keys() != actual.keys():
            return False
        keys = {key: key for key in actual}
        return all(
            same(key, keys[key]) and same(item, actual[key]) for key, item in expected.items()
        )
    if isinstance(expected, set | frozenset):
        members = {member: member for member in actual}
        return expected == actual and all(same(m, members[m]) for m in expected)
    return bool(expected == actual)

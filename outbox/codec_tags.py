"""The codec's tags (the table in ``outbox.codec``'s docstring): the walk that turns what plain
JSON cannot hold into tagged objects, and the decoders that rebuild them."""

from __future__ import annotations

import binascii
import datetime
import decimal
import enum
import uuid
import zoneinfo
from typing import TYPE_CHECKING, Any, Final, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

__all__ = (
    "DECODERS",
    "INT_LIMIT",
    "NEGATIVE_INT_LIMIT",
    "TAG",
    "Unstorable",
    "forget_seen_classes",
    "items",
    "seen_by_name",
    "tagged",
    "valid_unicode",
)

TAG: Final = "__outbox__"

# int <-> str conversion is limited to 4,300 digits; keep well inside it (10**4000 and more
# is stored as hex).
INT_LIMIT: Final = 10**4000
NEGATIVE_INT_LIMIT: Final = -INT_LIMIT


class Unstorable(Exception):
    def __init__(self, value: Any) -> None:
        self.value = value


def valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- tagging ----------------------------------------------------------------------------------


def _b64(data: bytes | bytearray) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _plain_float(value: float) -> bool:
    text = float.__repr__(value)
    return not ("e+" in text or text in ("nan", "inf", "-inf", "-0.0"))


def _tagged_str(value: str) -> Any:
    if "\x00" not in value and (value.isascii() or valid_unicode(value)):
        return value
    return {TAG: "str", "v": _b64(value.encode("utf-8", "surrogatepass"))}


def _tagged_float(value: float) -> Any:
    return value if _plain_float(value) else {TAG: "float", "v": float.__repr__(value)}


def _tagged_int(value: int) -> Any:
    return value if NEGATIVE_INT_LIMIT < value < INT_LIMIT else {TAG: "int", "v": hex(value)}


def _tagged_dict(value: dict[Any, Any]) -> Any:
    plain_keys = TAG not in value
    if plain_keys:
        for key in value:
            if type(key) is not str or _tagged_str(key) is not key:
                plain_keys = False
                break
    if plain_keys:
        return {key: tagged(item) for key, item in value.items()}
    return {TAG: "dict", "v": [[tagged(key), tagged(item)] for key, item in value.items()]}


def _tagged_datetime(value: datetime.datetime | datetime.time) -> Any:
    tagged: dict[str, Any] = {
        TAG: "datetime" if isinstance(value, datetime.datetime) else "time",
        "v": value.isoformat(),
    }
    if isinstance(value.tzinfo, zoneinfo.ZoneInfo):
        tagged["z"] = value.tzinfo.key
    if value.fold:
        tagged["f"] = 1
    return tagged


# Class of an encoded NamedTuple or Enum -> its "module:qualname"; and the other way, for the
# classes this process has encoded (they may be rebuilt without an allow-list).
_names_of_seen: dict[type, str] = {}
seen_by_name: dict[tuple[str, str], type] = {}


def _class_name(kind: type, what: str) -> str:
    name = _names_of_seen.get(kind)
    if name is None:
        name = f"{kind.__module__}:{kind.__qualname__}"
        _names_of_seen[kind] = name
        seen_by_name[(name, what)] = kind
    return name


def forget_seen_classes() -> None:
    """Forget which NamedTuple and Enum classes this process has encoded: from now on only the
    allowed modules' classes are rebuilt (as in a process that never encoded any)."""
    _names_of_seen.clear()
    seen_by_name.clear()


def _tagged_list(items: Iterable[Any]) -> list[Any]:
    return [tagged(item) for item in items]


def _tagged_tuple(value: tuple[Any, ...]) -> Any:
    if hasattr(type(value), "_fields"):
        return {
            TAG: "namedtuple",
            "c": _class_name(type(value), "NamedTuple"),
            "v": _tagged_list(value),
        }
    return {TAG: "tuple", "v": _tagged_list(value)}


def _tagged_enum(value: enum.Enum) -> Any:
    return {TAG: "enum", "c": _class_name(type(value), "Enum"), "v": tagged(value.value)}


def _tagged_complex(value: complex) -> Any:
    return {TAG: "complex", "v": [_tagged_float(value.real), _tagged_float(value.imag)]}


def _tagged_date(value: datetime.date) -> Any:
    return {TAG: "date", "v": value.isoformat()}


def _tagged_timedelta(value: datetime.timedelta) -> Any:
    return {TAG: "timedelta", "v": [value.days, value.seconds, value.microseconds]}


def _tagged_as(tag: str, convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: {TAG: tag, "v": convert(value)}


def _unchanged(value: Any) -> Any:
    return value


# By exact type: the common case, one dictionary lookup (subclasses join once seen).
_TAGGERS: dict[type, Callable[[Any], Any]] = {
    str: _tagged_str,
    int: _tagged_int,
    float: _tagged_float,
    bool: _unchanged,
    type(None): _unchanged,
    list: _tagged_list,
    dict: _tagged_dict,
    tuple: _tagged_tuple,
    bytes: _tagged_as("bytes", _b64),
    bytearray: _tagged_as("bytearray", _b64),
    set: _tagged_as("set", _tagged_list),
    frozenset: _tagged_as("frozenset", _tagged_list),
    complex: _tagged_complex,
    datetime.datetime: _tagged_datetime,
    datetime.time: _tagged_datetime,
    datetime.date: _tagged_date,
    datetime.timedelta: _tagged_timedelta,
    decimal.Decimal: _tagged_as("decimal", str),
    uuid.UUID: _tagged_as("uuid", str),
}
# Subclasses, in the order they are tried (enums before the types they mix in, datetime before
# date); the base type's tagger gets the value converted to the base type where that matters.
_SUBCLASS_TAGGERS: tuple[tuple[type, Callable[[Any], Any]], ...] = (
    (enum.Enum, _tagged_enum),
    (tuple, _tagged_tuple),
    (str, lambda value: _tagged_str(str(value))),
    (int, lambda value: _tagged_int(int(value))),
    (float, lambda value: _tagged_float(float(value))),
    (dict, lambda value: _tagged_dict(dict(value))),
    (list, _tagged_list),
    (datetime.datetime, _tagged_datetime),
    (datetime.time, _tagged_datetime),
    (datetime.date, _tagged_date),
    (datetime.timedelta, _tagged_timedelta),
    (bytes, _TAGGERS[bytes]),
    (bytearray, _TAGGERS[bytearray]),
    (frozenset, _TAGGERS[frozenset]),
    (set, _TAGGERS[set]),
    (complex, _tagged_complex),
    (decimal.Decimal, _TAGGERS[decimal.Decimal]),
    (uuid.UUID, _TAGGERS[uuid.UUID]),
)


def tagged(value: Any) -> Any:
    """``value`` as plain JSON data: what plain JSON cannot hold as tagged objects."""
    kind = type(value)
    tagger = _TAGGERS.get(kind)
    if tagger is not None:
        return tagger(value)
    for base, tagger in _SUBCLASS_TAGGERS:
        if isinstance(value, base):
            _TAGGERS[kind] = tagger  # a payload class repeats: found by its type from now on
            return tagger(value)
    raise Unstorable(value)


# -- decoding ---------------------------------------------------------------------------------

_Zoned = TypeVar("_Zoned", datetime.datetime, datetime.time)


def items(tagged: dict[str, Any]) -> list[Any]:
    items = tagged["v"]
    if type(items) is not list:
        raise TypeError(f'"v" is {type(items).__name__}, expected a list')
    return items


def _base64(tagged: dict[str, Any]) -> bytes:
    return binascii.a2b_base64(tagged["v"], strict_mode=True)


def _decoded_datetime(tagged: dict[str, Any]) -> datetime.datetime:
    return _zoned(datetime.datetime.fromisoformat(tagged["v"]), tagged)


def _decoded_time(tagged: dict[str, Any]) -> datetime.time:
    return _zoned(datetime.time.fromisoformat(tagged["v"]), tagged)


def _zoned(value: _Zoned, tagged: dict[str, Any]) -> _Zoned:
    zone = tagged.get("z")
    if zone is not None:
        value = value.replace(tzinfo=zoneinfo.ZoneInfo(zone))
    if tagged.get("f"):
        value = value.replace(fold=1)
    return value


def _decoded_dict(tagged: dict[str, Any]) -> dict[Any, Any]:
    pairs = items(tagged)
    for pair in pairs:
        if type(pair) is not list or len(pair) != 2:
            raise TypeError("an item is not a [key, value] pair")
    return dict(pairs)


# tag -> rebuild from the tagged object (whose contents are decoded already).
DECODERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "bytes": _base64,
    "bytearray": lambda tagged: bytearray(_base64(tagged)),
    "str": lambda tagged: _base64(tagged).decode("utf-8", "surrogatepass"),
    "float": lambda tagged: float(tagged["v"]),
    "int": lambda tagged: int(tagged["v"], 16),
    "complex": lambda tagged: complex(*items(tagged)),
    "tuple": lambda tagged: tuple(items(tagged)),
    "set": lambda tagged: set(items(tagged)),
    "frozenset": lambda tagged: frozenset(items(tagged)),
    "dict": _decoded_dict,
    "datetime": _decoded_datetime,
    "time": _decoded_time,
    "date": lambda tagged: datetime.date.fromisoformat(tagged["v"]),
    "timedelta": lambda tagged: datetime.timedelta(*items(tagged)),
    "decimal": lambda tagged: decimal.Decimal(tagged["v"]),
    "uuid": lambda tagged: uuid.UUID(tagged["v"]),
}

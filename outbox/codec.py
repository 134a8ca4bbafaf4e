"""Lossless, typed JSON for what brokers and triggers hand over: raw events, broker payloads and
trigger-event payloads.

A plain JSON value (``str`` without NUL or lone surrogates, finite ``float`` that ``jsonb`` keeps
a float, ``int``, ``bool``, ``None``, ``list``, ``dict`` with ``str`` keys) is stored as exactly
the compact JSON text ``outbox.protocol.to_json`` produces, so SQL readers and ``jsonb`` queries
see it unchanged. Anything else becomes a tagged object ``{"__outbox__": <tag>, "v": ...}``:

========== ==================================================================================
tag        value
========== ==================================================================================
bytes      ``bytes``; ``"v"``: base64
bytearray  ``bytearray``; ``"v"``: base64
str        ``str`` holding NUL or a lone surrogate (``jsonb`` refuses both); ``"v"``: base64 of
           its UTF-8 (``surrogatepass``)
float      NaN, ±infinity, -0.0 and floats of 1e16 and more (``jsonb`` would give them back as
           integers); ``"v"``: ``repr``
int        an ``int`` of more than 4,000 digits (Python's int/str conversion limit); ``"v"``: hex
complex    ``"v"``: ``[real, imag]``
tuple      ``"v"``: the items
namedtuple ``"c"``: ``"module:qualname"`` of the class; ``"v"``: the field values
enum       ``"c"``: ``"module:qualname"`` of the class; ``"v"``: the member's value
dict       a ``dict`` with a key that is not a plain ``str``, or with the key ``"__outbox__"``;
           ``"v"``: ``[[key, value], ...]``
set        ``set``; ``"v"``: the items (``frozenset``: tag ``frozenset``)
datetime   ``"v"``: ``isoformat()`` (with its UTC offset when aware); ``"z"``: the zone key of a
           ``zoneinfo.ZoneInfo``; ``"f"``: 1 when ``fold`` is 1 (``date``, ``time`` alike)
timedelta  ``"v"``: ``[days, seconds, microseconds]``
decimal    ``decimal.Decimal``; ``"v"``: ``str`` (exponent, sign and NaN kept)
uuid       ``uuid.UUID``; ``"v"``: ``str``
========== ==================================================================================

Subclasses of these types other than enums and NamedTuples (a ``str`` subclass, an
``OrderedDict``, a pendulum ``DateTime``) are stored as their base type: they come back equal
in value, as the base type (as ``to_json`` stored them).

Decoding never runs code from the stored text: no pickle, no eval. A NamedTuple or Enum class is
rebuilt only if this process encoded an instance of that very class, or if its module is inside
the decoder's allowed modules (then it is imported, and must really be a NamedTuple or an Enum
class).
"""

from __future__ import annotations

import binascii
import datetime
import decimal
import enum
import importlib
import json
import json.encoder
import json.scanner
import re
import uuid
import zoneinfo
from typing import TYPE_CHECKING, Any, Final, TypeVar

from outbox.core import short_repr
from outbox.errors import UndecodableValue

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

__all__ = ("TAG", "Codec", "encode", "forget_seen_classes")

TAG: Final = "__outbox__"

_FIX: Final = (
    "convert it to str, bytes, numbers, lists, tuples, dicts, sets, NamedTuples, enums, "
    "datetimes, Decimal or UUID"
)

# -- encoding ---------------------------------------------------------------------------------

_make_c_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
if _make_c_encoder is None:  # pragma: no cover - CPython always has the C accelerator
    raise ImportError("outbox.codec needs CPython's json C accelerator (_json)")
# The same encoder as ``outbox.protocol.to_json``: compact, NaN refused, ASCII only.
_c_encode: Callable[[Any, int], Any] = _make_c_encoder(
    None,
    None,
    json.encoder.encode_basestring_ascii,
    None,
    ":",
    ",",
    False,
    False,
    False,
)
_quote: Callable[[str], str] = json.encoder.encode_basestring_ascii

_PLAIN_LEAVES: Final = frozenset({str, int, bool, type(None)})  # and floats, checked apart
# int <-> str conversion is limited to 4,300 digits; keep well inside it (10**4000 and more
# is stored as hex).
_INT_LIMIT: Final = 10**4000
_NEGATIVE_INT_LIMIT: Final = -_INT_LIMIT
# A surrogate escape that is not half of a pair: a high one not followed by a low one, a low
# one not preceded by a high one.
_LONE_SURROGATE_ESCAPE = re.compile(
    r"(?<!\\)(?:\\\\)*\\ud[89ab][0-9a-f]{2}(?!\\ud[c-f])"
    r"|(?<!\\ud[89ab][0-9a-f]{2})(?<!\\)(?:\\\\)*\\ud[c-f][0-9a-f]{2}"
)
# A float that repr writes with a positive exponent (1e16 and more): jsonb prints it as an
# integer.
_POSITIVE_EXPONENT = re.compile(r"\de\+\d")


# What ``_plain_shape`` finds.
_NEEDS_TAGS: Final = 0
_PLAIN: Final = 1
_PLAIN_WITH_FLOATS: Final = 2


def _plain_shape(value: dict[Any, Any] | list[Any]) -> int:
    """Whether the C encoder writes ``value`` without losing what its text cannot show: only
    exact dicts (exact ``str`` keys, not the tag key), lists and plain leaves. Floats and
    strings are then checked on the text (most values have no floats: no float scans)."""
    shape = _PLAIN
    if type(value) is dict:
        if TAG in value:
            return _NEEDS_TAGS
        for key, item in value.items():
            if type(key) is not str:
                return _NEEDS_TAGS
            kind = type(item)
            if kind is str:
                if len(item) > MOST_BYTES:
                    raise _TooLarge(len(item))
                continue
            if kind in _PLAIN_LEAVES:
                continue
            if kind is float:
                shape = _PLAIN_WITH_FLOATS
            elif kind is dict or kind is list:
                inner = _plain_shape(item)
                if inner == _NEEDS_TAGS:
                    return _NEEDS_TAGS
                shape = max(shape, inner)
            else:
                return _NEEDS_TAGS
        return shape
    for item in value:
        kind = type(item)
        if kind is str:
            if len(item) > MOST_BYTES:
                raise _TooLarge(len(item))
            continue
        if kind in _PLAIN_LEAVES:
            continue
        if kind is float:
            shape = _PLAIN_WITH_FLOATS
        elif kind is dict or kind is list:
            inner = _plain_shape(item)
            if inner == _NEEDS_TAGS:
                return _NEEDS_TAGS
            shape = max(shape, inner)
        else:
            return _NEEDS_TAGS
    return shape


def _plain_text(value: dict[str, Any] | list[Any], shape: int) -> str | None:
    """The C encoder's text of a plain-shaped ``value``, or ``None`` when it needs tags after
    all: a NUL, a lone surrogate, or a float that jsonb would give back as an integer (the
    cheap scans first; a false alarm only costs the tagging pass)."""
    try:
        text: str = "".join(_c_encode(value, 0))
    except ValueError:  # NaN or infinity, or an int too long for str()
        return None
    if "\\u" in text and ("\\u0000" in text or _lone_surrogate(text)):
        return None
    if shape == _PLAIN_WITH_FLOATS and (
        "-0.0" in text or ("e+" in text and _POSITIVE_EXPONENT.search(text) is not None)
    ):
        return None
    return text


def _lone_surrogate(text: str) -> bool:
    return "\\ud" in text and _LONE_SURROGATE_ESCAPE.search(text) is not None


# The most JSON one stored value may hold: Postgres's jsonb refuses a value of 256 MiB or more
# (and a statement that carries one fails whole); a little under it, for jsonb's own headers.
MOST_BYTES: Final = 255 * 1024 * 1024


def encode(value: Any, *, what: str) -> str:
    """The JSON text that stores ``value`` losslessly (see the module's table), or a one-line
    ``TypeError`` naming ``what``, the type that cannot be stored, and the fix (``ValueError``
    when it is too large for Postgres)."""
    try:
        text = _encode(value, what=what)
    except _TooLarge as large:  # a text longer than that, found before encoding it
        raise _too_large(what, large.size, "at least ") from None
    if len(text) > MOST_BYTES // 4:
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > MOST_BYTES:
            raise _too_large(what, size, "")
    return text


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        self.size = size


def _too_large(what: str, size: int, bound: str) -> ValueError:
    return ValueError(
        f"{what} is {bound}{size / 1024 / 1024:,.0f} MiB as JSON, more than Postgres stores in "
        f"one value ({MOST_BYTES // 1024 // 1024} MiB); keep the data elsewhere and put a "
        "reference to it in the payload"
    )


def _encode(value: Any, *, what: str) -> str:
    kind = type(value)
    try:
        if kind is dict or kind is list:
            shape = _plain_shape(value)
            if shape != _NEEDS_TAGS:
                text = _plain_text(value, shape)
                if text is not None:
                    return text
        elif kind is str:
            if len(value) > MOST_BYTES:
                raise _TooLarge(len(value))
            if "\x00" not in value and (value.isascii() or _valid_unicode(value)):
                return _quote(value)
        elif kind is int:
            if _NEGATIVE_INT_LIMIT < value < _INT_LIMIT:
                return int.__repr__(value)
        elif value is None:
            return "null"
        elif kind is bool:
            return "true" if value else "false"
        return "".join(_c_encode(_tagged(value), 0))
    except _Unstorable as failure:
        where = _path_to(value, failure.value)
        raise TypeError(
            f"{what} holds a value of type {_type_name(failure.value)}{where}, which cannot be "
            f"stored; {_FIX}"
        ) from None
    except RecursionError:
        raise TypeError(f"{what} is nested too deeply to store; flatten it") from None


class _Unstorable(Exception):
    def __init__(self, value: Any) -> None:
        self.value = value


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _b64(data: bytes | bytearray) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _plain_float(value: float) -> bool:
    text = float.__repr__(value)
    return not ("e+" in text or text in ("nan", "inf", "-inf", "-0.0"))


def _tagged_str(value: str) -> Any:
    if "\x00" not in value and (value.isascii() or _valid_unicode(value)):
        return value
    return {TAG: "str", "v": _b64(value.encode("utf-8", "surrogatepass"))}


def _tagged_float(value: float) -> Any:
    return value if _plain_float(value) else {TAG: "float", "v": float.__repr__(value)}


def _tagged_int(value: int) -> Any:
    return value if _NEGATIVE_INT_LIMIT < value < _INT_LIMIT else {TAG: "int", "v": hex(value)}


def _tagged_dict(value: dict[Any, Any]) -> Any:
    plain_keys = TAG not in value
    if plain_keys:
        for key in value:
            if type(key) is not str or _tagged_str(key) is not key:
                plain_keys = False
                break
    if plain_keys:
        return {key: _tagged(item) for key, item in value.items()}
    return {TAG: "dict", "v": [[_tagged(key), _tagged(item)] for key, item in value.items()]}


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
_seen_by_name: dict[tuple[str, str], type] = {}


def _class_name(kind: type, what: str) -> str:
    name = _names_of_seen.get(kind)
    if name is None:
        name = f"{kind.__module__}:{kind.__qualname__}"
        _names_of_seen[kind] = name
        _seen_by_name[(name, what)] = kind
    return name


def forget_seen_classes() -> None:
    """Forget which NamedTuple and Enum classes this process has encoded: from now on only the
    allowed modules' classes are rebuilt (as in a process that never encoded any)."""
    _names_of_seen.clear()
    _seen_by_name.clear()


def _tagged_list(items: Iterable[Any]) -> list[Any]:
    return [_tagged(item) for item in items]


def _tagged_tuple(value: tuple[Any, ...]) -> Any:
    if hasattr(type(value), "_fields"):
        return {
            TAG: "namedtuple",
            "c": _class_name(type(value), "NamedTuple"),
            "v": _tagged_list(value),
        }
    return {TAG: "tuple", "v": _tagged_list(value)}


def _tagged_enum(value: enum.Enum) -> Any:
    return {TAG: "enum", "c": _class_name(type(value), "Enum"), "v": _tagged(value.value)}


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


def _tagged(value: Any) -> Any:
    """``value`` as plain JSON data: what plain JSON cannot hold as tagged objects."""
    kind = type(value)
    tagger = _TAGGERS.get(kind)
    if tagger is not None:
        return tagger(value)
    for base, tagger in _SUBCLASS_TAGGERS:
        if isinstance(value, base):
            _TAGGERS[kind] = tagger  # a payload class repeats: found by its type from now on
            return tagger(value)
    raise _Unstorable(value)


def _shown(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters, one line (for names and paths in errors)."""
    text = text if text.isprintable() else repr(text)[1:-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value: Any) -> str:
    kind = type(value)
    if kind.__module__ == "builtins":
        return _shown(kind.__qualname__)
    return _shown(f"{kind.__module__}.{kind.__qualname__}")


def _path_to(value: Any, target: Any, limit: int = 64) -> str:
    """`` at [...]``: where ``target`` sits inside ``value`` (empty when it is ``value``)."""

    def search(node: Any, depth: int) -> list[str] | None:
        if node is target:
            return []
        if depth >= limit:
            return None
        if isinstance(node, dict):
            for key, item in node.items():
                if key is target:
                    return [f"<key {short_repr(key)}>"]
                found = search(item, depth + 1)
                if found is not None:
                    return [f"[{short_repr(key)}]", *found]
        elif isinstance(node, list | tuple | set | frozenset):
            for index, item in enumerate(node):
                found = search(item, depth + 1)
                if found is not None:
                    return [f"[{index}]", *found]
        return None

    try:
        path = search(value, 0)
    except RecursionError:  # pragma: no cover - the limit keeps it shallow
        path = None
    return f" at {_shown(''.join(path))}" if path else ""


# -- decoding ---------------------------------------------------------------------------------

# Postgres prints a jsonb value as exactly one JSON value: the C scanner reads it without
# json.loads' Python wrapper (see outbox.store).
_scan: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(
    json.JSONDecoder()  # type: ignore[arg-type]
)
_TAG_IN_TEXT: Final = f'"{TAG}"'
_Zoned = TypeVar("_Zoned", datetime.datetime, datetime.time)


def _items(tagged: dict[str, Any]) -> list[Any]:
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
    pairs = _items(tagged)
    for pair in pairs:
        if type(pair) is not list or len(pair) != 2:
            raise TypeError("an item is not a [key, value] pair")
    return dict(pairs)


# tag -> rebuild from the tagged object (whose contents are decoded already).
_DECODERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "bytes": _base64,
    "bytearray": lambda tagged: bytearray(_base64(tagged)),
    "str": lambda tagged: _base64(tagged).decode("utf-8", "surrogatepass"),
    "float": lambda tagged: float(tagged["v"]),
    "int": lambda tagged: int(tagged["v"], 16),
    "complex": lambda tagged: complex(*_items(tagged)),
    "tuple": lambda tagged: tuple(_items(tagged)),
    "set": lambda tagged: set(_items(tagged)),
    "frozenset": lambda tagged: frozenset(_items(tagged)),
    "dict": _decoded_dict,
    "datetime": _decoded_datetime,
    "time": _decoded_time,
    "date": lambda tagged: datetime.date.fromisoformat(tagged["v"]),
    "timedelta": lambda tagged: datetime.timedelta(*_items(tagged)),
    "decimal": lambda tagged: decimal.Decimal(tagged["v"]),
    "uuid": lambda tagged: uuid.UUID(tagged["v"]),
}
_no_containers: Callable[[Iterable[type]], bool] = frozenset({dict, list}).isdisjoint


def _is_namedtuple_class(kind: Any) -> bool:
    return (
        isinstance(kind, type)
        and issubclass(kind, tuple)
        and hasattr(kind, "_fields")
        and hasattr(kind, "_make")
    )


def _is_enum_class(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, enum.Enum)


class Codec:
    """Decodes what ``encode`` stored.

    :param allowed_modules: module prefixes whose NamedTuple and Enum classes may be imported
        to rebuild a stored value (``"pkg"`` allows ``pkg`` and ``pkg.sub``). Classes this
        process has encoded itself are rebuilt without it.
    """

    def __init__(self, allowed_modules: Iterable[str] = ()) -> None:
        self.allowed_modules = tuple(m.rstrip(".") for m in allowed_modules)
        self._imported: dict[tuple[str, str], type] = {}
        # Tagged text: the C scanner hands each object to the hook as it closes (innermost
        # first), a quarter faster than walking the parsed value.
        self._scan_tagged: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(
            json.JSONDecoder(object_hook=self._untag_if_tagged)  # type: ignore[arg-type]
        )

    def decode(self, text: str) -> Any:
        """The value stored as the JSON text ``text`` (a jsonb column's text, say)."""
        if _TAG_IN_TEXT not in text:
            return _scan(text, 0)[0]
        try:
            return self._scan_tagged(text, 0)[0]
        except RecursionError:
            raise UndecodableValue(
                "stored value is nested too deeply to decode; raise the recursion limit"
            ) from None

    def _untag_if_tagged(self, value: dict[str, Any]) -> Any:
        return self._untag(value) if TAG in value else value

    def decode_parsed(self, value: Any) -> Any:
        """The value stored as ``value``, JSON already parsed (as asyncpg gives a jsonb column,
        tags intact). ``value`` itself is left as it is."""
        kind = type(value)
        if kind is dict:
            # A flat, untagged dict (the usual payload): nothing to decode.
            if TAG not in value and _no_containers(map(type, value.values())):
                return value
        elif kind is not list:
            return value
        try:
            return self._revive(value)
        except RecursionError:
            raise UndecodableValue(
                "stored value is nested too deeply to decode; raise the recursion limit"
            ) from None

    def _revive(self, value: Any) -> Any:
        copy: Any = None
        if type(value) is dict:
            for key, item in value.items():
                kind = type(item)
                if kind is dict or kind is list:
                    revived = self._revive(item)
                    if revived is not item:
                        if copy is None:
                            copy = dict(value)
                        copy[key] = revived
            if TAG in value:
                return self._untag(value if copy is None else copy)
        else:
            for index, item in enumerate(value):
                kind = type(item)
                if kind is dict or kind is list:
                    revived = self._revive(item)
                    if revived is not item:
                        if copy is None:
                            copy = list(value)
                        copy[index] = revived
        return value if copy is None else copy

    def _untag(self, tagged: dict[str, Any]) -> Any:
        tag = tagged[TAG]
        decoder = _DECODERS.get(tag) if type(tag) is str else None
        try:
            if decoder is not None:
                return decoder(tagged)
            if tag == "namedtuple":
                return self._class(tagged["c"], "NamedTuple")._make(_items(tagged))
            if tag == "enum":
                return self._class(tagged["c"], "Enum")(tagged["v"])
        except UndecodableValue:
            raise
        except Exception as exc:  # malformed, or what an enum's lookup raises
            raise UndecodableValue(
                f"stored value tagged {short_repr(tag)} cannot be decoded "
                f"({type(exc).__name__}: {_first_line(exc)}); it was not written by outbox's "
                "codec or was changed since"
            ) from None
        raise UndecodableValue(
            f"stored value has the unknown tag {short_repr(tag)} under {TAG!r}; it was written "
            "by a newer outbox (upgrade outbox here) or is not outbox's"
        )

    def _class(self, name: Any, kind: str) -> Any:
        if type(name) is not str:
            raise TypeError(f'class name "c" is {type(name).__name__}, expected str')
        known = _seen_by_name.get((name, kind)) or self._imported.get((name, kind))
        if known is not None:
            return known
        module_name, _, qualname = name.partition(":")
        shown = _shown(name.replace(":", ".", 1))
        if not any(
            module_name == m or module_name.startswith(m + ".") for m in self.allowed_modules
        ):
            raise UndecodableValue(
                f"stored value is a {kind} of class {shown}, which this process has not "
                f"encoded and whose module is outside the allowed modules "
                f"{list(self.allowed_modules)}; add its module to the allow-list "
                f"(--allow-module {_shown(module_name)}, or allowed_modules=)"
            )
        try:
            found: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                found = getattr(found, part)
        except Exception as exc:  # ImportError, AttributeError, or what the module raises
            raise UndecodableValue(
                f"stored value is a {kind} of class {shown}, which cannot be imported "
                f"({type(exc).__name__}: {_first_line(exc)}); install the package that "
                "defines it where this process runs"
            ) from None
        is_kind = _is_namedtuple_class if kind == "NamedTuple" else _is_enum_class
        if not is_kind(found):
            raise UndecodableValue(
                f"stored value is a {kind} of class {shown}, but {shown} is "
                f"a {_type_name(found)}, not a {kind} class; the class at that path changed "
                "since the value was stored"
            )
        self._imported[(name, kind)] = found
        return found


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return short_repr(text.splitlines()[0]) if text else "no message"

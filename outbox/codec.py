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

import enum
import importlib
import json
import json.encoder
import json.scanner
import re
from typing import TYPE_CHECKING, Any, Final

from outbox import codec_tags
from outbox.codec_tags import (
    INT_LIMIT,
    NEGATIVE_INT_LIMIT,
    TAG,
    Unstorable,
    forget_seen_classes,
    items,
    tagged,
    valid_unicode,
)
from outbox.core import short_repr
from outbox.error_text import first_line, path_to, short_text, type_name
from outbox.errors import UndecodableValue

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

__all__ = ("TAG", "Codec", "encode", "forget_seen_classes")

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
            if "\x00" not in value and (value.isascii() or valid_unicode(value)):
                return _quote(value)
        elif kind is int:
            if NEGATIVE_INT_LIMIT < value < INT_LIMIT:
                return int.__repr__(value)
        elif value is None:
            return "null"
        elif kind is bool:
            return "true" if value else "false"
        return "".join(_c_encode(tagged(value), 0))
    except Unstorable as failure:
        where = path_to(value, failure.value)
        raise TypeError(
            f"{what} holds a value of type {type_name(failure.value)}{where}, which cannot be "
            f"stored; {_FIX}"
        ) from None
    except RecursionError:
        raise TypeError(f"{what} is nested too deeply to store; flatten it") from None


# -- decoding ---------------------------------------------------------------------------------

# Postgres prints a jsonb value as exactly one JSON value: the C scanner reads it without
# json.loads' Python wrapper (see outbox.store.sqlparts.from_jsonb).
_scan: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(
    json.JSONDecoder()  # type: ignore[arg-type]
)
_TAG_IN_TEXT: Final = f'"{TAG}"'
# Bound by assignment, not imported: CPython compiles ``name.get(...)`` on a name bound by an
# import without its method-call fast path (a bound method made per call, per tagged object).
_DECODERS = codec_tags.DECODERS
_seen_by_name = codec_tags.seen_by_name
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
                return self._class(tagged["c"], "NamedTuple")._make(items(tagged))
            if tag == "enum":
                return self._class(tagged["c"], "Enum")(tagged["v"])
        except UndecodableValue:
            raise
        except Exception as exc:  # malformed, or what an enum's lookup raises
            raise UndecodableValue(
                f"stored value tagged {short_repr(tag)} cannot be decoded "
                f"({type(exc).__name__}: {first_line(exc)}); it was not written by outbox's "
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
        shown = short_text(name.replace(":", ".", 1))
        if not any(
            module_name == m or module_name.startswith(m + ".") for m in self.allowed_modules
        ):
            raise UndecodableValue(
                f"stored value is a {kind} of class {shown}, which this process has not "
                f"encoded and whose module is outside the allowed modules "
                f"{list(self.allowed_modules)}; add its module to the allow-list "
                f"(--allow-module {short_text(module_name)}, or allowed_modules=)"
            )
        try:
            found: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                found = getattr(found, part)
        except Exception as exc:  # ImportError, AttributeError, or what the module raises
            raise UndecodableValue(
                f"stored value is a {kind} of class {shown}, which cannot be imported "
                f"({type(exc).__name__}: {first_line(exc)}); install the package that "
                "defines it where this process runs"
            ) from None
        is_kind = _is_namedtuple_class if kind == "NamedTuple" else _is_enum_class
        if not is_kind(found):
            raise UndecodableValue(
                f"stored value is a {kind} of class {shown}, but {shown} is "
                f"a {type_name(found)}, not a {kind} class; the class at that path changed "
                "since the value was stored"
            )
        self._imported[(name, kind)] = found
        return found

"""The values of flags and variables: converters (each raises ``ValueError`` saying what is
wrong and the fix), durations, and the limits they enforce."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Callable


DISTRIBUTION: Final = "shared-stream-outbox"
# Below this, prune deletes what deduplication of redeliveries and the reader need now;
# `prune --force` goes lower.
RETENTION_FLOOR: Final = 60.0
MIN_POLL_INTERVAL: Final = 0.01


# Each converter takes the text of a flag or variable and returns its value, or raises
# ValueError with what is wrong and the fix, to follow "--flag 'text'" or "VARIABLE='text'".

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)([smhdw]))+|\d+(?:\.\d+)?", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """Seconds from ``3600``, ``90s``, ``15m``, ``12h``, ``7d``, ``2w`` or ``1h30m``."""
    compact = str(text).strip().replace(" ", "")
    if not _DURATION.fullmatch(compact):
        raise ValueError("is not a duration; use seconds or a number with s, m, h, d or w")
    if compact.replace(".", "", 1).isdigit():
        return float(compact)
    return sum(
        float(number) * _UNITS[unit.lower()]
        for number, unit in re.findall(r"(\d+(?:\.\d+)?)([smhdw])", compact, re.IGNORECASE)
    )


def duration_above_zero(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError("is not above zero; use a duration such as 7d")
    return seconds


def show_duration(seconds: float) -> str:
    """``7d``, ``1h30m``, ``90.5s``: a duration as people write it."""
    if seconds < 60 or seconds != int(seconds):
        return f"{seconds:g}s"
    parts = []
    rest = int(seconds)
    for unit in ("w", "d", "h", "m", "s"):
        count, rest = divmod(rest, _UNITS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def seconds(minimum: float) -> Callable[[str], float]:
    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"is not a number; use seconds, at least {minimum:g}") from None
        if not math.isfinite(value) or value < minimum:
            raise ValueError(f"is out of range; use seconds, at least {minimum:g}")
        return value

    return seconds


def count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("is not a whole number; use 1 or more") from None
    if value < 1:
        raise ValueError("is below 1; use 1 or more")
    return value


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("is not a port number; use 0 to 65535 (0: any free port)") from None
    if not 0 <= value <= 65535:
        raise ValueError("is not a port number; use 0 to 65535 (0: any free port)")
    return value


def text(text: str) -> str:
    if not text.strip():
        raise ValueError("is empty; give a value")
    return text.strip()


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("is not a boolean; use 1 or 0")


def not_boolean(text: str) -> bool:
    return not boolean(text)


def each(convert: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """A converter of comma-separated items, for the variable of a repeatable flag."""

    def items(text: str) -> list[Any]:
        return [convert(item.strip()) for item in text.split(",") if item.strip()]

    return items


def one_of(*choices: str) -> Callable[[str], str]:
    def choice(text: str) -> str:
        if text.strip().lower() not in choices:
            raise ValueError(f"is not one of {', '.join(choices)}")
        return text.strip().lower()

    return choice

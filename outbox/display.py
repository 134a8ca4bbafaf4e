"""Stream keys and lanes for people: ``kafka/broker:9092/orders`` rather than canonical JSON.

Stream keys and lanes are stored as canonical JSON text (``["kafka","broker:9092",["orders"]]``).
Metrics labels and the status table show them readable: strings as they are, the items of a
list joined by ``/`` (a nested list's by ``,``), a mapping as ``key=value`` pairs. Where two
values would read the same, both keep their JSON text, so that no two series or rows merge.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ("lane_labels", "parsed", "readable", "readable_labels")


def parsed(text: str) -> Any:
    """The value of a canonical JSON text (the text itself if it is not JSON)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def readable(text: str) -> str:
    """A canonical JSON stream key or lane as people read it."""
    return _show(parsed(text), depth=0)


def _show(value: Any, *, depth: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if depth >= 2:
            return json.dumps(value, separators=(",", ":"))
        joiner = "/" if depth == 0 else ","
        return joiner.join(_show(item, depth=depth + 1) for item in value)
    if isinstance(value, dict):
        if depth >= 2:
            return json.dumps(value, separators=(",", ":"), sort_keys=True)
        return ",".join(f"{k}={_show(v, depth=2)}" for k, v in sorted(value.items()))
    return json.dumps(value)


def readable_labels(texts: Iterable[str]) -> dict[str, str]:
    """Each canonical JSON text's readable form, or the text itself where two texts would
    read the same."""
    unique = list(dict.fromkeys(texts))
    shown = {text: readable(text) for text in unique}
    counts = Counter(shown.values())
    return {text: label if counts[label] == 1 else text for text, label in shown.items()}


def lane_labels(lanes: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Readable labels of ``(stream key, lane)`` pairs, distinct within each stream."""
    by_stream: dict[str, list[str]] = {}
    for stream, lane in lanes:
        by_stream.setdefault(stream, []).append(lane)
    return {
        (stream, text): label
        for stream, texts in by_stream.items()
        for text, label in readable_labels(texts).items()
    }

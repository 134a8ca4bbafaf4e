"""How values and exceptions are named in one-line error messages: an exception's first line,
a text cut short, a value's type, where a value sits inside another."""

from __future__ import annotations

from typing import Any

from outbox.core import short_repr

__all__ = ("first_line", "path_to", "short_text", "type_name")


def first_line(exc: BaseException) -> str:
    """The start of the exception's first line, for one-line errors."""
    text = str(exc).strip()
    return short_repr(text.splitlines()[0]) if text else "no message"


def short_text(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters, one line (for names and paths in errors)."""
    text = text if text.isprintable() else repr(text)[1:-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def type_name(value: Any) -> str:
    kind = type(value)
    if kind.__module__ == "builtins":
        return short_text(kind.__qualname__)
    return short_text(f"{kind.__module__}.{kind.__qualname__}")


def path_to(value: Any, target: Any, limit: int = 64) -> str:
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
    return f" at {short_text(''.join(path))}" if path else ""

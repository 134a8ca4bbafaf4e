"""What a message's payload holds: key, value and headers as base64 text (for dead letters), and
the default raw event a message value decodes to."""

from __future__ import annotations

import base64
import json
from typing import Any

__all__ = ("b64", "decode_value", "unb64")


def b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def decode_value(value: bytes | None) -> Any:
    """The default raw event: the message value as JSON, else as text."""
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value.decode("utf-8", errors="replace")

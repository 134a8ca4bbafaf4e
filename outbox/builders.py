"""Producers rebuilt from what a stream stored: its trigger class's path (imported only inside
the allowed modules, a failure told in one line) and the kwargs of its producer."""

from __future__ import annotations

import asyncio
import importlib
import signal
import threading
from typing import TYPE_CHECKING, Any

from outbox.core import short_repr
from outbox.error_text import first_line
from outbox.errors import ConfigurationError
from outbox.interop import adapt_producer

if TYPE_CHECKING:
    from types import FrameType, ModuleType

    from outbox.protocol import SharedStreamProducer

__all__ = ("rebuild_producer",)

# What stops the committer even when trigger code raised it: a cancelled task, Ctrl-C.
_SHUTDOWN = (asyncio.CancelledError, KeyboardInterrupt)


class _RaisedByTheModule(Exception):
    """A ``KeyboardInterrupt`` (its ``__cause__``) that the module raised itself, no SIGINT
    delivered: its failure, not a shutdown."""


def _import_module(name: str) -> ModuleType:
    """``importlib.import_module``, telling a SIGINT delivered while the module loads (its
    ``KeyboardInterrupt`` is raised again) from a ``KeyboardInterrupt`` the module raises of
    its own accord (``_RaisedByTheModule``)."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        return importlib.import_module(name)  # a SIGINT cannot be told apart: all are real
    delivered = False

    def noting(signum: int, frame: FrameType | None) -> Any:
        nonlocal delivered
        delivered = True
        return previous(signum, frame)

    signal.signal(signal.SIGINT, noting)
    try:
        return importlib.import_module(name)
    except KeyboardInterrupt as exc:
        if delivered:
            raise
        raise _RaisedByTheModule from exc
    finally:
        signal.signal(signal.SIGINT, previous)


def rebuild_producer(
    key_json: str, class_path: str, kwargs: dict[str, Any], *, allowed_modules: tuple[str, ...]
) -> SharedStreamProducer:
    """The producer of the stream ``key_json``: its trigger class imported from ``class_path``
    (inside ``allowed_modules``), ``create_shared_stream_producer(kwargs)``; else a one-line
    ``ConfigurationError`` naming the cause and the fix."""
    module_name, _, class_name = class_path.rpartition(".")
    shown = (
        class_path
        if class_path.isprintable() and 0 < len(class_path) <= 200
        else short_repr(class_path)
    )
    if not any(module_name == m or module_name.startswith(m + ".") for m in allowed_modules):
        raise ConfigurationError(
            f"stream {key_json}: trigger class {shown} is outside the allowed modules "
            f"{list(allowed_modules)}; add its module with --allow-module"
        )
    try:
        trigger_class = getattr(_import_module(module_name), class_name)
    except _SHUTDOWN:
        raise
    except BaseException as exc:  # ImportError, or whatever the module raises as it loads
        cause = (exc.__cause__ if isinstance(exc, _RaisedByTheModule) else None) or exc
        fix = (
            "install the package that defines it where the committer runs"
            if isinstance(cause, ImportError)
            else "fix what the module does as it loads"
        )
        raise ConfigurationError(
            f"stream {key_json}: cannot import trigger class {shown} "
            f"({type(cause).__name__}: {first_line(cause)}); {fix}"
        ) from None
    try:
        return adapt_producer(trigger_class.create_shared_stream_producer(kwargs))
    except _SHUTDOWN:
        raise
    except BaseException as exc:  # not a trigger class, its kwargs do not fit it, an exit
        raise ConfigurationError(
            f"stream {key_json}: cannot build a producer with {shown}"
            f".create_shared_stream_producer(kwargs) ({type(exc).__name__}: "
            f"{first_line(exc)}); the stored class path or kwargs do not fit the "
            "installed trigger class"
        ) from None

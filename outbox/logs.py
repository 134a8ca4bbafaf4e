"""One logging configuration for a whole ``outbox`` process: text or JSON lines on stderr.

Set up once, before any user module is imported, and kept: Airflow configures logging as it
is imported (its own handler on the root logger, writing to stdout, and structlog printing
directly), which a committer rebuilding an Airflow trigger's producer does mid-run. Once
``airflow`` has been imported, the root logger gets this handler back, other loggers' handlers
go (their records reach this one), and structlog hands its events to the standard library.

At ``info`` and above a record with an exception is one line (the exception's type and first
line after the message); at ``debug`` it carries the traceback.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import ModuleType

__all__ = ("FORMATS", "LEVELS", "configure", "one_line")

LEVELS: Final = ("debug", "info", "warning", "error", "critical")
FORMATS: Final = ("text", "json")

# Attributes every LogRecord has: anything else on a record came as ``extra``.
_STANDARD: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
# Loggers that say too much at info for an operator: alembic's per-step chatter.
_QUIET_BELOW_DEBUG: Final = ("alembic",)

_handler: logging.Handler | None = None
_level = logging.INFO


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for logs and errors that must stay on one line."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _utc(created: float) -> str:
    return (
        datetime.fromtimestamp(created, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class TextFormatter(logging.Formatter):
    """``time level logger message key=value ...``: the record's extra fields, greppable."""

    def __init__(self, *, tracebacks: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        line = self.formatMessage(record)
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and not self.tracebacks:
            line = f"{line}: {one_line(error)}"
        extras = " ".join(f"{key}={value!r}" for key, value in _extras(record).items())
        if extras:
            line = f"{line} {extras}"
        if error is not None and self.tracebacks and record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        if record.stack_info and self.tracebacks:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    the record's extra fields, ``error`` (the exception, one line) and, at debug,
    ``traceback``."""

    def __init__(self, *, tracebacks: bool) -> None:
        super().__init__()
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _extras(record).items():
            entry.setdefault(key, value)
        if record.exc_info and record.exc_info[1] is not None:
            entry["error"] = one_line(record.exc_info[1])
            if self.tracebacks:
                entry["traceback"] = self.formatException(record.exc_info)
        if record.stack_info and self.tracebacks:
            entry["stack"] = record.stack_info
        return json.dumps(entry, default=str, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record comes (as ``logging.lastResort``
    does), so a caller that swaps it (a test capturing output) gets the lines."""

    @property
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, _: IO[str]) -> None:
        pass


def configure(level: str = "info", fmt: str = "text") -> None:
    """Log records at ``level`` and above to stderr as ``fmt`` (text or json), for the whole
    process, and keep it so when Airflow is imported later."""
    global _handler, _level
    if level not in LEVELS or fmt not in FORMATS:
        raise ValueError(f"level {level!r} or format {fmt!r} is not one of {LEVELS}, {FORMATS}")
    _level = getattr(logging, level.upper())
    tracebacks = _level <= logging.DEBUG
    handler = _StderrHandler()
    formatter_class = JsonFormatter if fmt == "json" else TextFormatter
    handler.setFormatter(formatter_class(tracebacks=tracebacks))
    handler.setLevel(_level)
    if _handler is not None:
        logging.getLogger().removeHandler(_handler)
    _handler = handler
    logging.captureWarnings(True)
    _reassert()
    if "airflow" in sys.modules:
        _route_structlog()
    elif not any(isinstance(f, _AfterAirflow) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterAirflow())


def _writes_to_the_console(handler: logging.Handler) -> bool:
    """A handler that prints on its own (Airflow's, another library's console handler), as
    opposed to one that keeps records elsewhere (a file of the user's, a test's capture)."""
    if handler is _handler:
        return False
    if type(handler).__module__.split(".")[0] in ("airflow", "structlog"):
        return True
    stream = getattr(handler, "stream", None)
    return stream is not None and stream in (
        sys.stdout,
        sys.stderr,
        sys.__stdout__,
        sys.__stderr__,
    )


def _reassert() -> None:
    """Our handler on the root logger, letting our level through; other handlers that print to
    the console removed, so that every record is written once, by ours, in one format."""
    if _handler is None:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if _writes_to_the_console(handler):
            root.removeHandler(handler)
    if _handler not in root.handlers:
        root.addHandler(_handler)
    root.setLevel(min(root.level or logging.WARNING, _level))
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger) and logger.handlers:
            printing = [h for h in logger.handlers if _writes_to_the_console(h)]
            for handler in printing:
                logger.removeHandler(handler)
            if printing:
                logger.propagate = True
    quiet = logging.WARNING if _level > logging.DEBUG else logging.NOTSET
    for name in _QUIET_BELOW_DEBUG:
        logging.getLogger(name).setLevel(quiet)


def _route_structlog() -> None:
    """Have structlog (configured by Airflow to print on its own) hand its events to the
    standard library, and so to our handler."""
    structlog = sys.modules.get("structlog")
    if structlog is None:
        return
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.PositionalArgumentsFormatter(),
            _to_logging_call,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def _to_logging_call(_: object, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog's event as ``logging.Logger`` call arguments: the event text as the message,
    the other fields as ``extra`` (renamed where a LogRecord attribute has the name)."""
    kwargs: dict[str, Any] = {"msg": event.pop("event", "")}
    for name in ("exc_info", "stack_info", "stacklevel"):
        if name in event:
            kwargs[name] = event.pop(name)
    event.pop("positional_args", None)
    kwargs["extra"] = {(f"{k}_" if k in _STANDARD else k): v for k, v in event.items()}
    return kwargs


class _AfterAirflow(importlib.abc.MetaPathFinder):
    """Puts our configuration back once the ``airflow`` package has been imported (and only
    then: ``importlib.util.find_spec("airflow")`` alone imports nothing)."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "airflow":
            return None
        spec: importlib.machinery.ModuleSpec | None = None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1 :]:
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_reassert(module: ModuleType) -> None:
            try:
                exec_module(module)
            finally:
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                _reassert()
                _route_structlog()

        spec.loader.exec_module = exec_then_reassert  # type: ignore[method-assign]
        return spec

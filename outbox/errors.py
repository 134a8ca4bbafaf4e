"""Errors outbox raises; each message names the problem and the fix on one line."""

from __future__ import annotations

__all__ = (
    "AccessDenied",
    "ConfigurationError",
    "DatabaseUnavailable",
    "OutboxError",
    "SchemaNotMigrated",
    "StreamTerminated",
    "UndecodableValue",
)


class OutboxError(Exception):
    """Base class of outbox's own errors."""


class ConfigurationError(OutboxError):
    """A setting, URL or class path is wrong; the message says which and how to fix it."""


class DatabaseUnavailable(OutboxError):
    """The database could not be reached (wrong host or port, server down, bad credentials)."""


class AccessDenied(OutboxError):
    """The database role may not use outbox's tables; the tables' owner runs `outbox grant`."""


class SchemaNotMigrated(OutboxError):
    """The database lacks outbox's tables or is behind; run `outbox migrate`."""


class StreamTerminated(OutboxError):
    """The stream's producer returned; shared streams are expected to run for the lifetime of
    the group."""


class UndecodableValue(OutboxError, ValueError):
    """A stored raw event, broker payload or trigger event cannot be decoded: its class is
    outside the allowed modules or cannot be imported, or the stored text is not outbox's."""

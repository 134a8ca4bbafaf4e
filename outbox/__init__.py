"""outbox: crash-safe broker acknowledgements for shared streams.

Subscriber trigger events are written to a Postgres outbox in the same transaction that marks a
raw event resolved for that subscriber; a lane committer advances the broker over each lane's
contiguous resolved prefix, in order.
"""

from __future__ import annotations

from outbox.committer import LaneCommitter
from outbox.errors import (
    AccessDenied,
    ConfigurationError,
    DatabaseUnavailable,
    OutboxError,
    SchemaNotMigrated,
    StreamTerminated,
    UndecodableValue,
)
from outbox.manager import SharedStreamManager, SubscriberOverflow
from outbox.protocol import (
    AckTimeout,
    AdvanceItem,
    AdvanceOutcome,
    SharedStreamProducer,
    reject_shared_stream_event,
)
from outbox.reader import OutboxReader, OutboxRecord
from outbox.store import OutboxStore
from outbox.triggers import BaseEventTrigger, TriggerEvent

__all__ = (
    "AccessDenied",
    "AckTimeout",
    "AdvanceItem",
    "AdvanceOutcome",
    "BaseEventTrigger",
    "ConfigurationError",
    "DatabaseUnavailable",
    "LaneCommitter",
    "OutboxError",
    "OutboxReader",
    "OutboxRecord",
    "OutboxStore",
    "SchemaNotMigrated",
    "SharedStreamManager",
    "SharedStreamProducer",
    "StreamTerminated",
    "SubscriberOverflow",
    "TriggerEvent",
    "UndecodableValue",
    "reject_shared_stream_event",
)

"""``OutboxStore``: the engine and every SQL statement outbox runs, one module per concern.

Statements that run per batch are written as SQL text over ``unnest`` arrays so that one round
trip carries a whole batch; the rest use the Core tables of ``outbox.schema``.
"""

from __future__ import annotations

from outbox.dburl import asyncpg_url, redact_url
from outbox.store.base import HEAD_REVISION, VERSION_TABLE, StoreBase
from outbox.store.claims import Claims
from outbox.store.lanes import Lanes
from outbox.store.operations import LaneStatus, Operations
from outbox.store.recording import Recording
from outbox.store.resolving import Resolving
from outbox.store.rows import (
    EVENT_ID,
    OWNER,
    REASON,
    RECORDS,
    STATE,
    STREAM_ID,
    SUBSCRIBER,
    AdvancedBatch,
    EventToRecord,
    LaneLease,
    ReadyLane,
    Resolution,
    ResolutionRow,
)
from outbox.store.sessions import Sessions
from outbox.store.sqlparts import (
    CONSUMER_CHANNEL,
    MOVED_CHANNEL,
    NOTIFY_CHANNEL,
    RECORDED_CHANNEL,
    RECORDS_CHANNEL,
    holds_separator,
)
from outbox.store.streams import Streams
from outbox.store.sweep import Sweep

__all__ = (
    "AdvancedBatch",
    "CONSUMER_CHANNEL",
    "EVENT_ID",
    "EventToRecord",
    "HEAD_REVISION",
    "LaneLease",
    "LaneStatus",
    "MOVED_CHANNEL",
    "NOTIFY_CHANNEL",
    "OWNER",
    "OutboxStore",
    "REASON",
    "RECORDED_CHANNEL",
    "RECORDS",
    "RECORDS_CHANNEL",
    "ReadyLane",
    "Resolution",
    "ResolutionRow",
    "STATE",
    "STREAM_ID",
    "SUBSCRIBER",
    "VERSION_TABLE",
    "asyncpg_url",
    "holds_separator",
    "redact_url",
)


class OutboxStore(
    Streams, Recording, Sweep, Resolving, Lanes, Sessions, Claims, Operations, StoreBase
):
    """The database side of outbox: an ``AsyncEngine`` on asyncpg and all of outbox's SQL.

    Build it with ``OutboxStore.from_url(url)`` (it owns the engine it creates) or hand it an
    engine (which stays yours). Use it as ``async with`` or call ``aclose()``.
    """

"""The shared Kafka stream of the end-to-end test: three subscribers with different rules on one
``KafkaSharedTrigger`` subclass, and a producer that logs every offset commit it makes.

`outbox committer --allow-module tests.e2e` rebuilds the producer from the class path and kwargs
stored with the stream; the kwargs carry the database URL the commit log is written to.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

import psycopg

from outbox import TriggerEvent, reject_shared_stream_event
from outbox.kafka import KafkaSharedStreamProducer, KafkaSharedTrigger, RoutingPolicy

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

MODES = ("all", "reject", "even")
"""``all`` accepts every message; ``reject`` rejects those with ``n % 17 == 0`` (dead-lettered)
and accepts the rest; ``even`` accepts every message but fires only for even ``n``."""
GHOST = "ghost"
"""A subscriber like ``all`` that a test runs for a moment on a triggerer it then kills for
good: what it was owed must not hold anything up."""

COMMIT_LOG_TABLE = """
CREATE TABLE IF NOT EXISTS e2e_commit_log (
    id bigserial PRIMARY KEY,
    topic text NOT NULL,
    partition integer NOT NULL,
    committed bigint NOT NULL,
    previous bigint,
    pid integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


def rejects(n: int) -> bool:
    return n % 17 == 0


def fires(mode: str, n: int) -> bool:
    """Whether subscriber ``mode`` stores a trigger event for message ``n``."""
    if mode == "reject":
        return not rejects(n)
    if mode == "even":
        return n % 2 == 0
    return True


def plain_dsn(url: str) -> str:
    """``postgresql://`` form of a SQLAlchemy-style URL, for psycopg."""
    scheme, sep, rest = url.partition("://")
    return f"postgresql://{rest}" if sep and scheme.startswith("postgres") else url


class CommitLoggingProducer(KafkaSharedStreamProducer):
    """A ``KafkaSharedStreamProducer`` that appends each commit it makes to ``e2e_commit_log``
    (after the commit: a SIGKILL in between loses the row, never invents one)."""

    def __init__(self, *args: Any, commit_log_dsn: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commit_log_dsn = commit_log_dsn
        self._log: psycopg.AsyncConnection[Any] | None = None

    async def on_commit(
        self, topic: str, partition: int, offset: int, previous: int | None
    ) -> None:
        if self._log is None:
            self._log = await psycopg.AsyncConnection.connect(
                plain_dsn(self.commit_log_dsn), autocommit=True
            )
        await self._log.execute(
            "INSERT INTO e2e_commit_log (topic, partition, committed, previous, pid) "
            "VALUES (%s, %s, %s, %s, %s)",
            (topic, partition, offset, previous, os.getpid()),
        )

    async def aclose(self) -> None:
        await super().aclose()
        if self._log is not None:
            await self._log.close()
            self._log = None


class E2ETrigger(KafkaSharedTrigger):
    """One of the three subscribers (``mode`` in ``MODES``) of a Kafka topic; ``delay``: seconds
    it spends on each message (a slow subscriber keeps deliveries pending behind the others)."""

    def __init__(
        self, *, mode: str, commit_log_dsn: str, delay: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if mode not in (*MODES, GHOST):
            raise ValueError(f"mode must be one of {MODES} or {GHOST!r}, got {mode!r}")
        self.mode = mode
        self.commit_log_dsn = commit_log_dsn
        self.delay = delay

    def serialize(self) -> tuple[str, dict[str, Any]]:
        path, kwargs = super().serialize()
        return path, {
            **kwargs,
            "mode": self.mode,
            "commit_log_dsn": self.commit_log_dsn,
            "delay": self.delay,
        }

    @staticmethod
    def key_of(kwargs: dict[str, Any]) -> Any:
        """The stream key of triggers built with these keyword arguments."""
        return (
            "kafka",
            kwargs["bootstrap_servers"],
            kwargs["group_id"],
            tuple(sorted(kwargs["topics"])),
        )

    @classmethod
    def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> CommitLoggingProducer:
        return CommitLoggingProducer(
            kwargs["topics"],
            bootstrap_servers=kwargs["bootstrap_servers"],
            group_id=kwargs["group_id"],
            dead_letter_topic=kwargs.get("dead_letter_topic"),
            policy=RoutingPolicy(**(kwargs.get("policy") or {})),
            commit_log_dsn=kwargs["commit_log_dsn"],
            redelivery_delay=kwargs.get("redelivery_delay", 30.0),
        )

    async def filter_shared_stream(
        self, shared_stream: AsyncIterator[Any]
    ) -> AsyncIterator[TriggerEvent]:
        async for raw in shared_stream:
            n = int(raw["n"])
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.mode == "reject" and rejects(n):
                reject_shared_stream_event()
                continue
            if fires(self.mode, n):
                yield TriggerEvent({"n": n, "by": self.mode})

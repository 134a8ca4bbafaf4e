"""Kafka on aiokafka: a ``SharedStreamProducer`` that reads partitions by manual assignment and
commits each partition's offsets only over events every subscriber resolved, routing rejects and
failures by policy (dead-letter topic, drop, hold).

The lane of a message is ``(topic, partition)``; its identity is ``"topic:partition:offset"``, so
a message read again after a restart goes only to the subscribers that still owe it.

Holding: a message that is held (by default: one a subscriber failed, or that nobody was
subscribed to) is not committed past. Later messages of its partition are still handled, but the
partition's committed offset stays at the held message until the consumer reads it again on its
next start and every subscriber that owes it resolves it; then commits move on.
Each ``advance`` moves the partition's commit from its committed offset (read from Kafka, or the
partition's first offset) past every message handled so far, whatever the order its lane
delivered them in: after a restart a lane can carry messages read again after later ones. The
handled messages above a hold are remembered in memory; a committer that restarts meanwhile
forgets them, and the partition then moves on once the triggerer reads them again. Topics with
offset gaps (compaction, transactions) need ``contiguous_offsets=False``, which commits past
each batch's highest offset and keeps holds in memory only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from outbox.protocol import AdvanceItem, AdvanceOutcome, SharedStreamProducer
from outbox.triggers import BaseEventTrigger, TriggerEvent

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Hashable, Sequence

__all__ = (
    "DeadLetterFlood",
    "KafkaSharedStreamProducer",
    "KafkaSharedTrigger",
    "RoutingPolicy",
)

log = logging.getLogger("outbox.kafka")

HEADER_PREFIX = "x-outbox-"


class DeadLetterFlood(RuntimeError):
    """Too many events of a lane would be dead-lettered at once (a bad deploy?): the lane
    stalls instead, until the subscribers are fixed or the limits raised."""


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    """What ``advance`` does with events that were not accepted by every subscriber.

    :param rejected: ``"dead-letter"`` (produce to the dead-letter topic, commit past) or
        ``"drop"`` (commit past).
    :param failed: ``"hold"`` (do not commit past; read again on the next start) or
        ``"dead-letter"``.
    :param unsubscribed: for an event nobody was subscribed to: ``"hold"`` or ``"commit"``.
    :param flood_run: stall the lane when this many consecutive events would be dead-lettered.
    :param flood_ratio: stall the lane when more than this share of the last ``flood_window``
        events would be dead-lettered (checked once ``flood_window`` events were seen).
    """

    rejected: Literal["dead-letter", "drop"] = "dead-letter"
    failed: Literal["hold", "dead-letter"] = "hold"
    unsubscribed: Literal["hold", "commit"] = "hold"
    flood_run: int | None = 100
    flood_ratio: float | None = 0.5
    flood_window: int = 1000

    def __post_init__(self) -> None:
        if self.rejected not in ("dead-letter", "drop"):
            raise ValueError(f"rejected must be 'dead-letter' or 'drop', got {self.rejected!r}")
        if self.failed not in ("hold", "dead-letter"):
            raise ValueError(f"failed must be 'hold' or 'dead-letter', got {self.failed!r}")
        if self.unsubscribed not in ("hold", "commit"):
            raise ValueError(f"unsubscribed must be 'hold' or 'commit', got {self.unsubscribed!r}")

    def route(self, outcome: AdvanceOutcome) -> Literal["commit", "dead-letter", "hold"]:
        if outcome.rejected:
            return "dead-letter" if self.rejected == "dead-letter" else "commit"
        if outcome.failed:
            return "dead-letter" if self.failed == "dead-letter" else "hold"
        if outcome.acked == 0:
            return "hold" if self.unsubscribed == "hold" else "commit"
        return "commit"


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def decode_value(value: bytes | None) -> Any:
    """The default raw event: the message value as JSON, else as text."""
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value.decode("utf-8", errors="replace")


class _FloodGuard:
    """Counts, per lane, the recent events that were dead-lettered."""

    def __init__(self, policy: RoutingPolicy) -> None:
        self.policy = policy
        self.run: dict[tuple[str, int], int] = {}
        self.window: dict[tuple[str, int], deque[bool]] = {}

    def check(self, lane: tuple[str, int], routes: Sequence[bool]) -> None:
        """Raise ``DeadLetterFlood`` if ``routes`` (True = dead-letter) would pass a limit."""
        run = self.run.get(lane, 0)
        window = deque(self.window.get(lane, ()), maxlen=self.policy.flood_window)
        for dead in routes:
            run = run + 1 if dead else 0
            window.append(dead)
            if self.policy.flood_run is not None and run >= self.policy.flood_run:
                raise DeadLetterFlood(
                    f"lane {lane}: {run} consecutive events would be dead-lettered (limit "
                    f"{self.policy.flood_run}); fix the subscribers, or raise flood_run"
                )
            if (
                self.policy.flood_ratio is not None
                and len(window) == self.policy.flood_window
                and sum(window) / len(window) > self.policy.flood_ratio
            ):
                raise DeadLetterFlood(
                    f"lane {lane}: {sum(window)} of the last {len(window)} events would be "
                    f"dead-lettered (limit {self.policy.flood_ratio:.0%}); fix the subscribers, "
                    "or raise flood_ratio"
                )

    def record(self, lane: tuple[str, int], routes: Sequence[bool]) -> None:
        run = self.run.get(lane, 0)
        window = self.window.setdefault(lane, deque(maxlen=self.policy.flood_window))
        for dead in routes:
            run = run + 1 if dead else 0
            window.append(dead)
        self.run[lane] = run


class KafkaSharedStreamProducer(SharedStreamProducer):
    """Reads ``topics`` (all their partitions, or ``partitions``) by manual assignment, from
    the group's committed offsets, and advances by cumulative per-partition commits.

    :param topics: topics to read.
    :param bootstrap_servers: Kafka bootstrap address(es).
    :param group_id: consumer group whose offsets are committed; use it only for this stream
        (outbox commits from whichever process advances, without joining the group).
    :param partitions: ``{topic: [partition, ...]}`` to read a subset.
    :param dead_letter_topic: where rejected (and, by policy, failed) messages go.
    :param policy: a ``RoutingPolicy``.
    :param consumer_options: more ``AIOKafkaConsumer`` options; ``enable_auto_commit`` must
        stay ``False``.
    """

    def __init__(
        self,
        topics: Sequence[str],
        *,
        bootstrap_servers: str | list[str],
        group_id: str,
        partitions: dict[str, list[int]] | None = None,
        dead_letter_topic: str | None = None,
        policy: RoutingPolicy | None = None,
        contiguous_offsets: bool = True,
        consumer_options: dict[str, Any] | None = None,
        producer_options: dict[str, Any] | None = None,
        max_records: int = 500,
    ) -> None:
        options = dict(consumer_options or {})
        if options.get("enable_auto_commit", False) is not False:
            raise ValueError(
                "KafkaSharedStreamProducer needs enable_auto_commit=False: outbox commits "
                "offsets only after every subscriber resolved the messages"
            )
        if not topics:
            raise ValueError("KafkaSharedStreamProducer needs at least one topic")
        if not group_id:
            raise ValueError("KafkaSharedStreamProducer needs a group_id to commit offsets to")
        if policy is None:
            policy = RoutingPolicy(rejected="dead-letter" if dead_letter_topic else "drop")
        if dead_letter_topic is None and "dead-letter" in (policy.rejected, policy.failed):
            raise ValueError(
                "a policy that dead-letters needs dead_letter_topic=...; or route with "
                "RoutingPolicy(rejected='drop')"
            )
        self.policy = policy
        self.topics = list(topics)
        self.bootstrap_servers = bootstrap_servers
        self.group_id = group_id
        self.partitions = partitions
        self.dead_letter_topic = dead_letter_topic
        self.contiguous_offsets = contiguous_offsets
        self.consumer_options = options
        self.producer_options = dict(producer_options or {})
        self.max_records = max_records
        self._reader: AIOKafkaConsumer | None = None
        self._committer: AIOKafkaConsumer | None = None
        self._dead_letters: AIOKafkaProducer | None = None
        self._holds: dict[TopicPartition, int] = {}
        self._handled: dict[TopicPartition, set[int]] = {}
        self._guard = _FloodGuard(self.policy)

    # -- reading --------------------------------------------------------------------------

    def _consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **{k: v for k, v in self.consumer_options.items() if k != "enable_auto_commit"},
        )

    async def _assignment(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        if self.partitions is not None:
            return [TopicPartition(t, p) for t, ps in sorted(self.partitions.items()) for p in ps]
        await consumer.topics()  # refreshes the cluster metadata
        assignment = []
        for topic in self.topics:
            found = consumer.partitions_for_topic(topic)
            if not found:
                raise ValueError(f"Kafka topic {topic!r} has no partitions (does it exist?)")
            assignment += [TopicPartition(topic, p) for p in sorted(found)]
        return assignment

    async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
        consumer = self._consumer()
        await consumer.start()
        self._reader = consumer
        assignment = await self._assignment(consumer)
        consumer.assign(assignment)
        for tp in assignment:
            committed = await consumer.committed(tp)
            if committed is not None:
                consumer.seek(tp, committed)
            else:
                await consumer.seek_to_beginning(tp)
        keep_message = self.dead_letter_topic is not None
        while True:
            batches = await consumer.getmany(timeout_ms=1000, max_records=self.max_records)
            for tp in sorted(batches):
                for message in batches[tp]:
                    payload: dict[str, Any] = {
                        "topic": message.topic,
                        "partition": message.partition,
                        "offset": message.offset,
                    }
                    if keep_message:
                        payload["key"] = _b64(message.key)
                        payload["value"] = _b64(message.value)
                        payload["headers"] = [[k, _b64(v)] for k, v in message.headers or ()]
                    yield self.decode(message.value), payload

    def decode(self, value: bytes | None) -> Any:
        """The raw event subscribers see for a message value (default: JSON, else text)."""
        return decode_value(value)

    def get_advance_lane(self, broker_payload: Any) -> Hashable:
        return (broker_payload["topic"], broker_payload["partition"])

    def get_event_key(self, broker_payload: Any) -> str | None:
        return f"{broker_payload['topic']}:{broker_payload['partition']}:{broker_payload['offset']}"

    # -- advancing --------------------------------------------------------------------------

    async def _commit_client(self, tp: TopicPartition) -> AIOKafkaConsumer:
        if self._reader is not None:
            return self._reader
        if self._committer is None:
            consumer = self._consumer()
            await consumer.start()
            self._committer = consumer
        assigned = self._committer.assignment()
        if tp not in assigned:
            # Commits need the partition assigned; this consumer never fetches.
            self._committer.assign([*assigned, tp])
        return self._committer

    async def _dead_letter_client(self) -> AIOKafkaProducer:
        if self._dead_letters is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap_servers, acks="all", **self.producer_options
            )
            await producer.start()
            self._dead_letters = producer
        return self._dead_letters

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        """Dead-letter what the policy says, flush, then commit the partition up to the first
        held message (or past the batch), never backwards and never past a hold."""
        if not batch:
            return
        first = batch[0].broker_payload
        lane = (first["topic"], first["partition"])
        tp = TopicPartition(*lane)
        routes = [self.policy.route(outcome) for _, outcome in batch]
        dead = [route == "dead-letter" for route in routes]
        self._guard.check(lane, dead)
        if any(dead):
            producer = await self._dead_letter_client()
            deliveries = [
                await producer.send(
                    self.dead_letter_topic,
                    key=_unb64(payload.get("key")),
                    value=_unb64(payload.get("value")),
                    headers=self._dead_letter_headers(payload, outcome),
                )
                for (payload, outcome), is_dead in zip(batch, dead, strict=True)
                if is_dead
            ]
            await asyncio.gather(*deliveries)  # every dead letter is stored before the commit
        offsets = [int(item.broker_payload["offset"]) for item in batch]
        consumer = await self._commit_client(tp)
        committed = await consumer.committed(tp)
        if self.contiguous_offsets:
            if committed is None:
                committed = (await consumer.beginning_offsets([tp]))[tp]
            target, held = self._contiguous_target(tp, offsets, routes, committed)
        else:
            target, held = self._remembered_target(tp, offsets, routes)
        if held is not None:
            log.info("Kafka partition held", extra={"lane": lane, "offset": held})
        if committed is None or target > committed:
            await consumer.commit({tp: target})
            await self.on_commit(tp.topic, tp.partition, target, committed)
        self._guard.record(lane, dead)

    def _contiguous_target(
        self, tp: TopicPartition, offsets: Sequence[int], routes: Sequence[str], committed: int
    ) -> tuple[int, int | None]:
        """The partition's next commit: from the committed offset, past every message handled
        (in this batch or an earlier one, in any order: after a restart a lane can carry
        messages read again after later ones), up to the first that is not, which may be held.
        Returns ``(target, held)``."""
        handled = self._handled.setdefault(tp, set())
        held = set()
        for offset, route in zip(offsets, routes, strict=True):
            if route == "hold":
                held.add(offset)
            else:
                handled.add(offset)
        target = committed
        while target in handled:
            target += 1
        self._handled[tp] = {o for o in handled if o > target}
        return target, target if target in held else None

    def _remembered_target(
        self, tp: TopicPartition, offsets: Sequence[int], routes: Sequence[str]
    ) -> tuple[int, int | None]:
        """Without contiguous offsets: past the highest offset of the batch, or up to its
        lowest held one, and never past a hold remembered from an earlier batch until that
        message is handled again."""
        held_offsets = [o for o, r in zip(offsets, routes, strict=True) if r == "hold"]
        remembered = self._holds.get(tp)
        if remembered is not None and any(
            o == remembered and r != "hold" for o, r in zip(offsets, routes, strict=True)
        ):
            remembered = None  # read again and handled this time
        holds = [*held_offsets, *([remembered] if remembered is not None else [])]
        if holds:
            self._holds[tp] = min(holds)
            return min(holds), min(held_offsets) if held_offsets else None
        self._holds.pop(tp, None)
        return max(offsets) + 1, None

    async def on_commit(
        self, topic: str, partition: int, offset: int, previous: int | None
    ) -> None:
        """Called after each offset commit this producer makes (``previous``: the committed
        offset it read before). Default: nothing; override it to audit or meter commits.
        An exception fails the ``advance``, which is retried."""

    @staticmethod
    def _dead_letter_headers(
        payload: dict[str, Any], outcome: AdvanceOutcome
    ) -> list[tuple[str, bytes]]:
        original = [(k, _unb64(v) or b"") for k, v in payload.get("headers") or ()]
        reason = "rejected" if outcome.rejected else "failed"
        return [
            *original,
            (f"{HEADER_PREFIX}origin-topic", str(payload["topic"]).encode()),
            (f"{HEADER_PREFIX}origin-partition", str(payload["partition"]).encode()),
            (f"{HEADER_PREFIX}origin-offset", str(payload["offset"]).encode()),
            (f"{HEADER_PREFIX}reason", reason.encode()),
            (f"{HEADER_PREFIX}acked", str(outcome.acked).encode()),
            (f"{HEADER_PREFIX}failed", str(outcome.failed).encode()),
            (f"{HEADER_PREFIX}rejected", str(outcome.rejected).encode()),
        ]

    async def aclose(self) -> None:
        for client in (self._reader, self._committer, self._dead_letters):
            if client is not None:
                try:
                    await client.stop()
                except Exception:  # best-effort, as the contract says
                    log.warning("closing a Kafka client failed", exc_info=True)
        self._reader = self._committer = None
        self._dead_letters = None


class KafkaSharedTrigger(BaseEventTrigger):
    """Base class of triggers that share one Kafka consumer: subclass it and write
    ``filter_shared_stream``; everything broker-side is done.

    Keyword arguments are those of ``KafkaSharedStreamProducer`` (JSON-serialisable, since
    a separate committer rebuilds the producer from them), plus the routing policy as a dict.
    """

    def __init__(
        self,
        *,
        topics: Sequence[str],
        bootstrap_servers: str,
        group_id: str,
        dead_letter_topic: str | None = None,
        policy: dict[str, Any] | None = None,
        partitions: dict[str, list[int]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.topics = list(topics)
        self.bootstrap_servers = bootstrap_servers
        self.group_id = group_id
        self.dead_letter_topic = dead_letter_topic
        self.policy = dict(policy or {})
        self.partitions = partitions
        self.extra = kwargs

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "topics": self.topics,
                "bootstrap_servers": self.bootstrap_servers,
                "group_id": self.group_id,
                "dead_letter_topic": self.dead_letter_topic,
                "policy": self.policy,
                "partitions": self.partitions,
                **self.extra,
            },
        )

    def shared_stream_key(self) -> Hashable:
        return ("kafka", self.bootstrap_servers, self.group_id, tuple(sorted(self.topics)))

    @classmethod
    def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> KafkaSharedStreamProducer:
        options = dict(kwargs)
        # No policy given: the producer's default (drop rejects without a dead-letter topic).
        policy_options = options.pop("policy", None)
        policy = RoutingPolicy(**policy_options) if policy_options else None
        partitions = options.pop("partitions", None)
        return KafkaSharedStreamProducer(
            options.pop("topics"),
            bootstrap_servers=options.pop("bootstrap_servers"),
            group_id=options.pop("group_id"),
            dead_letter_topic=options.pop("dead_letter_topic", None),
            partitions={t: list(ps) for t, ps in partitions.items()} if partitions else None,
            policy=policy,
            consumer_options=options.pop("consumer_options", None),
            producer_options=options.pop("producer_options", None),
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        raise NotImplementedError(f"{type(self).__qualname__} runs on a shared stream only")
        yield  # pragma: no cover

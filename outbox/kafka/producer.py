"""``KafkaSharedStreamProducer``: reads partitions by manual assignment, advances by cumulative
per-partition commits (commits, holds and redelivery: ``outbox.kafka``'s docstring)."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING, Any, cast

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from outbox.core import backoff_delay
from outbox.kafka.offsets import Commits, OffsetRanges, Reading
from outbox.kafka.payloads import b64, decode_value, unb64
from outbox.kafka.routing import FloodGuard, RoutingPolicy
from outbox.protocol import AdvanceItem, AdvanceOutcome, SharedStreamProducer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Hashable, Sequence

__all__ = ("HEADER_PREFIX", "KafkaSharedStreamProducer")

# The package's logger: records keep the name ``outbox.kafka`` (JSON logs show it).
log = logging.getLogger("outbox.kafka")

HEADER_PREFIX = "x-outbox-"


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
    :param redelivery_delay: seconds before a held message is read again (see ``outbox.kafka``'s
        docstring); 0 reads it again at once when the reading producer advances.
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
        redelivery_delay: float = 30.0,
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
        if not redelivery_delay >= 0:
            raise ValueError(
                f"redelivery_delay must be a number of seconds >= 0, got {redelivery_delay!r}"
            )
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
        self.redelivery_delay = float(redelivery_delay)
        self.consumer_options = options
        self.producer_options = dict(producer_options or {})
        self.max_records = max_records
        self._reader: AIOKafkaConsumer | None = None
        self._committer: AIOKafkaConsumer | None = None
        self._dead_letters: AIOKafkaProducer | None = None
        self._commits: dict[TopicPartition, Commits] = {}
        self._reading: dict[TopicPartition, Reading] = {}
        self._guard = FloodGuard(self.policy)

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
        log_starts = await consumer.beginning_offsets(assignment)
        loop = asyncio.get_running_loop()
        for tp in assignment:
            committed = await consumer.committed(tp)
            # Below the log start the records are gone (retention): the commit moves there
            # with the first advance, which says so.
            start = log_starts[tp] if committed is None else max(committed, log_starts[tp])
            consumer.seek(tp, start)
            self._reading[tp] = Reading(start=start, read_to=start, fetch_at=start)
        keep_message = self.dead_letter_topic is not None
        while True:
            self._release_due(loop.time())
            self._position(consumer)
            batches = await consumer.getmany(timeout_ms=1000, max_records=self.max_records)
            for tp in sorted(batches):
                reading = self._reading[tp]
                for message in batches[tp]:
                    if not reading.take(message.offset):
                        continue
                    payload: dict[str, Any] = {
                        "topic": message.topic,
                        "partition": message.partition,
                        "offset": message.offset,
                    }
                    if keep_message:
                        payload["key"] = b64(message.key)
                        payload["value"] = b64(message.value)
                        payload["headers"] = [[k, b64(v)] for k, v in message.headers or ()]
                    yield self.decode(message.value), payload

    def _release_due(self, now: float) -> None:
        """Held offsets whose redelivery is due join the offsets to read again."""
        for reading in self._reading.values():
            if reading.next_due > now:
                continue
            for offset in [o for o, when in reading.due.items() if when <= now]:
                del reading.due[offset]
                if offset < reading.read_to:  # otherwise it is still to be read anyway
                    reading.again.add(offset, offset + 1)
            reading.next_due = min(reading.due.values(), default=math.inf)

    def on_hold_reported(self, identity: str, held_for: float) -> None:
        """The committer recorded this partition's commit held at the message ``identity``:
        when another process advances the partition and the hold is ``redelivery_delay`` old,
        read the partition again from there to where this reader had read (and again every
        ``redelivery_delay``, at least a second, while it stays held there)."""
        topic, _, rest = identity.rpartition(":")
        topic, _, partition = topic.rpartition(":")
        try:
            tp, offset = TopicPartition(topic, int(partition)), int(rest)
        except ValueError:
            return  # not an identity of this producer
        reading = self._reading.get(tp)
        if reading is None or reading.advanced_here or held_for < self.redelivery_delay:
            return  # not read here; its holds come to this reader directly; not yet
        if offset >= reading.read_to:
            return  # not read yet: it comes anyway
        now = asyncio.get_running_loop().time()
        if reading.read_again_from == offset and now - reading.read_again_at < max(
            1.0, self.redelivery_delay
        ):
            return
        log.info(
            "Kafka partition %s:%d held at %d for %.0fs: reading it again from there to %d",
            tp.topic,
            tp.partition,
            offset,
            held_for,
            reading.read_to,
        )
        reading.read_again_from, reading.read_again_at = offset, now
        reading.again.add(offset, reading.read_to)

    def _position(self, consumer: AIOKafkaConsumer) -> None:
        """Seek each partition to where it must be read next, when that moved: back to an
        offset to read again, or forward past what was already read."""
        for tp, reading in self._reading.items():
            wanted = reading.next_fetch()
            if wanted != reading.fetch_at:
                consumer.seek(tp, wanted)
                reading.fetch_at = wanted

    def decode(self, value: bytes | None) -> Any:
        """The raw event subscribers see for a message value (default: JSON, else text)."""
        return decode_value(value)

    def get_advance_lane(self, broker_payload: Any) -> Hashable:
        return (broker_payload["topic"], broker_payload["partition"])

    def get_event_key(self, broker_payload: Any) -> str | None:
        return f"{broker_payload['topic']}:{broker_payload['partition']}:{broker_payload['offset']}"

    def describe_hold(self, lane: Hashable) -> str | None:
        """The identity of the message this partition's commit is held at (later messages were
        handled, this one not yet: held by the policy, or not advanced here), else ``None``."""
        topic, partition = cast("tuple[str, int]", lane)
        commits = self._commits.get(TopicPartition(topic, partition))
        if commits is None or commits.held_at is None:
            return None
        return f"{topic}:{partition}:{commits.held_at}"

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
        held message (or past the batch), never backwards and never past a hold; schedule the
        held messages to be read again when this producer is the one reading."""
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
                    key=unb64(payload.get("key")),
                    value=unb64(payload.get("value")),
                    headers=self._dead_letter_headers(payload, outcome),
                )
                for (payload, outcome), is_dead in zip(batch, dead, strict=True)
                if is_dead
            ]
            await asyncio.gather(*deliveries)  # every dead letter is stored before the commit
        offsets = [int(item.broker_payload["offset"]) for item in batch]
        consumer = await self._commit_client(tp)
        committed = await consumer.committed(tp)
        commits = self._commits.setdefault(tp, Commits())
        was_held_at = commits.held_at
        floor = committed  # commits move above this only
        if self.contiguous_offsets:
            held_now = commits.note(offsets, routes)
            if floor is None:
                floor = (await consumer.beginning_offsets([tp]))[tp]
            target = await self._contiguous_target(consumer, tp, commits, floor)
        else:
            held_now = commits.note(offsets, routes)
            commits.handled = OffsetRanges()  # the target does not depend on them here
            target = self._remembered_target(commits, offsets, routes)
        if commits.held_at is not None and commits.held_at != was_held_at:
            log.info("Kafka partition %s:%d held at offset %d", *lane, commits.held_at)
        if floor is None or target > floor:
            await consumer.commit({tp: target})
            await self.on_commit(tp.topic, tp.partition, target, committed)
        self._guard.record(lane, dead)
        self._schedule_redelivery(tp, commits, offsets, held_now)

    async def _contiguous_target(
        self,
        consumer: AIOKafkaConsumer,
        tp: TopicPartition,
        commits: Commits,
        committed: int,
    ) -> int:
        """The partition's next commit: from the committed offset (or the log start, if
        retention deleted the records it points at) past every message handled, in this batch
        or an earlier one, up to the first that is not."""
        target = commits.reach(committed)
        if (
            target == committed
            and commits.handled
            and committed not in commits.held
            and committed != commits.log_start_checked_at
        ):
            # Stuck on an offset nobody handed here: it may be gone from the log (asked once
            # per committed offset: the request can wait behind the consumer's fetches).
            commits.log_start_checked_at = committed
            log_start = (await consumer.beginning_offsets([tp]))[tp]
            if log_start > committed:
                log.warning(
                    "Kafka partition %s:%d: committed offset %d is below the log start %d "
                    "(retention deleted those records); moving the commit to the log start",
                    tp.topic,
                    tp.partition,
                    committed,
                    log_start,
                )
                target = commits.reach(log_start)
        return target

    @staticmethod
    def _remembered_target(commits: Commits, offsets: Sequence[int], routes: Sequence[str]) -> int:
        """Without contiguous offsets: past the highest offset of the batch, or up to its
        lowest held one, and never past a hold remembered from an earlier batch until that
        message is handled again."""
        held_offsets = [o for o, r in zip(offsets, routes, strict=True) if r == "hold"]
        remembered = commits.remembered
        if remembered is not None and any(
            o == remembered and r != "hold" for o, r in zip(offsets, routes, strict=True)
        ):
            remembered = None  # read again and handled this time
        holds = [*held_offsets, *([remembered] if remembered is not None else [])]
        commits.remembered = commits.held_at = min(holds) if holds else None
        return min(holds) if holds else max(offsets) + 1

    def _schedule_redelivery(
        self, tp: TopicPartition, commits: Commits, offsets: Sequence[int], held: list[int]
    ) -> None:
        """When this producer also reads the partition: have the held messages read again
        (each repeat of one waits longer), and drop what is due for messages handled now."""
        reading = self._reading.get(tp) if self._reader is not None else None
        if reading is None:
            return
        reading.advanced_here = True
        if reading.due:
            for offset in offsets:
                if offset not in commits.held:
                    reading.due.pop(offset, None)
        if not held:
            return
        now = asyncio.get_running_loop().time()
        for offset in held:
            if offset not in commits.held:
                continue  # committed past meanwhile
            repeats = commits.held[offset] - 1
            wait = max(self.redelivery_delay, backoff_delay(repeats, base=1.0, cap=60.0))
            reading.due[offset] = now + wait
            reading.next_due = min(reading.next_due, now + wait)

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
        original = [(k, unb64(v) or b"") for k, v in payload.get("headers") or ()]
        reason = "failed" if outcome.failed else "rejected"  # as ``RoutingPolicy.route`` decides
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
        self._reading.clear()

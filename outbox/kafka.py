"""Kafka on aiokafka: a ``SharedStreamProducer`` that reads partitions by manual assignment and
commits each partition's offsets only over events every subscriber resolved, routing rejects and
failures by policy (dead-letter topic, drop, hold).

The lane of a message is ``(topic, partition)``; its identity is ``"topic:partition:offset"``, so
a message read again goes only to the subscribers that still owe it.

Commits. Each ``advance`` moves the partition's commit from its committed offset (read from
Kafka, or the partition's first offset) past every message handled so far, whatever the order
its lane delivered them in: after a restart a lane can carry messages read again after later
ones. The handled offsets above the commit are kept as sorted disjoint ranges, merged as they
arrive, so an advance costs time and memory in proportion to its batch and to the ranges in
flight (one range after a hold, however many messages follow it), not to history. A committed
offset below the log start (retention deleted those records) is moved to the log start, with
one warning line. Topics with offset gaps (compaction, transactions) need
``contiguous_offsets=False``, which commits past each batch's highest offset and keeps holds in
memory only.

Holds. A message that is held (by default: one a subscriber failed, or that nobody was
subscribed to) is not committed past; later messages of its partition are still handled. The
partition's commit is *held at* the first offset it cannot pass while later messages were
handled: ``describe_hold(lane)`` names that message, the committer records it on the lane with
the time it began (``outbox status``, the ``outbox_lane_held_seconds`` metric), and ``outbox
prune`` keeps the lane's events from the held message on, which deduplicate its re-reading.

Redelivery. A held message is read again, and the commit moves on as soon as it is resolved:

* When ``advance`` runs on the producer that reads (the manager's in-process committer uses the
  stream's own producer), the reader seeks back to each held offset ``redelivery_delay``
  seconds after the hold (0: at once, as Airflow's Kafka provider does), hands out that message
  again and only it, then seeks forward to where it had read. A message held again waits longer
  each time (doubling from a second up to a minute, or ``redelivery_delay`` if that is longer),
  so one that nobody takes does not spin.
* When a separate ``outbox committer`` advances, this reader learns of the hold from the lane
  row where the committer recorded it: its manager reads the stream's holds every second and
  calls ``on_hold_reported``. Once the hold is ``redelivery_delay`` old, the reader reads the
  partition again from the held offset up to where it had read (everything: it cannot know
  which of those were held too, nor what a restarted committer forgot), and again every
  ``redelivery_delay`` while the hold stays there. A commit that is merely slow (a subscriber
  still working, a committer behind) is no hold: nothing is read again for it.

Whatever is read again is deduplicated by identity: subscribers that accepted or rejected a
message are not handed it again, a subscriber still working on it here is not handed it twice,
and the rest (those that failed it and subscribed again, those that were not subscribed) get
it. A subscriber that fails is detached, so the delay is also the time it has to subscribe again
before the message comes back without it.

Message values are opaque here: ``decode`` turns them into raw events (by default JSON, else
text), and nothing else reads them.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import json
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from outbox.core import backoff_delay
from outbox.protocol import AdvanceItem, AdvanceOutcome, SharedStreamProducer
from outbox.triggers import BaseEventTrigger, TriggerEvent

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Hashable, Iterator, Sequence

__all__ = (
    "DeadLetterFlood",
    "KafkaSharedStreamProducer",
    "KafkaSharedTrigger",
    "OffsetRanges",
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
    :param failed: ``"hold"`` (do not commit past; read again, see the module's docstring) or
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
    """Counts, per lane, the recent events that were dead-lettered (a running count over the
    window: an advance costs its batch, not its batch times the window)."""

    def __init__(self, policy: RoutingPolicy) -> None:
        self.policy = policy
        self.run: dict[tuple[str, int], int] = {}
        self.window: dict[tuple[str, int], deque[bool]] = {}
        self.dead: dict[tuple[str, int], int] = {}  # how many of the window were dead-lettered

    def check(self, lane: tuple[str, int], routes: Sequence[bool]) -> None:
        """Raise ``DeadLetterFlood`` if ``routes`` (True = dead-letter) would pass a limit."""
        if not any(routes):
            return  # nothing dead-lettered: both measures can only fall
        policy = self.policy
        run = self.run.get(lane, 0)
        window = deque(self.window.get(lane, ()), maxlen=policy.flood_window)
        dead = self.dead.get(lane, 0)
        for is_dead in routes:
            run = run + 1 if is_dead else 0
            if len(window) == policy.flood_window:
                dead -= window[0]
            window.append(is_dead)
            dead += is_dead
            if policy.flood_run is not None and run >= policy.flood_run:
                raise DeadLetterFlood(
                    f"lane {lane}: {run} consecutive events would be dead-lettered (limit "
                    f"{policy.flood_run}); fix the subscribers, or raise flood_run"
                )
            if (
                policy.flood_ratio is not None
                and len(window) == policy.flood_window
                and dead / len(window) > policy.flood_ratio
            ):
                raise DeadLetterFlood(
                    f"lane {lane}: {dead} of the last {len(window)} events would be "
                    f"dead-lettered (limit {policy.flood_ratio:.0%}); fix the subscribers, "
                    "or raise flood_ratio"
                )

    def record(self, lane: tuple[str, int], routes: Sequence[bool]) -> None:
        run = self.run.get(lane, 0)
        window = self.window.setdefault(lane, deque(maxlen=self.policy.flood_window))
        dead = self.dead.get(lane, 0)
        full = self.policy.flood_window
        for is_dead in routes:
            run = run + 1 if is_dead else 0
            if len(window) == full:
                dead -= window[0]
            window.append(is_dead)
            dead += is_dead
        self.run[lane] = run
        self.dead[lane] = dead


class OffsetRanges:
    """A set of offsets kept as sorted, disjoint, half-open ranges ``[start, end)``, merged as
    they are added: a million consecutive offsets take one range."""

    __slots__ = ("_ends", "_starts")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __len__(self) -> int:
        """How many ranges (not offsets)."""
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __contains__(self, offset: object) -> bool:
        if not isinstance(offset, int):
            return False
        i = bisect.bisect_right(self._starts, offset) - 1
        return i >= 0 and offset < self._ends[i]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._starts, self._ends, strict=True))

    def __repr__(self) -> str:
        return f"OffsetRanges({list(self)!r})"

    def add(self, start: int, end: int) -> None:
        """Add the offsets ``start <= o < end``."""
        if start >= end:
            return
        starts, ends = self._starts, self._ends
        if not starts or start > ends[-1]:  # the usual case: past everything held
            starts.append(start)
            ends.append(end)
            return
        first = bisect.bisect_left(ends, start)  # ranges that end at or after start touch it
        last = bisect.bisect_right(starts, end)  # ... and those that start at or before end
        if first < last:
            start = min(start, starts[first])
            end = max(end, ends[last - 1])
        starts[first:last] = [start]
        ends[first:last] = [end]

    def discard(self, start: int, end: int) -> None:
        """Remove the offsets ``start <= o < end``."""
        if start >= end or not self._starts:
            return
        starts, ends = self._starts, self._ends
        first = bisect.bisect_right(ends, start)  # ranges that end after start
        last = bisect.bisect_left(starts, end)  # ... and start before end
        if first >= last:
            return
        kept_starts: list[int] = []
        kept_ends: list[int] = []
        if starts[first] < start:
            kept_starts.append(starts[first])
            kept_ends.append(start)
        if ends[last - 1] > end:
            kept_starts.append(end)
            kept_ends.append(ends[last - 1])
        starts[first:last] = kept_starts
        ends[first:last] = kept_ends

    def discard_below(self, offset: int) -> None:
        """Remove every offset below ``offset``."""
        if self._starts and self._starts[0] < offset:
            self.discard(self._starts[0], offset)

    def first(self) -> int | None:
        return self._starts[0] if self._starts else None

    def end_of_run(self, offset: int) -> int:
        """The first offset at or after ``offset`` that is not in the set."""
        i = bisect.bisect_right(self._starts, offset) - 1
        return self._ends[i] if i >= 0 and offset < self._ends[i] else offset


@dataclass(slots=True)
class _Commits:
    """What ``advance`` knows of one partition: the handled offsets above its commit, the held
    ones (with how often each was held in this run), and where the commit is held."""

    handled: OffsetRanges = field(default_factory=OffsetRanges)
    held: dict[int, int] = field(default_factory=dict)
    held_at: int | None = None
    remembered: int | None = None  # with contiguous_offsets=False: the lowest held offset
    log_start_checked_at: int | None = None  # the committed offset last compared to it

    def note(self, offsets: Sequence[int], routes: Sequence[str]) -> list[int]:
        """Record a batch: handled offsets join their ranges (a run of consecutive ones at a
        time), held ones are counted. Returns the batch's held offsets."""
        held_now: list[int] = []
        held = self.held
        run_start = run_end = -1
        for offset, route in zip(offsets, routes, strict=True):
            if route == "hold":
                held[offset] = held.get(offset, 0) + 1
                held_now.append(offset)
                continue
            if held:
                held.pop(offset, None)
            if offset == run_end:
                run_end += 1
                continue
            self.handled.add(run_start, run_end)
            run_start, run_end = offset, offset + 1
        self.handled.add(run_start, run_end)
        return held_now

    def reach(self, base: int) -> int:
        """The commit target from ``base``: past every handled offset that follows it without a
        gap. Forgets what lies below the target and notes where the commit is held (at the
        target, when later offsets were handled or held)."""
        target = self.handled.end_of_run(base)
        self.handled.discard_below(target)
        if self.held:
            for offset in [o for o in self.held if o < target]:
                del self.held[offset]
        self.held_at = target if self.handled or self.held else None
        return target


@dataclass(slots=True)
class _Reading:
    """What the reader of one partition handed out, and what it must hand out again."""

    start: int  # the first offset this reader read from
    read_to: int  # one past the highest offset handed out
    fetch_at: int  # where the consumer fetches next, as far as this reader positioned it
    again: OffsetRanges = field(default_factory=OffsetRanges)  # below read_to, to hand out again
    due: dict[int, float] = field(default_factory=dict)  # held offsets, when to hand them out
    next_due: float = math.inf  # the earliest of those times
    advanced_here: bool = False  # this producer instance advances the partition too
    read_again_from: int | None = None  # where a reported hold last had it read again ...
    read_again_at: float = -math.inf  # ... and when

    def take(self, offset: int) -> bool:
        """Whether the message at ``offset`` is handed out: it is new, or to be read again."""
        if offset < self.fetch_at:
            return False  # fetched before a seek (aiokafka drops those itself)
        if self.again:
            self.again.discard(self.fetch_at, offset)  # skipped by the log: not there any more
        self.fetch_at = offset + 1
        if offset >= self.read_to:
            self.read_to = offset + 1
            return True
        if offset in self.again:
            self.again.discard(offset, offset + 1)
            return True
        return False

    def next_fetch(self) -> int:
        """Where to fetch next: the first offset to hand out again, else where reading stopped."""
        first = self.again.first()
        return self.read_to if first is None else first


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
    :param redelivery_delay: seconds before a held message is read again (see the module's
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
        self._commits: dict[TopicPartition, _Commits] = {}
        self._reading: dict[TopicPartition, _Reading] = {}
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
        log_starts = await consumer.beginning_offsets(assignment)
        loop = asyncio.get_running_loop()
        for tp in assignment:
            committed = await consumer.committed(tp)
            # Below the log start the records are gone (retention): the commit moves there
            # with the first advance, which says so.
            start = log_starts[tp] if committed is None else max(committed, log_starts[tp])
            consumer.seek(tp, start)
            self._reading[tp] = _Reading(start=start, read_to=start, fetch_at=start)
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
                        payload["key"] = _b64(message.key)
                        payload["value"] = _b64(message.value)
                        payload["headers"] = [[k, _b64(v)] for k, v in message.headers or ()]
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
        commits = self._commits.setdefault(tp, _Commits())
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
        commits: _Commits,
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
    def _remembered_target(commits: _Commits, offsets: Sequence[int], routes: Sequence[str]) -> int:
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
        self, tp: TopicPartition, commits: _Commits, offsets: Sequence[int], held: list[int]
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
        self._reading.clear()


class KafkaSharedTrigger(BaseEventTrigger):
    """Base class of triggers that share one Kafka consumer: subclass it and write
    ``filter_shared_stream``; everything broker-side is done.

    Keyword arguments are those of ``KafkaSharedStreamProducer`` (JSON-serialisable, since
    a separate committer rebuilds the producer from them: ``consumer_options``,
    ``producer_options``, ``redelivery_delay``), plus the routing policy as a dict.
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
        delay = options.pop("redelivery_delay", None)
        return KafkaSharedStreamProducer(
            options.pop("topics"),
            bootstrap_servers=options.pop("bootstrap_servers"),
            group_id=options.pop("group_id"),
            dead_letter_topic=options.pop("dead_letter_topic", None),
            partitions={t: list(ps) for t, ps in partitions.items()} if partitions else None,
            policy=policy,
            consumer_options=options.pop("consumer_options", None),
            producer_options=options.pop("producer_options", None),
            **({} if delay is None else {"redelivery_delay": delay}),
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        raise NotImplementedError(f"{type(self).__qualname__} runs on a shared stream only")
        yield  # pragma: no cover

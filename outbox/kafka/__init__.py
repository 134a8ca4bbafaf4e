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

Holds. A message that is held (by default: one a subscriber failed, also when another rejected
it, or that nobody was subscribed to) is not committed past; later messages of its partition
are still handled. The partition's commit is *held at* the first offset it cannot pass while
later messages were handled: ``describe_hold(lane)`` names that message, the committer records
it on the lane with the time it began (``outbox status``, the ``outbox_lane_held_seconds``
metric), and ``outbox prune`` keeps the lane's events from the held message on, which
deduplicate its re-reading.

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

from outbox.kafka.offsets import OffsetRanges
from outbox.kafka.payloads import decode_value as decode_value
from outbox.kafka.producer import HEADER_PREFIX as HEADER_PREFIX
from outbox.kafka.producer import KafkaSharedStreamProducer
from outbox.kafka.routing import DeadLetterFlood, RoutingPolicy
from outbox.kafka.routing import FloodGuard as FloodGuard
from outbox.kafka.trigger import KafkaSharedTrigger

__all__ = (
    "DeadLetterFlood",
    "KafkaSharedStreamProducer",
    "KafkaSharedTrigger",
    "OffsetRanges",
    "RoutingPolicy",
)

# Public classes keep the module path they had before ``outbox.kafka`` was a package: a trigger
# records its class path in the database (and Airflow in its trigger table), and a committer or
# triggerer of an earlier version must still import what a newer one recorded.
for _public in (
    DeadLetterFlood,
    KafkaSharedStreamProducer,
    KafkaSharedTrigger,
    OffsetRanges,
    RoutingPolicy,
):
    _public.__module__ = __name__

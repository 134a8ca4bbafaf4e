"""``KafkaSharedTrigger``: the base class of triggers that share one Kafka consumer (the
producer is rebuilt from its JSON-serialisable kwargs)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from outbox.kafka.producer import KafkaSharedStreamProducer
from outbox.kafka.routing import RoutingPolicy
from outbox.triggers import BaseEventTrigger

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Hashable, Sequence

    from outbox.triggers import TriggerEvent

__all__ = ("KafkaSharedTrigger",)


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

"""Triggers on the Airflow Kafka provider's ``KafkaSharedStreamTrigger`` for the provider tests:
the provider's trigger itself (``all``), and two that override only ``filter_shared_stream``, as
the provider's docstring invites (``even`` fires for even messages only; ``reject`` rejects every
seventh with Airflow's ``reject_shared_stream_event``, which the provider dead-letters). The
producer is the provider's ``KafkaSharedStreamProducer``, unchanged.

Messages are ``{"n": k}`` as JSON, or, for every tenth, framed like Confluent's Schema Registry
wire format: a 0x00 magic byte, a 4-byte schema id, then the body.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from airflow.providers.apache.kafka.triggers.shared_stream import KafkaSharedStreamTrigger
from airflow.triggers.base import TriggerEvent
from airflow.triggers.shared_stream import reject_shared_stream_event

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

MODES = ("all", "even", "reject")
FRAME = b"\x00\x00\x00\x00\x01"  # magic byte 0, schema id 1


def value_of(n: int) -> bytes:
    body = json.dumps({"n": n}).encode()
    return FRAME + body if n % 10 == 3 else body


def n_of(value: Any) -> int:
    """``n`` of a message value (bytes from the broker, or text the provider decoded)."""
    data = value.encode() if isinstance(value, str) else bytes(value)
    return int(json.loads(data.removeprefix(FRAME))["n"])


def rejects(n: int) -> bool:
    return n % 7 == 0


def fires(mode: str, n: int) -> bool:
    if mode == "even":
        return n % 2 == 0
    if mode == "reject":
        return not rejects(n)
    return True


class EvenKafkaTrigger(KafkaSharedStreamTrigger):
    async def filter_shared_stream(
        self, shared_stream: AsyncIterator[Any]
    ) -> AsyncIterator[TriggerEvent]:
        async for value in shared_stream:
            if n_of(value) % 2 == 0:
                yield TriggerEvent({"n": n_of(value)})


class RejectingKafkaTrigger(KafkaSharedStreamTrigger):
    async def filter_shared_stream(
        self, shared_stream: AsyncIterator[Any]
    ) -> AsyncIterator[TriggerEvent]:
        async for value in shared_stream:
            if rejects(n_of(value)):
                reject_shared_stream_event()
                continue
            yield TriggerEvent({"n": n_of(value)})


TRIGGERS = {
    "all": KafkaSharedStreamTrigger,
    "even": EvenKafkaTrigger,
    "reject": RejectingKafkaTrigger,
}

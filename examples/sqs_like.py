"""Example — SQS-like producer, as written in the ack-channel design, on outbox.

Only the import lines differ from the design's text. Run it with
``OUTBOX_DATABASE_URL=postgresql://... python -m examples.run``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from outbox import AdvanceItem, BaseEventTrigger, SharedStreamProducer, TriggerEvent

from .fake_brokers import create_sqs_client, delete_sqs_message, poll_sqs

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence


class SqsSharedStreamProducer(SharedStreamProducer):
    def __init__(self, queue_url: str):
        self.queue_url = queue_url
        self.client = None

    async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
        # Open the connection here, not in the trigger's factory.
        self.client = await create_sqs_client()
        while True:
            messages = await poll_sqs(self.client, self.queue_url)
            for msg in messages:
                yield msg["Body"], msg["ReceiptHandle"]

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        # Called with one lane's batch of fully resolved messages.
        for receipt_handle, outcome in batch:
            if outcome.is_clean:
                await delete_sqs_message(self.client, self.queue_url, receipt_handle)
            # Otherwise leave the message for the visibility timeout to redeliver.

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.close()


class SqsSharedTrigger(BaseEventTrigger):
    def __init__(self, *, queue_url: str, region: str | None = None):
        super().__init__()
        self.queue_url = queue_url
        self.region = region

    def serialize(self):
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"queue_url": self.queue_url, "region": self.region},
        )

    def shared_stream_key(self):
        return ("sqs", self.queue_url)

    @classmethod
    def create_shared_stream_producer(cls, kwargs) -> SqsSharedStreamProducer:
        return SqsSharedStreamProducer(kwargs["queue_url"])

    async def filter_shared_stream(self, shared_stream):
        async for raw in shared_stream:
            if self.region is None or raw.get("region") == self.region:
                yield TriggerEvent(raw)

    async def run(self):
        yield TriggerEvent({})

"""The demo's messages, its three subscribers (``DemoTrigger``) and the triggerer process that
runs them (``python -m outbox.demo triggerer ...``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from outbox.kafka import KafkaSharedTrigger
from outbox.protocol import reject_shared_stream_event
from outbox.triggers import TriggerEvent

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence


SUBSCRIBERS = ("audit", "billing", "orders")
"""``audit`` stores every message; ``billing`` rejects malformed ones (dead-lettered) and stores
the rest; ``orders`` accepts every message but stores only orders."""

KINDS = ("order", "click", "refund", "order", "signup")
ACK_TIMEOUT = 60.0  # longer than a triggerer restart: nobody's deliveries time out meanwhile


# -- the messages and the subscribers -------------------------------------------------------


def kind_of(n: int) -> str:
    return KINDS[n % len(KINDS)]


def is_malformed(n: int) -> bool:
    """About one message in a hundred has an amount billing cannot read."""
    return n % 97 == 41


def message(n: int) -> dict[str, Any]:
    amount: Any = "twelve" if is_malformed(n) else round(5 + (n * 37 % 1000) / 10, 2)
    return {"n": n, "kind": kind_of(n), "amount": amount}


def fires(subscriber: str, n: int) -> bool:
    """Whether ``subscriber`` stores a trigger event for message ``n``."""
    if subscriber == "billing":
        return not is_malformed(n)
    if subscriber == "orders":
        return kind_of(n) == "order"
    return True


class DemoTrigger(KafkaSharedTrigger):
    """One of the demo's three subscribers (``subscriber`` in ``SUBSCRIBERS``) on a Kafka topic
    of ``{"n", "kind", "amount"}`` messages."""

    def __init__(self, *, subscriber: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if subscriber not in SUBSCRIBERS:
            raise ValueError(f"subscriber must be one of {SUBSCRIBERS}, got {subscriber!r}")
        self.subscriber = subscriber

    def serialize(self) -> tuple[str, dict[str, Any]]:
        path, kwargs = super().serialize()
        return path, {**kwargs, "subscriber": self.subscriber}

    async def filter_shared_stream(
        self, shared_stream: AsyncIterator[Any]
    ) -> AsyncIterator[TriggerEvent]:
        async for raw in shared_stream:
            data = raw if isinstance(raw, dict) else {}
            n = data.get("n")
            if self.subscriber == "audit":
                yield TriggerEvent({"n": n, "kind": data.get("kind")})
            elif self.subscriber == "billing":
                amount = data.get("amount")
                if not isinstance(amount, int | float) or isinstance(amount, bool):
                    reject_shared_stream_event()  # the committer dead-letters it
                    continue
                yield TriggerEvent({"n": n, "amount": amount})
            elif data.get("kind") == "order":
                yield TriggerEvent({"n": n})


# -- the triggerer process ----------------------------------------------------------------


async def _drain(events: AsyncIterator[TriggerEvent]) -> None:
    async for _ in events:
        pass


async def _triggerer(args: argparse.Namespace) -> int:
    from outbox.manager import SharedStreamManager
    from outbox.store import OutboxStore

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with OutboxStore.from_url(args.database_url) as store:
        await store.check_schema()
        manager = SharedStreamManager(store, ack_timeout=ACK_TIMEOUT, run_committer=False)
        common = {
            "topics": [args.topic],
            "bootstrap_servers": args.bootstrap,
            "group_id": args.group,
            "dead_letter_topic": args.dlq,
        }
        # Subscribed in one go, before the stream polls: all three are in every snapshot.
        drains = [
            asyncio.create_task(
                _drain(
                    manager.subscribe(
                        trigger_id=name, trigger=DemoTrigger(subscriber=name, **common)
                    )
                ),
                name=name,
            )
            for name in SUBSCRIBERS
        ]
        print(f"ready pid={os.getpid()}", flush=True)
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({stopped, *drains}, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        for task in drains:
            if task in done:
                print(f"subscriber {task.get_name()} failed: {task.exception()!r}", flush=True)
                code = 3
        await manager.stop_all()
        stopped.cancel()
        await asyncio.gather(*drains, stopped, return_exceptions=True)
        print(f"stopped pid={os.getpid()} code={code}", flush=True)
        return code


def triggerer_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m outbox.demo triggerer",
        description="The demo's triggerer process (started by `outbox demo`).",
    )
    parser.add_argument("role", choices=["triggerer"])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--dlq", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return asyncio.run(_triggerer(args))

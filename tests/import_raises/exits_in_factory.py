"""A trigger class that imports fine but exits when asked for a producer."""

from __future__ import annotations

import sys
from typing import Any

from outbox import BaseEventTrigger, SharedStreamProducer


class Trigger(BaseEventTrigger):
    @classmethod
    def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> SharedStreamProducer:
        sys.exit("no producer today")

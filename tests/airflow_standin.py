"""A stand-in for outbox's Airflow manager: Airflow's own ``SharedStreamManager`` that appends
one JSON line per call to the file named by ``[outbox] standin_log`` (with the process, the
asyncio task and the time), so a test can see that ``airflow triggerer`` constructed it in its
forked runner, with which arguments, and how the runner drives it.

Point ``[outbox] manager_class`` at ``tests.airflow_standin.RecordingSharedStreamManager``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import TYPE_CHECKING, Any

from airflow.configuration import conf
from airflow.triggers.shared_stream import SharedStreamManager

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Hashable, Iterable


class RecordingSharedStreamManager(SharedStreamManager):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._log_path = conf.get("outbox", "standin_log")
        self._record(
            "init",
            kwargs={k: v for k, v in kwargs.items() if k != "log"},
            database_url=conf.get("outbox", "database_url"),
        )

    def _record(self, call: str, **fields: Any) -> None:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no running event loop (TriggerRunner.__init__)
            task = None
        line = {
            "call": call,
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "task": task.get_name() if task is not None else None,
            "at": time.time(),
            **fields,
        }
        with open(self._log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, default=repr) + "\n")

    def subscribe(self, *, trigger_id: int, trigger: Any, key: Hashable) -> AsyncIterator[Any]:
        self._record("subscribe", trigger_id=trigger_id, key=key)
        stream: AsyncIterator[Any] = super().subscribe(
            trigger_id=trigger_id, trigger=trigger, key=key
        )
        return stream

    def bind_pending_event(self, *, trigger_id: int, key: Hashable) -> int | None:
        seq: int | None = super().bind_pending_event(trigger_id=trigger_id, key=key)
        self._record("bind_pending_event", trigger_id=trigger_id, seq=seq)
        return seq

    def confirm_persisted(self, seqs: Iterable[int]) -> None:
        seq_list = list(seqs)
        self._record("confirm_persisted", seqs=seq_list)
        super().confirm_persisted(seq_list)

    async def unsubscribe(self, trigger_id: int, key: Hashable) -> None:
        self._record("unsubscribe", trigger_id=trigger_id, key=key)
        await super().unsubscribe(trigger_id, key)

    async def stop_all(self) -> None:
        self._record("stop_all")
        await super().stop_all()

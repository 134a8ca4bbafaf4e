"""``outbox health``: checks for liveness and readiness probes.

As ``airflow jobs check`` and procrastinate's ``healthchecks`` do: the database answers (within
a timeout), its outbox schema is at this version's head, and, given a committer's metrics
address, that committer completed a pass over its lanes recently (its
``outbox_committer_last_pass_timestamp_seconds``; one that started less than that long ago has
time for its first). Each check is one line; any failure makes
the command exit 1.
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from outbox.dburl import redact_url
from outbox.errors import AccessDenied, DatabaseUnavailable, OutboxError
from outbox.logs import one_line
from outbox.store import HEAD_REVISION, OutboxStore

__all__ = ("LAST_PASS_METRIC", "Check", "check_committer", "check_database")

LAST_PASS_METRIC = "outbox_committer_last_pass_timestamp_seconds"
START_METRIC = "process_start_time_seconds"


@dataclass(frozen=True, slots=True)
class Check:
    """One check: its name, whether it passed, and what was seen (one line)."""

    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def check_database(
    url: str, *, within: float, engine_options: dict[str, Any] | None = None
) -> list[Check]:
    """Whether the database at ``url`` answers within ``within`` seconds, and whether its
    outbox schema is at this version's head."""
    options = dict(engine_options or {})
    connect_args = {**options.pop("connect_args", {}), "timeout": within}
    shown = redact_url(url)
    started = time.perf_counter()
    try:
        store = OutboxStore.from_url(url, pool_size=1, connect_args=connect_args, **options)
    except OutboxError as exc:
        return [Check("database", False, str(exc))]
    try:
        async with asyncio.timeout(within):
            revision = await store.schema_revision()
    except TimeoutError:
        return [Check("database", False, f"{shown} did not answer within {within:g}s")]
    except DatabaseUnavailable as exc:
        return [Check("database", False, str(exc))]
    except AccessDenied as exc:
        answered = Check("database", True, f"{shown} answered")
        return [answered, Check("schema", False, str(exc))]
    finally:
        await store.aclose()
    elapsed = (time.perf_counter() - started) * 1000
    database = Check("database", True, f"{shown} answered in {elapsed:.0f} ms")
    if revision == HEAD_REVISION:
        schema = Check("schema", True, f"at {revision} (head)")
    elif revision is None:
        schema = Check("schema", False, "no outbox tables; run `outbox migrate`")
    elif revision < HEAD_REVISION:
        schema = Check(
            "schema", False, f"at {revision}, behind {HEAD_REVISION}; run `outbox migrate`"
        )
    else:
        schema = Check(
            "schema",
            False,
            f"at {revision}, newer than this outbox knows ({HEAD_REVISION}); upgrade outbox",
        )
    return [database, schema]


def metrics_url(address: str) -> str:
    """``http://host:port/metrics`` from ``host:port`` or a URL without a path."""
    if "://" not in address:
        address = f"http://{address}"
    parts = urllib.parse.urlsplit(address)
    if parts.path in ("", "/"):
        parts = parts._replace(path="/metrics")
    return urllib.parse.urlunsplit(parts)


async def check_committer(address: str, *, max_pass_age: float, within: float) -> Check:
    """Whether the committer serving metrics at ``address`` completed a pass within the last
    ``max_pass_age`` seconds."""
    url = metrics_url(address)

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=within) as response:
            return str(response.read().decode())

    try:
        text = await asyncio.to_thread(scrape)
    except (OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        shown = one_line(reason) if isinstance(reason, BaseException) else str(reason)
        return Check(
            "committer",
            False,
            f"no metrics at {url} ({shown}); is the committer running with --metrics-port?",
        )
    try:
        values = {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name in (LAST_PASS_METRIC, START_METRIC)
        }
    except ValueError as exc:
        return Check("committer", False, f"{url} does not serve Prometheus metrics ({exc})")
    if LAST_PASS_METRIC not in values:
        return Check(
            "committer", False, f"{url} has no {LAST_PASS_METRIC}: not an outbox committer's"
        )
    now = time.time()
    last = values[LAST_PASS_METRIC]
    if last <= 0:  # none yet: a committer just started has the same time for its first
        started = values.get(START_METRIC, 0.0)
        age = now - started
        if started > 0 and age <= max_pass_age:
            return Check("committer", True, f"started {age:.1f}s ago, first pass to come ({url})")
        return Check("committer", False, f"no pass completed yet ({url}); see its log")
    age = max(0.0, now - last)
    if age > max_pass_age:
        return Check(
            "committer",
            False,
            f"last pass {age:.0f}s ago, more than {max_pass_age:g}s ({url}); see its log",
        )
    return Check("committer", True, f"last pass {age:.1f}s ago ({url})")

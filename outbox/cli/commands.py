"""What each ``outbox`` command does (``COMMANDS``; ``demo`` is run by ``main``), and ``say``:
a command's one line on stderr."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import TYPE_CHECKING, Any, Final

from outbox.cli.arguments import version
from outbox.cli.values import RETENTION_FLOOR, show_duration
from outbox.cli.worker import run_until_signalled
from outbox.dburl import redact_url
from outbox.errors import ConfigurationError, DatabaseUnavailable, OutboxError, SchemaNotMigrated
from outbox.settings import Found, database_url, search_path_options
from outbox.store import HEAD_REVISION

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

    from outbox.metrics import CommitterMetrics


log = logging.getLogger("outbox.cli")


def _url(args: argparse.Namespace) -> Found:
    found = database_url(args.database_url)
    args.resolved_url = found.value  # for scrubbing its password from unforeseen errors
    return found


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    return search_path_options(args.schema)


async def _migrate(args: argparse.Namespace) -> int:
    from outbox.migrate import migrate, migration_sql

    start, colon, target = args.revision.rpartition(":")
    if args.sql:
        sql = migration_sql(
            target, start=start or None, downgrade=args.downgrade, schema=args.schema
        )
        print(sql, end="")
        return 0
    if colon:
        raise ConfigurationError(
            f"--revision {args.revision!r}: FROM:TO is for --sql; give one revision"
        )
    url = _url(args)
    done = await migrate(url.value, target, downgrade=args.downgrade, schema=args.schema)
    for step in done.steps:
        print(f"{'undid' if done.downgraded else 'applied'} {step.revision}: {step.title}")
    at = "base (no outbox tables)" if done.after is None else done.after
    if done.after == HEAD_REVISION:
        at += " (head)"
    where = redact_url(url.value)
    print(f"outbox schema {'at' if done.steps else 'already at'} {at} on {where}")
    return 0


async def _check_migrations(args: argparse.Namespace) -> int:
    from outbox.store import OutboxStore

    url = _url(args)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.wait
    waiting = False
    async with OutboxStore.from_url(url.value, pool_size=1, **_engine_options(args)) as store:
        while True:
            unavailable: DatabaseUnavailable | None = None
            revision = None
            try:
                revision = await store.schema_revision()
            except DatabaseUnavailable as exc:
                unavailable = exc
            if revision == HEAD_REVISION:
                print(f"outbox schema at {revision} (head) on {redact_url(url.value)}")
                return 0
            if revision is not None and revision > HEAD_REVISION:
                raise SchemaNotMigrated(
                    f"the outbox schema is at {revision}, newer than this version of outbox "
                    f"knows ({HEAD_REVISION}); upgrade outbox"
                )
            left = deadline - loop.time()
            if left > 0 and not waiting:
                waiting = True
                now = "unreachable" if unavailable else f"at {revision or 'no revision'}"
                log.info(
                    "waiting up to %s for the outbox schema to reach %s (now %s)",
                    show_duration(args.wait),
                    HEAD_REVISION,
                    now,
                )
            if left <= 0:
                waited = f" after waiting {show_duration(args.wait)}" if args.wait else ""
                if unavailable is not None:
                    raise DatabaseUnavailable(f"{unavailable}{waited}")
                raise SchemaNotMigrated(
                    f"the outbox schema is at {revision or 'no revision (no outbox tables)'}, "
                    f"behind {HEAD_REVISION}{waited}; run `outbox migrate`"
                )
            await asyncio.sleep(min(1.0, left))


async def _status(args: argparse.Namespace) -> int:
    from outbox.status import print_status

    await print_status(_url(args).value, as_json=args.json, **_engine_options(args))
    return 0


async def _health(args: argparse.Namespace) -> int:
    from outbox.health import Check, check_committer, check_database

    if not args.database and not args.committer:
        raise ConfigurationError("--no-database leaves nothing to check; add --committer")
    checks: list[Check] = []
    if args.database:
        checks += await check_database(
            _url(args).value, within=args.timeout, engine_options=_engine_options(args)
        )
    if args.committer:
        checks.append(
            await check_committer(
                args.committer, max_pass_age=args.max_pass_age, within=args.timeout
            )
        )
    healthy = all(check.ok for check in checks)
    if args.json:
        print(json.dumps({"healthy": healthy, "checks": [c.as_dict() for c in checks]}))
    else:
        for check in checks:
            print(f"{'ok' if check.ok else 'FAIL':4}  {check.name:9}  {check.detail}")
    if not healthy:
        failed = ", ".join(c.name for c in checks if not c.ok)
        say(args, f"unhealthy ({failed}); see the lines above")
    return 0 if healthy else 1


def _retention(seconds: float, *, force: bool, flag: str) -> float:
    if seconds < RETENTION_FLOOR and not force:
        raise ConfigurationError(
            f"{flag} {show_duration(seconds)} is under {show_duration(RETENTION_FLOOR)}: it "
            "would delete events that deduplicate redeliveries; keep it longer than the "
            "broker's redelivery horizon" + (", or pass --force" if flag == "--retention" else "")
        )
    return seconds


async def _prune(args: argparse.Namespace) -> int:
    from outbox.store import OutboxStore

    retention = _retention(args.retention, force=args.force, flag="--retention")
    shown = show_duration(retention)
    async with OutboxStore.from_url(_url(args).value, **_engine_options(args)) as store:
        await store.check_schema()
        if args.dry_run:
            records, events = await store.prunable(retention)
            print(
                f"would prune {events} events and {records} dispatched records older than "
                f"{shown} (dry run: nothing deleted)"
            )
            return 0
        records = events = 0
        while True:
            pruned_records, pruned_events = await store.prune(retention, batch=args.batch_size)
            records += pruned_records
            events += pruned_events
            if not pruned_records and not pruned_events:
                break
    print(f"pruned {events} events and {records} dispatched records older than {shown}")
    return 0


async def _grant(args: argparse.Namespace) -> int:
    from outbox.roles import grant, grants_sql

    options = {"schema": args.schema, "create": args.create}
    if args.print:
        print(grants_sql(args.role, args.jobs, **options), end="")
        return 0
    url = _url(args)
    await grant(url.value, args.role, args.jobs, **options)
    jobs = ", ".join(dict.fromkeys(args.jobs))
    print(f"granted outbox's {jobs} privileges to {args.role} on {redact_url(url.value)}")
    return 0


async def _rotate_fernet_key(args: argparse.Namespace) -> int:
    from outbox.store import OutboxStore

    async with OutboxStore.from_url(_url(args).value, **_engine_options(args)) as store:
        await store.check_schema()
        streams = await store.rotate_fernet_key(decrypt=args.decrypt)
    done = "decrypted" if args.decrypt else "encrypted with the first Fernet key"
    print(f"trigger kwargs of {streams} streams {done}")
    return 0


async def _committer(args: argparse.Namespace) -> int:
    from outbox.committer import LaneCommitter
    from outbox.store import OutboxStore

    prune_retention = (
        None
        if args.prune_retention is None
        else _retention(args.prune_retention, force=False, flag="--prune-retention")
    )
    url = _url(args)
    loop = asyncio.get_running_loop()
    store = OutboxStore.from_url(url.value, **_engine_options(args))
    metrics: CommitterMetrics | None = None
    try:
        if args.metrics_port is not None:
            from outbox.metrics import CommitterMetrics

            metrics = CommitterMetrics()
        committer = LaneCommitter(
            store,
            allowed_modules=args.allowed_modules or (),
            batch_size=args.batch_size,
            poll_interval=args.poll_interval,
            lease_seconds=args.lease_seconds,
            metrics=metrics,
            prune_retention=prune_retention,
        )
        await store.check_schema()
        served = "off"
        if metrics is not None:
            try:
                host, port = metrics.serve(args.metrics_port, args.metrics_host)
            except OSError as exc:
                raise OutboxError(
                    f"cannot serve metrics on {args.metrics_host}:{args.metrics_port} "
                    f"({exc.strerror or exc}); pick a free --metrics-port or another "
                    "--metrics-host"
                ) from None
            metrics.read_on_scrape(store, loop)
            served = f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"
        started = {
            "version": version(),
            "owner": committer.owner,
            "database": redact_url(url.value),
            "database_from": url.source,
            "allowed_modules": list(committer.allowed_modules),
            "metrics": served,
            "batch_size": committer.batch_size,
            "poll_interval": committer.poll_interval,
            "lease_seconds": committer.lease_seconds,
            "prune_retention": (
                "off" if prune_retention is None else show_duration(prune_retention)
            ),
        }
        return await run_until_signalled(committer, metrics, started)
    finally:
        if metrics is not None:
            metrics.close()
        await store.aclose()


COMMANDS: Final[dict[str, Callable[[argparse.Namespace], Any]]] = {
    "migrate": _migrate,
    "check-migrations": _check_migrations,
    "committer": _committer,
    "status": _status,
    "health": _health,
    "prune": _prune,
    "grant": _grant,
    "rotate-fernet-key": _rotate_fernet_key,
}


def say(args: argparse.Namespace, message: str) -> None:
    """One line on stderr: a log record in JSON logs (every line stays JSON), else plain."""
    line = f"outbox {args.command}: {message}"
    if args.log_format == "json":
        log.error(line)
    else:
        print(line, file=sys.stderr)

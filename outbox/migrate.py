"""Run outbox's alembic migrations from a checkout or an installed wheel.

``migrate`` upgrades (or, asked to, downgrades) in one transaction and says which revisions it
applied or undid; a target below the database's revision is refused unless downgrading was
asked for. ``migration_sql`` prints the same as SQL, without a database (alembic's offline
mode). ``schema_revision`` tells how far a database is.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Final

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.exc import DBAPIError

from outbox.dburl import asyncpg_url, describe_connection_error, scrub, shown_url
from outbox.errors import ConfigurationError, DatabaseUnavailable, OutboxError, SchemaNotMigrated
from outbox.settings import quote_ident
from outbox.store import HEAD_REVISION, VERSION_TABLE, OutboxStore

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

__all__ = (
    "HEAD_REVISION",
    "DowngradeRefused",
    "Migration",
    "Step",
    "alembic_config",
    "migrate",
    "migration_sql",
    "resolve_revision",
    "revisions",
)

BASE: Final = "base"


class DowngradeRefused(OutboxError):
    """The target revision is below the database's and downgrading was not asked for."""


@dataclass(frozen=True, slots=True)
class Step:
    """One migration: its revision and the first line of its description."""

    revision: str
    title: str


@dataclass(frozen=True, slots=True)
class Migration:
    """What ``migrate`` did: the revision before and after (``None``: no outbox tables), and
    the steps applied (upgrading) or undone (downgrading), in the order they ran."""

    before: str | None
    after: str | None
    steps: tuple[Step, ...]
    downgraded: bool = False


def _script_location() -> Path:
    packaged = Path(str(resources.files("outbox"))) / "_migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str | None = None, *, output: io.StringIO | None = None) -> Config:
    """An alembic ``Config`` for outbox's migrations, wherever they are installed."""
    location = _script_location()
    config = Config(output_buffer=output) if output is not None else Config()
    config.set_main_option("script_location", str(location))
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", str(location / "versions"))
    if url is not None:
        config.set_main_option("sqlalchemy.url", asyncpg_url(url).replace("%", "%%"))
    return config


def revisions() -> list[Step]:
    """Every migration, oldest first."""
    script = ScriptDirectory.from_config(alembic_config())
    return [
        Step(str(s.revision), (s.doc or "").strip())
        for s in reversed(list(script.walk_revisions()))
    ]


def resolve_revision(revision: str) -> str:
    """``head``, ``base`` or a revision (``0005``, or ``5``) as the revision it names, else a
    one-line ``ConfigurationError`` listing the known ones."""
    known = [step.revision for step in revisions()]
    text = revision.strip().lower()
    if text in ("head", "heads"):
        return known[-1]
    if text == BASE:
        return BASE
    if text.isdigit() and text.zfill(4) in known:
        return text.zfill(4)
    raise ConfigurationError(
        f"no outbox revision {revision!r}; use head, base or one of {known[0]}..{known[-1]}"
    )


def _position(revision: str | None, known: list[str]) -> int:
    return -1 if revision in (None, BASE) else known.index(str(revision))


def _between(lower: str | None, upper: str | None) -> tuple[Step, ...]:
    """The steps after ``lower`` up to and including ``upper``, oldest first."""
    steps = revisions()
    known = [step.revision for step in steps]
    return tuple(steps[_position(lower, known) + 1 : _position(upper, known) + 1])


async def migrate(
    url: str,
    revision: str = "head",
    *,
    downgrade: bool = False,
    schema: str | None = None,
) -> Migration:
    """Bring the database at ``url`` to ``revision`` in one transaction (tables in ``schema``,
    else in the connection's search path). Going down needs ``downgrade``; without it, a
    target below the database's revision raises ``DowngradeRefused`` saying what would be
    undone."""
    target = resolve_revision(revision)
    config = alembic_config(url)
    known = [step.revision for step in revisions()]

    def run(connection: Connection) -> Migration:
        if schema is not None:
            exists = connection.scalar(
                sa.text("SELECT 1 FROM pg_namespace WHERE nspname = :name"), {"name": schema}
            )
            if not exists:
                raise OutboxError(
                    f"schema {schema!r} does not exist; create it as the tables' owner: CREATE "
                    f"SCHEMA {quote_ident(schema)}"
                )
            connection.execute(sa.text(f"SET LOCAL search_path TO {quote_ident(schema)}"))
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        before = context.get_current_revision()
        if before is not None and before not in known:
            raise SchemaNotMigrated(
                f"the outbox schema is at revision {before!r}, newer than this version of "
                f"outbox knows (its head is {known[-1]!r}); migrate with the newer outbox"
            )
        here, there = _position(before, known), _position(target, known)
        if there < here and not downgrade:
            would_undo = ", ".join(s.revision for s in reversed(_between(target, before)))
            raise DowngradeRefused(
                f"the database is at {before}, above {target}: `outbox migrate` only upgrades "
                f"unless given --downgrade, which would undo {would_undo} (stop every triggerer "
                "and committer first; --sql shows the SQL)"
            )
        if there > here and downgrade:
            raise DowngradeRefused(
                f"the database is at {before or 'no revision'}, below {target}: --downgrade "
                "only goes down; leave it out to upgrade"
            )
        config.attributes["connection"] = connection
        if there < here:
            command.downgrade(config, target)
            undone = tuple(reversed(_between(target, before)))
            return Migration(before, None if target == BASE else target, undone, True)
        if there > here:
            command.upgrade(config, target)
        return Migration(before, None if target == BASE else target, _between(before, target))

    store = OutboxStore.from_url(url, pool_size=1)
    try:
        try:
            connection = await store.engine.connect()
        except (OSError, DBAPIError, TypeError, ValueError) as exc:  # cannot connect
            raise DatabaseUnavailable(describe_connection_error(store.engine, exc)) from None
        try:
            async with connection.begin():
                return await connection.run_sync(run)
        except DBAPIError as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            said = scrub(reason[0], store.engine.url) if reason else type(exc).__name__
            raise OutboxError(
                f"migrating {shown_url(store.engine.url)} to {target} failed, nothing was "
                f"changed: {said}; migrate as the role that owns outbox's tables"
            ) from None
        finally:
            await connection.close()
    finally:
        await store.aclose()


def migration_sql(
    revision: str = "head",
    *,
    start: str | None = None,
    downgrade: bool = False,
    schema: str | None = None,
) -> str:
    """The SQL that takes a database from ``start`` (default: no outbox tables, or for a
    downgrade the head) to ``revision``, without connecting (alembic's offline mode)."""
    target = resolve_revision(revision)
    if downgrade:
        origin = resolve_revision(start or "head")
    else:
        origin = BASE if start is None else resolve_revision(start)
    known = [step.revision for step in revisions()]
    here, there = _position(origin, known), _position(target, known)
    if (downgrade and there > here) or (not downgrade and there < here):
        direction = "down" if downgrade else "up"
        raise ConfigurationError(
            f"from {origin} to {target} is not {direction}; "
            + ("leave out --downgrade" if downgrade else "add --downgrade to go down")
        )
    output = io.StringIO()
    config = alembic_config(output=output)
    span = f"{origin}:{target}"
    if downgrade:
        command.downgrade(config, span, sql=True)
    else:
        command.upgrade(config, span if origin != BASE else target, sql=True)
    text = output.getvalue()
    if schema is not None:
        text = f"SET search_path TO {quote_ident(schema)};\n\n{text}"
    return text

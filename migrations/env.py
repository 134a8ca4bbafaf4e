"""Alembic environment for outbox's tables: async (asyncpg), and able to run on a caller's
connection (``config.attributes["connection"]``), which is how ``outbox migrate`` and the tests
share theirs."""

from __future__ import annotations

import asyncio
from logging.config import fileConfig
from typing import TYPE_CHECKING, Any

from alembic import context
from sqlalchemy import pool
from sqlalchemy.ext.asyncio import create_async_engine

from outbox.errors import ConfigurationError
from outbox.schema import metadata
from outbox.settings import database_url
from outbox.store import VERSION_TABLE, asyncpg_url

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

config = context.config

# Run by alembic's own command line (`alembic upgrade head` from a checkout): log what it does
# as alembic.ini says (each revision it runs). `outbox migrate` says it itself.
if config.config_file_name is not None and "connection" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url(required: bool = True) -> str | None:
    """The URL from ``-x url=...``, else ``sqlalchemy.url``, else as ``outbox`` finds it
    (OUTBOX_DATABASE_URL, its _FILE or _CMD, Airflow's configuration, libpq's PG*)."""
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        try:
            url = database_url().value
        except ConfigurationError as exc:
            if not required:
                return None
            raise SystemExit(f"{exc} (or pass -x url=postgresql://...)") from None
    return asyncpg_url(url)


def _include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    # Users keep their own tables in the same database; compare only ours.
    if type_ == "table":
        return bool(name and name.startswith("outbox_"))
    return True


def _configure(connection: Connection | None = None, **kwargs: Any) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        include_object=_include_object,
        compare_type=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    # SQL for later (`outbox migrate --sql`, `alembic upgrade head --sql`): no database needed.
    url = _url(required=False)
    options: dict[str, Any] = {"literal_binds": True, "dialect_opts": {"paramstyle": "named"}}
    if url:
        _configure(url=url, **options)
    else:
        _configure(dialect_name="postgresql", **options)
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    engine = create_async_engine(str(_url()), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
            await connection.commit()
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    shared = config.attributes.get("connection")
    if shared is not None:
        do_run_migrations(shared)
    else:
        asyncio.run(run_async_migrations())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

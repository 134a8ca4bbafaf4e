"""Run outbox's alembic migrations from a checkout or an installed wheel."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from alembic import command
from alembic.config import Config
from sqlalchemy.exc import DBAPIError

from outbox.dburl import asyncpg_url, describe_connection_error
from outbox.errors import DatabaseUnavailable
from outbox.store import OutboxStore

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

__all__ = ("alembic_config", "migrate")


def _script_location() -> Path:
    packaged = Path(str(resources.files("outbox"))) / "_migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str | None = None) -> Config:
    """An alembic ``Config`` for outbox's migrations, wherever they are installed."""
    location = _script_location()
    config = Config()
    config.set_main_option("script_location", str(location))
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", str(location / "versions"))
    if url is not None:
        config.set_main_option("sqlalchemy.url", asyncpg_url(url).replace("%", "%%"))
    return config


async def migrate(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision`` on one shared connection."""
    config = alembic_config(url)

    def upgrade(connection: Connection) -> None:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    store = OutboxStore.from_url(url, pool_size=1)
    try:
        async with store.engine.begin() as conn:
            await conn.run_sync(upgrade)
    except (OSError, DBAPIError, TypeError, ValueError) as exc:  # cannot connect, a bad option
        raise DatabaseUnavailable(describe_connection_error(store.engine, exc)) from None
    finally:
        await store.aclose()

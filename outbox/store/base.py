"""The engine a store runs on: construction, schema checks, autocommit connections and LISTEN."""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Self

import sqlalchemy as sa
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from outbox.dburl import asyncpg_url, describe_connection_error, redact_url, scrub
from outbox.errors import (
    AccessDenied,
    ConfigurationError,
    DatabaseUnavailable,
    SchemaNotMigrated,
)
from outbox.fernet import KwargsCipher
from outbox.store.sqlparts import (
    CONSUMER_CHANNEL,
    MOVED_CHANNEL,
    NOTIFY_CHANNEL,
    RECORDED_CHANNEL,
    RECORDS_CHANNEL,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence
    from types import TracebackType

VERSION_TABLE = "outbox_alembic_version"
HEAD_REVISION = "0010"


_INSUFFICIENT_PRIVILEGE = "42501"


class StoreBase:
    """The database side of outbox: an ``AsyncEngine`` on asyncpg and all of outbox's SQL.

    Build it with ``OutboxStore.from_url(url)`` (it owns the engine it creates) or hand it an
    engine (which stays yours). Use it as ``async with`` or call ``aclose()``.
    """

    def __init__(
        self, engine: AsyncEngine, *, owns_engine: bool = False, fernet_key: str | None = None
    ) -> None:
        self.engine = engine
        self._owns_engine = owns_engine
        # Encrypts trigger kwargs at rest: ``fernet_key``, else $OUTBOX_FERNET_KEY, else
        # Airflow's $AIRFLOW__CORE__FERNET_KEY (comma-separated keys; the first encrypts).
        self._cipher = KwargsCipher.configured(fernet_key)
        # Work done in one statement runs outside a transaction block: no BEGIN and COMMIT (or
        # ROLLBACK) round trips around it.
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")

    @classmethod
    def from_url(cls, url: str, *, fernet_key: str | None = None, **engine_options: Any) -> Self:
        """A store on a new engine for ``url`` (``postgresql://`` or ``postgresql+asyncpg://``);
        ``fernet_key`` as for the constructor."""
        cipher = KwargsCipher.configured(fernet_key)  # a bad key fails before any engine
        engine_options.setdefault("pool_size", 5)
        # No ping on every checkout (a round trip per transaction): after a database restart
        # the first statement on a stale connection fails as a disconnect, SQLAlchemy discards
        # the pool's connections, and every caller retries such errors (``is_transient``).
        engine_options.setdefault("pool_pre_ping", False)
        try:
            engine = create_async_engine(asyncpg_url(url), **engine_options)
        except ConfigurationError:
            raise
        except Exception as exc:  # an engine option that does not fit
            reason = scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else "", url)
            raise ConfigurationError(
                f"database URL {redact_url(url)!r}: {type(exc).__name__}: {reason}; "
                "check the engine options"
            ) from None
        store = cls(engine, owns_engine=True)
        store._cipher = cipher
        return store

    async def aclose(self) -> None:
        if self._owns_engine:
            await self.engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- schema -------------------------------------------------------------------------

    async def check_schema(self) -> None:
        """Raise ``SchemaNotMigrated`` unless the database is at outbox's head revision,
        ``AccessDenied`` if this role may not read outbox's tables, or ``DatabaseUnavailable``
        if it cannot be reached."""
        version = await self.schema_revision()
        if version is None:
            raise SchemaNotMigrated("the database has no outbox tables; run `outbox migrate`")
        if version < HEAD_REVISION:
            raise SchemaNotMigrated(
                f"the outbox schema is at revision {version!r}, this version needs "
                f"{HEAD_REVISION!r}; run `outbox migrate`"
            )
        if version != HEAD_REVISION:
            raise SchemaNotMigrated(
                f"the outbox schema is at revision {version!r}, newer than this version of "
                f"outbox knows (it needs {HEAD_REVISION!r}); upgrade outbox where this runs"
            )

    async def schema_revision(self) -> str | None:
        """The database's outbox revision, ``None`` if it has no outbox tables; raises
        ``AccessDenied`` or ``DatabaseUnavailable``."""
        try:
            async with self.engine.connect() as conn:
                version = await conn.scalar(sa.text(f"SELECT version_num FROM {VERSION_TABLE}"))
        except ProgrammingError as exc:
            if getattr(exc.orig, "sqlstate", None) == _INSUFFICIENT_PRIVILEGE:
                role = self.engine.url.username or "this role"
                raise AccessDenied(
                    f"role {role} may not read outbox's tables; as their owner, run `outbox "
                    f"grant --job triggerer|committer|reader --role {role}` for its job"
                ) from None
            return None
        except Exception as exc:  # cannot connect: refused, authentication, a bad option ...
            raise DatabaseUnavailable(describe_connection_error(self.engine, exc)) from None
        return None if version is None else str(version)

    def autocommit(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A connection whose statements each commit on their own: no BEGIN and COMMIT round
        trips, for work that is one statement (or atomic statement by statement)."""
        return self._autocommit.connect()

    @contextlib.asynccontextmanager
    async def _listen(
        self, channels: Sequence[str], callback: Callable[[str, str], None]
    ) -> AsyncIterator[asyncio.Event]:
        lost = asyncio.Event()
        async with self.engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None

            def on_notify(_connection: object, _pid: object, channel: str, payload: str) -> None:
                callback(channel, payload)

            def on_terminated(*_: object) -> None:
                # The server went away (restart, failover, a killed backend): notifications
                # stop. Wake the caller so that it polls and listens again.
                lost.set()
                callback("", "")

            raw.add_termination_listener(on_terminated)
            for channel in channels:
                await raw.add_listener(channel, on_notify)
            try:
                yield lost
            finally:
                if lost.is_set() or raw.is_closed():
                    # Nothing to roll back on a dead connection: drop it from the pool.
                    with contextlib.suppress(Exception):
                        await conn.invalidate()
                else:
                    with contextlib.suppress(Exception):
                        for channel in channels:
                            await raw.remove_listener(channel, on_notify)
                    raw.remove_termination_listener(on_terminated)

    def listen_triggerer(
        self, callback: Callable[[str, str], None]
    ) -> AbstractAsyncContextManager[asyncio.Event]:
        """Call ``callback(channel, ids)`` when a triggerer records events owed to another's
        subscribers (``outbox_recorded``, stream ids), releases a stream's producer
        (``outbox_consumer``, stream ids), moves a delivery to a subscriber's newer registration
        (``outbox_moved``, stream ids), or resolves the next event of a lane
        (``outbox_resolved``, lane ids: another triggerer's subscribers may finish what this one
        advances); the context's value as with ``listen_resolved``."""
        return self._listen(
            (RECORDED_CHANNEL, CONSUMER_CHANNEL, NOTIFY_CHANNEL, MOVED_CHANNEL), callback
        )

    def listen_resolved(
        self, callback: Callable[[], None]
    ) -> AbstractAsyncContextManager[asyncio.Event]:
        """Call ``callback()`` whenever a transaction resolves the next event of some lane,
        while the context is open (``LISTEN`` on a connection of its own). The context's value
        is an event set (and ``callback()`` called) when that connection is lost: listen again.
        """
        return self._listen((NOTIFY_CHANNEL,), lambda _channel, _payload: callback())

    def listen_records(
        self, callback: Callable[[], None]
    ) -> AbstractAsyncContextManager[asyncio.Event]:
        """Call ``callback()`` whenever a transaction stores trigger events (the context's
        value as with ``listen_resolved``)."""
        return self._listen((RECORDS_CHANNEL,), lambda _channel, _payload: callback())

"""A Postgres database for a benchmark: the one named, a fresh one on ``$PGHOST:$PGPORT``, or
a throwaway cluster with durable defaults (fsync and synchronous_commit on), removed afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ("bench_database", "plain_url", "throwaway_cluster")


# Every outbox table, for a benchmark that empties its database between phases (streams and
# lanes are never deleted by outbox, so no table cascades to the others).
OUTBOX_TABLES = (
    "outbox_record, outbox_unacked, outbox_event, outbox_lane, outbox_subscriber, outbox_stream,"
    " outbox_session"
)


def plain_url(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[str]:
    """A fresh Postgres cluster with durable defaults (fsync, synchronous_commit on)."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if not bins:
        raise SystemExit(
            "no Postgres server binaries under /usr/lib/postgresql; pass --database-url"
        )
    pg_bin = bins[-1]
    run_dir = Path(tempfile.mkdtemp(prefix="outbox-bench-"))
    pg_dir = run_dir / "pg"
    pg_dir.mkdir()
    if os.geteuid() == 0:
        shutil.chown(pg_dir, "postgres")
        run_dir.chmod(0o701)
    port = _free_port()
    data = pg_dir / "data"
    subprocess.run(
        _as_postgres(
            [
                str(pg_bin / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ]
        ),
        stdout=subprocess.DEVNULL,
        check=True,
    )
    ctl = [str(pg_bin / "pg_ctl"), "-D", str(data)]
    subprocess.run(
        _as_postgres(
            [
                *ctl,
                "-l",
                str(pg_dir / "log"),
                "-w",
                "-o",
                f"-p {port} -k {pg_dir} -c listen_addresses=127.0.0.1",
                "start",
            ]
        ),
        stdout=subprocess.DEVNULL,
        check=True,
    )
    try:
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        with _fresh_database(url) as db_url:
            yield db_url
    finally:
        subprocess.run(
            _as_postgres([*ctl, "-m", "fast", "-w", "stop"]), stdout=subprocess.DEVNULL, check=False
        )
        shutil.rmtree(run_dir, ignore_errors=True)


@contextlib.contextmanager
def _fresh_database(server_url: str) -> Iterator[str]:
    """A new database on the server at ``server_url``, migrated to head, dropped afterwards."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from outbox.migrate import migrate
    from outbox.store import asyncpg_url

    name = f"outbox_bench_{uuid.uuid4().hex[:8]}"
    base = server_url.rsplit("/", 1)[0]

    async def admin(sql: str) -> None:
        engine = create_async_engine(asyncpg_url(server_url), isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as conn:
                await conn.execute(text(sql))
        finally:
            await engine.dispose()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        asyncio.run(migrate(f"{base}/{name}"))
        yield f"{base}/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def bench_database(url: str | None) -> Iterator[str]:
    if url:
        yield url
    elif os.environ.get("PGPORT"):
        host = os.environ.get("PGHOST", "127.0.0.1")
        user = os.environ.get("PGUSER", "postgres")
        with _fresh_database(f"postgresql://{user}@{host}:{os.environ['PGPORT']}/postgres") as db:
            yield db
    else:
        with throwaway_cluster() as db:
            yield db

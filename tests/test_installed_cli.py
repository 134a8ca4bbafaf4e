"""The ``outbox`` command as a new user gets it: the wheel built from this checkout, installed
with the README's install line into a fresh venv (one per session), driven through the README's
steps and every bad input of issue 20 (each one line on stderr, exit code 2 for usage, 1 for
run time).

Nothing of the checkout is importable there: the commands run from a scratch directory with no
PYTHONPATH. The venv installs its dependencies from the package index (pip's cache keeps it
quick: about 20 s for the wheel, the venv and the install).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from sqlalchemy.engine import make_url

from outbox.store import HEAD_REVISION

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION = "shared-stream-outbox"
INSTALL_LINE = f"pip install '{DISTRIBUTION}[demo]'"
# A password with every character a URL reserves: percent-encoded in URLs that work, raw in one
# that must be refused in one line.
AWKWARD_PASSWORD = "p@ss:w/o%rd#?"
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
    "process_cpu_seconds",
    "process_resident_memory_bytes",
)


@dataclass(frozen=True)
class Installed:
    """A fresh venv with the wheel installed, and a scratch directory to run in."""

    bin: Path
    scratch: Path

    def env(self, **settings: str) -> dict[str, str]:
        """A user's environment: none of this process's settings, nor its PYTHONPATH."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("OUTBOX_", "PG", "AIRFLOW", "PYTHON", "VIRTUAL_ENV"))
        }
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        return {**env, **settings}

    def run(self, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            cwd=self.scratch,
            env=self.env(**settings),
            capture_output=True,
            text=True,
            timeout=120,
        )

    def outbox(self, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
        return self.run("outbox", *args, **settings)


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The README's install line, from the wheel of this checkout, in a fresh venv."""
    base = tmp_path_factory.mktemp("installed")
    wheels = base / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("*.whl")
    python = shutil.which("python3") or sys.executable
    venv = base / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300)
    done = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", f"{wheel}[demo]"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    scratch = base / "scratch"
    scratch.mkdir()
    return Installed(venv / "bin", scratch)


def one_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert len(lines) == 1, result.stderr
    return lines[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def libpq_env(url: str) -> dict[str, str]:
    parsed = make_url(url)
    return {
        "PGHOST": str(parsed.host),
        "PGPORT": str(parsed.port),
        "PGUSER": str(parsed.username),
        "PGDATABASE": str(parsed.database),
    }


@pytest.fixture
def login_role(empty_database_url: str) -> Iterator[tuple[str, str]]:
    """A login role with an awkward password, and its URL (the password percent-encoded)."""
    name = f"committer_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(AWKWARD_PASSWORD)
            )
        )
    url = make_url(empty_database_url).set(username=name, password=AWKWARD_PASSWORD)
    try:
        yield name, url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(empty_database_url, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {name}")
            conn.execute(f"DROP ROLE {name}")


def scrape(address: str) -> dict[str, Any]:
    with urllib.request.urlopen(address, timeout=5) as response:
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_the_readme_steps_from_an_installed_wheel(
    installed: Installed, empty_database_url: str, login_role: tuple[str, str]
) -> None:
    readme = (ROOT / "README.md").read_text()
    assert INSTALL_LINE in readme and "pip install 'outbox[" not in readme
    version = installed.outbox("--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"outbox 0.1.0 ({DISTRIBUTION}, schema {HEAD_REVISION})"
    for command in ("migrate", "committer", "status", "health", "prune", "check-migrations"):
        helped = installed.outbox(command, "--help")
        assert helped.returncode == 0 and "env OUTBOX_" in helped.stdout, command

    owner = libpq_env(empty_database_url)  # the owner's URL from libpq's variables
    sql = installed.outbox("migrate", "--sql")  # for a DBA: no database
    assert sql.returncode == 0 and "CREATE TABLE outbox_stream" in sql.stdout
    behind = installed.outbox("check-migrations", **owner)
    assert "behind" in one_line(behind, 1)
    migrated = installed.outbox("migrate", **owner)
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.splitlines()[0] == (
        "applied 0001: outbox tables: streams, lanes, events, deliveries, records"
    )
    assert f"outbox schema at {HEAD_REVISION} (head)" in migrated.stdout
    examples = installed.run(
        "python", "-m", "outbox.examples.run", OUTBOX_DATABASE_URL=empty_database_url
    )
    assert examples.returncode == 0, examples.stderr
    assert "sqs-like: 30 messages deleted" in examples.stdout

    role, role_url = login_role
    granted = installed.outbox("grant", "--job", "committer", "--role", role, **owner)
    assert granted.returncode == 0, granted.stderr
    assert granted.stdout.startswith(f"granted outbox's committer privileges to {role}")
    url_file = installed.scratch / "committer-url"
    url_file.write_text(role_url + "\n")
    as_role = {"OUTBOX_DATABASE_URL_FILE": str(url_file)}  # a mounted secret
    healthy = installed.outbox("health", **as_role)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr

    committer = subprocess.Popen(
        [str(installed.bin / "outbox"), "committer", "--metrics-port", "0", "--log-format", "json"],
        cwd=installed.scratch,
        env=installed.env(**as_role),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert committer.stderr is not None
        first = json.loads(committer.stderr.readline())
        assert first["message"] == "committer started", first
        assert first["allowed_modules"] == [] and AWKWARD_PASSWORD not in json.dumps(first)
        address = first["metrics"]
        assert address.startswith("http://127.0.0.1:") and not address.endswith(":0/metrics")
        families = scrape(address)
        for name in DOCUMENTED_METRICS:
            assert name in families, name
        outcomes = {
            s.labels["outcome"]: s.value
            for s in families["outbox_resolutions"].samples
            if s.name == "outbox_resolutions_total"
        }
        assert outcomes == {"acked": 0.0, "failed": 0.0, "rejected": 0.0}
        lanes = {
            (s.labels["stream"], s.labels["lane"]) for s in families["outbox_lane_lag"].samples
        }
        assert ("kafka/orders", "orders/0") in lanes, lanes  # readable, not JSON
        checked = installed.outbox(
            "health",
            "--committer",
            address.removesuffix("/metrics"),
            "--max-pass-age",
            "30",
            **as_role,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert checked.stdout.splitlines()[-1].startswith("ok    committer  ")
    finally:
        committer.send_signal(signal.SIGTERM)
        out, err = committer.communicate(timeout=30)
    assert committer.returncode == 0 and out == ""
    records = [json.loads(line) for line in err.splitlines()]  # JSON, line by line
    assert records[-1]["message"] == "committer stopped"

    with open(installed.scratch / "status.txt", "w") as piped:
        status = subprocess.run(
            [str(installed.bin / "outbox"), "status"],
            cwd=installed.scratch,
            env=installed.env(**as_role),
            stdout=piped,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    assert status.returncode == 0, status.stderr
    table = (installed.scratch / "status.txt").read_text()
    assert "kafka/orders" in table and "\x1b[" not in table
    assert max(len(line) for line in table.splitlines()) <= 100
    as_json = json.loads(installed.outbox("status", "--json", **as_role).stdout)
    assert ["kafka", "orders"] in [lane["stream"] for lane in as_json["lanes"]]

    dry = installed.outbox("prune", "--retention", "1d", "--dry-run", **as_role)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip() == (
        "would prune 0 events and 0 dispatched records older than 1d (dry run: nothing deleted)"
    )
    dead_url = f"postgresql://app:s3cr3t@127.0.0.1:{closed_port()}/app"
    dead = installed.outbox("health", "--database-url", dead_url)
    assert dead.returncode == 1 and dead.stdout.startswith("FAIL  database")
    assert "postgresql://app:***@127.0.0.1" in dead.stdout and "s3cr3t" not in dead.stdout

    demo = installed.outbox("demo", "--messages", "300")
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "VERDICT: PASS" in demo.stdout


BAD_INPUT: list[tuple[list[str], dict[str, str], int, str]] = [
    # (arguments, variables, exit code, said); {url} is a migrated database's URL.
    (
        ["status", "--database-url", f"postgresql://app:{AWKWARD_PASSWORD}@127.0.0.1:5432/app"],
        {},
        2,
        "percent-encoding reserved characters in the password",
    ),
    (["committer", "--metrics-port", "70000"], {}, 2, "--metrics-port '70000' is not a port"),
    (["prune", "--retention=nan"], {}, 2, "--retention 'nan' is not a duration"),
    (["prune", "--retention", "0"], {}, 2, "--retention '0' is not above zero"),
    (["prune", "--retention=-5d"], {}, 2, "--retention '-5d' is not a duration"),
    (["prune", "--retention", "30s"], {}, 2, "is under 1m"),
    (["committer", "--poll-interval", "0"], {}, 2, "--poll-interval '0' is out of range"),
    (["committer", "--poll-interval=-1"], {}, 2, "--poll-interval '-1' is out of range"),
    (["committer"], {"OUTBOX_POLL_INTERVAL": "x"}, 2, "OUTBOX_POLL_INTERVAL='x' is not a number"),
    (["committer", "-v", "--bogus"], {}, 2, "unrecognized arguments: --bogus"),
    (["migrate", "--revision", "nonsense"], {}, 2, "no outbox revision 'nonsense'"),
    (["migrate", "--revision", "0005"], {}, 1, "only upgrades unless given --downgrade"),
    (["status"], {"OUTBOX_DATABASE_URL_CMD": "false"}, 2, "OUTBOX_DATABASE_URL_CMD: 'false'"),
    (["status", "--database-url", "mysql://root@localhost/db"], {}, 2, "is not PostgreSQL"),
    (
        ["status", "--database-url", "postgresql://u:pw@127.0.0.1:{closed}/x"],
        {},
        1,
        "cannot connect to postgresql://u:***@127.0.0.1",
    ),
]


def test_every_bad_input_is_one_line_with_its_exit_code(
    installed: Installed, database_url: str
) -> None:
    for args, settings, code, said in BAD_INPUT:
        argv = [a.replace("{closed}", str(closed_port())) for a in args]
        if "--database-url" not in argv:
            settings = {"OUTBOX_DATABASE_URL": database_url, **settings}
            if "OUTBOX_DATABASE_URL_CMD" in settings:
                del settings["OUTBOX_DATABASE_URL"]
        result = installed.outbox(*argv, **settings)
        line = one_line(result, code)
        assert said in line, (argv, line)
        assert "Traceback" not in result.stderr and "+asyncpg" not in line
        assert AWKWARD_PASSWORD not in line and "pw@" not in line
    nothing = installed.outbox("status")
    assert "no database URL" in one_line(nothing, 2)
    no_grants = f"nogrant_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {no_grants} LOGIN PASSWORD 'pw'")
    try:
        url = make_url(database_url).set(username=no_grants, password="pw")
        refused = installed.outbox(
            "status", "--database-url", url.render_as_string(hide_password=False)
        )
        line = one_line(refused, 1)
        assert "outbox grant" in line and "outbox migrate" not in line
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f"DROP ROLE {no_grants}")

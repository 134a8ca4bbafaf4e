"""Airflow's real ``airflow triggerer`` in the test suite (issue 16).

One test session shares an :class:`AirflowSite`: this checkout built as a wheel and installed
(``pip install --no-deps --target``) into a directory put first on the triggerer's
``PYTHONPATH``, so its ``airflow.policy`` entry point is registered exactly as
``pip install 'shared-stream-outbox[airflow]'`` registers it (Airflow and the other dependencies
come from the test venv); and a metadata database migrated once (``airflow db migrate``) as a
template on the test Postgres. Each test gets a :class:`Triggerer`: a fresh ``AIRFLOW_HOME``,
a metadata database cloned from the template, a DAG file (``tests/airflow_dags/kafka_watchers.py``)
with N assets whose ``AssetWatcher``\\ s run the Kafka provider's ``KafkaSharedStreamTrigger``
on one topic (one shared stream, N subscribers), a Kafka connection with manual commits and a 6 s
session timeout, and ``airflow triggerer --skip-serve-logs`` run in its own process group, so
that a SIGKILL hits the supervisor and its forked runner at once.

``manager`` picks the class the runner constructs: ``"airflow"`` (Airflow's own; no ``[outbox]``
section, nothing is patched), ``"outbox"`` (outbox's Airflow manager, switched on by
``[outbox] database_url``) or ``"recording"`` (``tests.airflow_standin``: Airflow's manager
recording each call). Anything else goes in ``env`` (``AIRFLOW__SECTION__KEY``).

Waits poll a condition with a deadline; a failed wait says what it waited for and shows the tail
of the triggerer's log.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import psycopg

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

ROOT = Path(__file__).resolve().parent.parent
DAG_FILE = Path(__file__).with_name("airflow_dags") / "kafka_watchers.py"
KAFKA_CONN_ID = "outbox_kafka"
# What ``manager`` selects: the ``[outbox] manager_class`` to set (None: no [outbox] section).
MANAGERS: dict[str, str | None] = {
    "airflow": None,
    "outbox": "outbox.airflow.SharedStreamManager",
    "recording": "tests.airflow_standin.RecordingSharedStreamManager",
}
# The line outbox/airflow_plugin.py logs in the supervisor when it rebinds the manager.
REBOUND = "outbox: the triggerer constructs {} as its shared-stream manager"
OVERFLOW = "exceeded maxsize"


def setting(section: str, key: str) -> str:
    """The environment variable Airflow reads for ``[section] key``."""
    return f"AIRFLOW__{section.upper()}__{key.upper()}"


def queue_size(size: int) -> dict[str, str]:
    """``env`` for a subscriber queue of ``size`` (``[triggerer]
    shared_stream_subscriber_queue_size``, 1,024 by default): a backlog bigger than it makes
    Airflow alone overflow and loop."""
    return {setting("triggerer", "shared_stream_subscriber_queue_size"): str(size)}


@dataclass(frozen=True)
class PgServer:
    host: str
    port: int
    user: str
    password: str | None = None

    def url(self, dbname: str, scheme: str = "postgresql") -> str:
        auth = f"{self.user}:{self.password}" if self.password else self.user
        return f"{scheme}://{auth}@{self.host}:{self.port}/{dbname}"

    def execute(self, sql: str) -> None:
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql)


@dataclass(frozen=True)
class AirflowSite:
    """What every triggerer of a test session shares (see the module docstring)."""

    pg: PgServer
    bootstrap: str
    template_db: str
    pythonpath: tuple[str, ...]
    fernet_key: str
    workdir: Path
    seconds: Mapping[str, float]  # "wheel" (build + install), "migrate"


def _run(cmd: Sequence[str], *, env: Mapping[str, str] | None = None, what: str) -> float:
    started = time.monotonic()
    done = subprocess.run(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}):\n{done.stdout[-6000:]}")
    return time.monotonic() - started


def install_checkout(dest: Path) -> tuple[Path, float]:
    """Build this checkout's wheel and install it, without dependencies, into ``dest/site``:
    a directory that, first on ``PYTHONPATH``, makes ``outbox`` and its entry points (the
    ``airflow.policy`` one included) those of the wheel. Returns it and the seconds it took."""
    dist, site = dest / "dist", dest / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    seconds = _run([*pip, "wheel", "--no-deps", "-w", str(dist), str(ROOT)], what="pip wheel")
    (wheel,) = dist.glob("*.whl")
    seconds += _run(
        [*pip, "install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)],
        what="pip install --target",
    )
    return site, seconds


def start_site(pg: PgServer, bootstrap: str, workdir: Path) -> AirflowSite:
    """Install the checkout and migrate a template metadata database (once per session)."""
    site_dir, wheel_seconds = install_checkout(workdir / "outbox-wheel")
    template = f"airflow_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    pg.execute(f'CREATE DATABASE "{template}"')
    site = AirflowSite(
        pg=pg,
        bootstrap=bootstrap,
        template_db=template,
        pythonpath=(str(site_dir), str(ROOT)),
        fernet_key=base64.urlsafe_b64encode(os.urandom(32)).decode(),
        workdir=workdir,
        seconds={},
    )
    home = workdir / "template-home"
    home.mkdir()
    try:
        migrate = _run(
            [sys.executable, "-m", "airflow", "db", "migrate"],
            env=airflow_env(site, home, template),
            what="airflow db migrate",
        )
    except BaseException:
        stop_site(site)
        raise
    return dataclasses.replace(site, seconds={"wheel": wheel_seconds, "migrate": migrate})


def stop_site(site: AirflowSite) -> None:
    site.pg.execute(f'DROP DATABASE IF EXISTS "{site.template_db}" WITH (FORCE)')


def airflow_env(
    site: AirflowSite, home: Path, dbname: str, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of every Airflow command of a test: nothing Airflow-ish inherited."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIRFLOW", "_AIRFLOW")) and k != "PYTHONPATH"
    }
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(site.pythonpath),
            "AIRFLOW_HOME": str(home),
            setting("core", "load_examples"): "False",
            setting("core", "dags_folder"): str(home / "dags"),
            setting("core", "dags_are_paused_at_creation"): "False",
            setting("core", "fernet_key"): site.fernet_key,
            setting("database", "sql_alchemy_conn"): site.pg.url(dbname, "postgresql+psycopg2"),
        }
    )
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class Tally:
    """Asset events of one asset against the messages produced."""

    events: int
    distinct: int  # messages with at least one asset event
    produced: int

    @property
    def missing(self) -> int:
        return self.produced - self.distinct

    @property
    def duplicates(self) -> int:
        return self.events - self.distinct


class Triggerer:
    """One test's Airflow (home, metadata database, DAGs, topic) and its ``airflow triggerer``.

    Call :meth:`setup` once, then :meth:`start`, :meth:`kill`, :meth:`restart`, :meth:`stop`;
    :meth:`close` (the fixture calls it) kills what runs and drops the database."""

    def __init__(
        self,
        site: AirflowSite,
        workdir: Path,
        *,
        manager: str = "airflow",
        assets: int = 2,
        partitions: int = 2,
        env: Mapping[str, str] | None = None,
        outbox_database_url: str | None = None,
    ) -> None:
        if manager not in MANAGERS:
            raise ValueError(f"manager must be one of {sorted(MANAGERS)}, not {manager!r}")
        tag = uuid.uuid4().hex[:10]
        self.site = site
        self.manager = manager
        self.manager_class = MANAGERS[manager]
        self.assets = assets
        self.partitions = partitions
        self.topic = f"airflow-{tag}"
        self.group = f"airflow-{tag}"
        self.dbname = f"airflow_{tag}"
        self.home = workdir / f"airflow-{tag}"
        self.calls_path = self.home / "manager-calls.jsonl"
        extra = {
            f"AIRFLOW_CONN_{KAFKA_CONN_ID.upper()}": json.dumps(
                {
                    "conn_type": "kafka",
                    "extra": {
                        "bootstrap.servers": site.bootstrap,
                        "group.id": self.group,
                        "enable.auto.commit": "false",
                        "auto.offset.reset": "earliest",
                        "session.timeout.ms": "6000",
                    },
                }
            )
        }
        if self.manager_class is not None:
            if outbox_database_url is None:
                raise ValueError(f"manager={manager!r} needs outbox_database_url")
            extra[setting("outbox", "database_url")] = outbox_database_url
            extra[setting("outbox", "manager_class")] = self.manager_class
        if manager == "recording":
            extra[setting("outbox", "standin_log")] = str(self.calls_path)
        extra.update(env or {})
        self.env = airflow_env(site, self.home, self.dbname, extra)
        self.db_url = site.pg.url(self.dbname)
        self.outbox_url = outbox_database_url
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        self.produced: list[str] = []
        self.end_offsets: dict[int, int] = dict.fromkeys(range(partitions), 0)
        self.seconds: dict[str, float] = {}
        self._db_created = False

    # --- set-up --------------------------------------------------------------------------
    def setup(self) -> None:
        """Metadata database (a clone of the migrated template), topic, DAG file, triggers."""
        self.home.mkdir(parents=True)
        (self.home / "dags").mkdir()
        started = time.monotonic()
        self.site.pg.execute(f'CREATE DATABASE "{self.dbname}" TEMPLATE "{self.site.template_db}"')
        self._db_created = True
        self.seconds["clone_db"] = time.monotonic() - started
        self._create_topic()
        shutil.copy(DAG_FILE, self.home / "dags" / DAG_FILE.name)
        (self.home / "dags" / DAG_FILE.with_suffix(".json").name).write_text(
            json.dumps(
                {
                    "assets": self.assets,
                    "topic": self.topic,
                    "kafka_config_id": KAFKA_CONN_ID,
                    "poll_timeout": 1.0,
                }
            )
        )
        # DAGs are unpaused at creation (env), so one reserialize registers every watcher's
        # trigger (tables trigger and asset_watcher).
        self.seconds["reserialize"] = _run(
            [sys.executable, "-m", "airflow", "dags", "reserialize"],
            env=self.env,
            what="airflow dags reserialize",
        )
        triggers = self._scalar("SELECT count(DISTINCT trigger_id) FROM asset_watcher")
        if triggers != self.assets:
            raise AssertionError(f"{triggers} watcher triggers registered, expected {self.assets}")

    def _create_topic(self) -> None:
        from confluent_kafka.admin import AdminClient
        from confluent_kafka.cimpl import NewTopic

        admin = AdminClient({"bootstrap.servers": self.site.bootstrap})
        futures = admin.create_topics(
            [NewTopic(self.topic, num_partitions=self.partitions, replication_factor=1)]
        )
        for future in futures.values():
            future.result(30)

    # --- the triggerer process -----------------------------------------------------------
    def start(self) -> None:
        """Start ``airflow triggerer`` (supervisor + forked runner) in its own session."""
        if self.running():
            raise RuntimeError("the triggerer is already running")
        log = self.home / f"triggerer-{len(self.logs) + 1}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "airflow", "triggerer", "--skip-serve-logs"],
                env=self.env,
                cwd=self.home,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def processes(self) -> list[psutil.Process]:
        """The supervisor and its runner (and anything else in the process group)."""
        if self.proc is None:
            return []
        found = []
        for p in psutil.process_iter(["pid", "status"]):
            try:
                if os.getpgid(p.pid) == self.proc.pid and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except (ProcessLookupError, psutil.Error):
                continue
        return found

    def kill(self) -> None:
        """SIGKILL the supervisor and the runner together and wait until both are gone."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.wait_for("the killed triggerer's processes to be gone", lambda: not self.processes())

    def stop(self, within: float = 60.0) -> float:
        """SIGTERM (graceful shutdown) and wait; SIGKILL if it takes longer than ``within``.
        Returns the seconds it took."""
        if self.proc is None or not self.running():
            return 0.0
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(within)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"triggerer ignored SIGTERM for {within}s\n{self.log_tail()}"
            ) from None
        self.wait_for("the stopped triggerer's processes to be gone", lambda: not self.processes())
        return time.monotonic() - started

    def restart(self) -> None:
        if self.running():
            self.stop()
        self.start()

    def close(self) -> None:
        if self.proc is not None:
            self.kill()
        if self._db_created:
            self.site.pg.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
            self._db_created = False

    # --- Kafka ---------------------------------------------------------------------------
    def produce(self, count: int) -> list[str]:
        """Produce ``count`` messages ``{"n": k}`` (k numbering every message of the test),
        round-robin over the partitions. Returns their values."""
        from confluent_kafka import Producer

        producer = Producer(
            {
                "bootstrap.servers": self.site.bootstrap,
                "acks": "all",
                "linger.ms": 5,
                "log_level": 4,  # not librdkafka's notices on close
            }
        )
        values = []
        for _ in range(count):
            n = len(self.produced)
            value = json.dumps({"n": n})
            partition = n % self.partitions
            producer.produce(self.topic, value=value.encode(), partition=partition)
            self.produced.append(value)
            self.end_offsets[partition] += 1
            values.append(value)
        unflushed = producer.flush(30)
        if unflushed:
            raise RuntimeError(f"{unflushed} messages not delivered to {self.topic}")
        return values

    def committed(self) -> dict[int, int | None]:
        """The group's committed offset per partition (a consumer's ``committed()``: tansu's
        admin OffsetFetch is broken); None where nothing was committed."""
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer(
            {
                "bootstrap.servers": self.site.bootstrap,
                "group.id": self.group,
                "enable.auto.commit": False,
                "log_level": 4,
            }
        )
        try:
            parts = consumer.committed(
                [TopicPartition(self.topic, p) for p in range(self.partitions)], timeout=30
            )
        finally:
            consumer.close()
        return {tp.partition: (tp.offset if tp.offset >= 0 else None) for tp in parts}

    def committed_to_end(self) -> bool:
        committed = self.committed()
        return all(committed[p] == end for p, end in self.end_offsets.items())

    # --- the metadata database -----------------------------------------------------------
    def _scalar(self, sql: str) -> int:
        with psycopg.connect(self.db_url) as conn:
            row = conn.execute(sql).fetchone()
        assert row is not None
        return int(row[0])

    def total_asset_events(self) -> int:
        return self._scalar("SELECT count(*) FROM asset_event")

    def asset_events(self) -> dict[str, int]:
        """Asset events per asset name (every asset, with 0 where none)."""
        with psycopg.connect(self.db_url) as conn:
            rows = conn.execute(
                "SELECT a.name, count(e.id) FROM asset a"
                " LEFT JOIN asset_event e ON e.asset_id = a.id GROUP BY a.name ORDER BY a.name"
            ).fetchall()
        return {name: int(n) for name, n in rows}

    def finished_in_outbox(self) -> set[tuple[str, str]]:
        """``(asset, message)`` pairs whose subscriber (the asset's watcher trigger) resolved
        the message in outbox, its trigger event confirmed stored by Airflow (a record)."""
        assert self.outbox_url is not None, "only with outbox's manager"
        with psycopg.connect(self.db_url) as conn:
            assets: dict[str, str] = dict(
                conn.execute(
                    "SELECT w.trigger_id::text, a.name FROM asset_watcher w"
                    " JOIN asset a ON a.id = w.asset_id"
                ).fetchall()
            )
        with psycopg.connect(self.outbox_url) as conn:
            rows = conn.execute("SELECT subscriber, payload #>> '{}' FROM outbox_record").fetchall()
        return {(assets[subscriber], payload) for subscriber, payload in rows}

    def asset_event_counts(self) -> Counter[tuple[str, str]]:
        """Asset events per ``(asset, message)``."""
        with psycopg.connect(self.db_url) as conn:
            rows = conn.execute(
                "SELECT a.name, e.extra->>'payload' FROM asset_event e"
                " JOIN asset a ON a.id = e.asset_id"
            ).fetchall()
        return Counter((name, payload) for name, payload in rows)

    def tally(self) -> dict[str, Tally]:
        """Per asset: asset events, distinct produced messages among them, produced."""
        produced = set(self.produced)
        with psycopg.connect(self.db_url) as conn:
            rows = conn.execute(
                "SELECT a.name, e.extra->>'payload' FROM asset a"
                " LEFT JOIN asset_event e ON e.asset_id = a.id"
            ).fetchall()
        events: dict[str, list[str]] = {}
        for name, payload in rows:
            events.setdefault(name, [])
            if payload is not None:
                events[name].append(payload)
        stray = {p for ps in events.values() for p in ps} - produced
        if stray:
            raise AssertionError(f"asset events for messages never produced: {sorted(stray)[:5]}")
        return {
            name: Tally(events=len(ps), distinct=len(set(ps)), produced=len(produced))
            for name, ps in sorted(events.items())
        }

    # --- waiting and looking -------------------------------------------------------------
    def wait_for(
        self,
        what: str,
        probe: Callable[[], object],
        *,
        within: float = 120.0,
        interval: float = 0.1,
        alive: bool = False,
    ) -> float:
        """Poll ``probe`` until it returns something truthy; return the seconds it took.
        ``alive``: fail at once if the triggerer exits meanwhile."""
        started = time.monotonic()
        deadline = started + within
        while not probe():
            if alive and not self.running():
                raise AssertionError(
                    f"the triggerer exited ({self.proc and self.proc.returncode}) while waiting"
                    f" for {what}\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"waited {within}s for {what}\n{self.log_tail()}")
            time.sleep(interval)
        return time.monotonic() - started

    def wait_for_asset_events(self, at_least: int, within: float = 120.0) -> float:
        return self.wait_for(
            f"{at_least} asset events",
            lambda: self.total_asset_events() >= at_least,
            within=within,
            interval=0.02,
            alive=True,
        )

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def log_tail(self, lines: int = 60) -> str:
        if not self.logs:
            return "(the triggerer was never started)"
        text = self.logs[-1].read_text(errors="replace").splitlines()[-lines:]
        return f"--- last {len(text)} lines of {self.logs[-1]}:\n" + "\n".join(text)

    def overflows(self) -> int:
        """How often a subscriber overflowed its queue (Airflow's "fell behind" failure)."""
        return self.log_text().count(OVERFLOW)

    def overflows_per_trigger(self) -> dict[int, int]:
        """Overflow failures per trigger id: 2 or more for one trigger means the stream was
        read again after a failure and overflowed again (Airflow alone's loop)."""
        found: dict[int, int] = {}
        for match in re.finditer(
            r"fell behind for trigger (\d+): subscriber queue exceeded", self.log_text()
        ):
            found[int(match[1])] = found.get(int(match[1]), 0) + 1
        return found

    def check_manager(self) -> None:
        """Fail unless the runner got the manager this triggerer was configured with: the
        plugin's line for an outbox or recording manager, no ``outbox:`` line for Airflow's."""
        text = self.log_text()
        if self.manager_class is None:
            assert "outbox:" not in text, f"outbox touched Airflow alone\n{self.log_tail()}"
            return

        def installed() -> bool:
            text = self.log_text()
            if "outbox: cannot import" in text or "outbox: not switching" in text:
                raise AssertionError(f"the plugin left Airflow's manager\n{self.log_tail()}")
            return REBOUND.format(self.manager_class) in text

        self.wait_for(
            f"the plugin to install {self.manager_class}", installed, within=60, alive=True
        )

    def calls(self) -> list[dict[str, Any]]:
        """The recording manager's calls (``manager="recording"``), oldest first."""
        try:
            with open(self.calls_path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []


@dataclass
class ScenarioResult:
    """What a backlog scenario measured (see :func:`run_backlog_scenario`)."""

    manager: str
    messages: int
    partitions: int
    queue: int | None
    killed_at: list[int] = field(default_factory=list)  # asset events stored at each SIGKILL
    committed_at_kill: list[dict[int, int | None]] = field(default_factory=list)
    tallies: dict[str, Tally] = field(default_factory=dict)
    committed: dict[int, int | None] = field(default_factory=dict)
    end_offsets: dict[int, int] = field(default_factory=dict)
    drained: bool = False
    overflows: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        per_asset = ", ".join(
            f"{name}: {t.events} events, {t.duplicates} duplicates, {t.missing} missing"
            for name, t in self.tallies.items()
        )
        times = ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
        return (
            f"[{self.manager}] {self.messages} messages on {self.partitions} partitions"
            f" (queue {self.queue or 'default'}), SIGKILL at {self.killed_at} asset events"
            f" (committed then: {self.committed_at_kill});"
            f" {per_asset}; committed {self.committed} of {self.end_offsets};"
            f" drained={self.drained}, overflows={self.overflows}; {times}"
        )


def run_backlog_scenario(
    tr: Triggerer,
    *,
    messages: int,
    kill_after: Sequence[int] = (),
    drain_within: float = 180.0,
    require_drain: bool = True,
    on_kill: Callable[[], None] | None = None,
) -> ScenarioResult:
    """Produce a backlog of ``messages`` before the triggerer starts, start it, SIGKILL it
    (supervisor and runner) once the metadata database holds ``kill_after[i]`` asset events (all
    assets together, duplicates included) and restart it at once, for each ``i``; then wait
    until the backlog is drained (committed offsets at the end and every message stored for
    every asset) and stop the triggerer gracefully, so the counts are final.

    A backlog bigger than the queue (issue 16's case): ``airflow_triggerer(manager=...,
    env=queue_size(32))`` and ``messages=300``. Airflow alone loops on it (and may even commit
    past messages a re-subscribing trigger never got): with ``require_drain=False`` the scenario
    kills it after ``drain_within`` seconds without draining and reports ``drained=False``.

    ``seconds``: ``first_event`` (start to first asset event), ``restart_<i>`` (restart to the
    first asset event stored after it), ``drain`` (start to drained), ``stop`` (SIGTERM).
    ``on_kill`` runs right after each SIGKILL, before the restart."""
    queue = tr.env.get(setting("triggerer", "shared_stream_subscriber_queue_size"))
    result = ScenarioResult(
        manager=tr.manager,
        messages=messages,
        partitions=tr.partitions,
        queue=int(queue) if queue else None,
    )
    tr.produce(messages)
    tr.start()
    started = time.monotonic()
    tr.wait_for_asset_events(1)
    result.seconds["first_event"] = time.monotonic() - started
    tr.check_manager()

    def drained() -> bool:
        return tr.committed_to_end() and all(t.missing == 0 for t in tr.tally().values())

    for i, threshold in enumerate(kill_after, 1):
        tr.wait_for_asset_events(threshold)
        tr.kill()
        if on_kill is not None:
            on_kill()
        stored = tr.total_asset_events()
        result.killed_at.append(stored)
        result.committed_at_kill.append(tr.committed())
        tr.start()
        restarted = time.monotonic()
        tr.wait_for(
            f"an asset event after restart {i} (or the backlog drained)",
            _more_than(tr, stored, drained),
            alive=True,
        )
        result.seconds[f"restart_{i}"] = time.monotonic() - restarted
        tr.check_manager()

    try:
        tr.wait_for(
            "the backlog to drain (committed offsets at the end, every message stored)",
            drained,
            within=drain_within,
            interval=0.5,
            alive=True,
        )
        result.drained = True
    except AssertionError:
        if require_drain:
            raise
    result.seconds["drain"] = time.monotonic() - started
    if result.drained:
        result.seconds["stop"] = tr.stop()
    else:
        tr.kill()
    result.tallies = tr.tally()
    result.committed = tr.committed()
    result.end_offsets = dict(tr.end_offsets)
    result.overflows = tr.overflows()
    return result


def _more_than(tr: Triggerer, stored: int, drained: Callable[[], bool]) -> Callable[[], bool]:
    return lambda: tr.total_asset_events() > stored or drained()

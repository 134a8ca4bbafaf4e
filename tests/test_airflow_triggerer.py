"""Airflow's real ``airflow triggerer`` (apache-airflow-core 3.3, the Kafka provider's
``KafkaSharedStreamTrigger`` behind asset watchers on one topic, its metadata database on the
test Postgres), alone and switched by configuration to another manager class (issue 16).

The scenarios take ``manager``: ``"airflow"`` is Airflow's own manager; outbox's joins the
lists below once ``outbox.airflow.SharedStreamManager`` exists.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pytest

from tests.airflow_triggerer import (
    REBOUND,
    airflow_env,
    queue_size,
    run_backlog_scenario,
    setting,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.airflow_triggerer import AirflowSite, Triggerer

MANAGERS = ["airflow", "outbox"]
RECORDING = "tests.airflow_standin.RecordingSharedStreamManager"

PROBE = (
    "import sys, airflow\n"
    "plugin = 'outbox.airflow_plugin' in sys.modules\n"
    "import airflow.jobs.triggerer_job_runner as t\n"
    "c = t.SharedStreamManager\n"
    "print('PROBE', plugin, c.__module__ + '.' + c.__qualname__)\n"
)


def _probe(site: AirflowSite, home: Path, *settings: dict[str, str]) -> list[tuple[str, list[str]]]:
    """For each ``settings``, concurrently: ``import airflow``, then the triggerer's module, in
    a fresh interpreter set up like the triggerer; what it found and the lines outbox logged."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PROBE],
            env=airflow_env(site, home, "unused", extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for extra in settings
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        lines = out.splitlines()
        (found,) = [line.removeprefix("PROBE ") for line in lines if line.startswith("PROBE ")]
        results.append((found, [line for line in lines if "outbox:" in line]))
    return results


def test_policy_entry_point_switches_only_the_triggerers_manager(
    airflow_site: AirflowSite, tmp_path: Path
) -> None:
    """The wheel's ``airflow.policy`` entry point is imported by ``import airflow``; it rebinds
    the triggerer's manager only when ``[outbox] database_url`` is set, and an unimportable
    ``[outbox] manager_class`` costs one logged line, not Airflow."""
    airflow_own = "airflow.triggers.shared_stream.SharedStreamManager"
    url = setting("outbox", "database_url")
    cls = setting("outbox", "manager_class")

    alone, switched, broken = _probe(
        airflow_site,
        tmp_path,
        {},
        {url: "postgresql://u@h/db", cls: RECORDING},
        {url: "postgresql://u@h/db", cls: "no.Such"},
    )
    assert alone == (f"True {airflow_own}", [])

    found, logged = switched
    assert found == f"True {RECORDING}"
    assert len(logged) == 1 and REBOUND.format(RECORDING) in logged[0], logged

    found, logged = broken
    assert found == f"True {airflow_own}"
    assert len(logged) == 1 and "cannot import [outbox] manager_class no.Such" in logged[0], logged


def test_forked_runner_constructs_the_configured_manager(
    airflow_triggerer: Callable[..., Triggerer],
) -> None:
    """``airflow triggerer`` with ``[outbox] manager_class`` set to a recording stand-in: the
    runner (a child of the supervisor) constructs it with the ``[triggerer]`` options, and the
    shared stream runs through it: subscribe per trigger, a seq bound per trigger event, every
    seq confirmed after Airflow stored the event, stop_all at shutdown."""
    queue = setting("triggerer", "shared_stream_subscriber_queue_size")
    tr = airflow_triggerer(manager="recording", assets=2, partitions=2, env={queue: "77"})
    tr.produce(20)
    tr.start()
    tr.check_manager()
    tr.wait_for(
        "20 messages stored for both assets and committed",
        lambda: all(t.distinct == 20 for t in tr.tally().values()) and tr.committed_to_end(),
        alive=True,
    )
    supervisor = tr.proc.pid if tr.proc else None
    stop_seconds = tr.stop()
    tallies = tr.tally()
    assert {name: (t.events, t.duplicates) for name, t in tallies.items()} == {
        "asset_0": (20, 0),
        "asset_1": (20, 0),
    }

    calls = tr.calls()
    (init,) = [c for c in calls if c["call"] == "init"]
    assert init["ppid"] == supervisor and init["pid"] != supervisor, init
    assert init["kwargs"] == {
        "max_subscriber_queue": 77,
        "ack_timeout": 300.0,
        "cohort_grace_period": 0.0,
    }
    assert init["database_url"] == tr.env[setting("outbox", "database_url")]
    assert {c["pid"] for c in calls} == {init["pid"]}

    subscribed = [c["trigger_id"] for c in calls if c["call"] == "subscribe"]
    assert len(subscribed) == 2 and len(set(subscribed)) == 2
    bound = {c["seq"]: c for c in calls if c["call"] == "bind_pending_event"}
    assert len(bound) == 40 and None not in bound
    confirmed = {seq: c for c in calls if c["call"] == "confirm_persisted" for seq in c["seqs"]}
    assert set(confirmed) == set(bound)
    lag = sorted(confirmed[seq]["at"] - bound[seq]["at"] for seq in bound)
    # Airflow's graceful shutdown: stop_all (TriggerRunner.arun's finally) comes before the
    # trigger tasks are cancelled, so each trigger's unsubscribe comes after it.
    ending = [c["call"] for c in calls if c["call"] in ("stop_all", "unsubscribe")]
    assert ending == ["stop_all", "unsubscribe", "unsubscribe"], ending

    tasks: dict[str, set[str]] = {}
    for c in calls:
        tasks.setdefault(c["call"], set()).add(c["task"] or "no task (no event loop yet)")
    print(
        f"recording manager: constructed in the runner (pid {init['pid']}, parent = supervisor"
        f" {supervisor}); tasks per call {tasks};"
        f" bind -> confirm_persisted {lag[0]:.2f}s min, {lag[len(lag) // 2]:.2f}s median,"
        f" {lag[-1]:.2f}s max; SIGTERM stop {stop_seconds:.1f}s"
    )


@pytest.mark.parametrize("manager", ["outbox"])
def test_quiet_topic_every_message_once(
    airflow_triggerer: Callable[..., Triggerer], manager: str
) -> None:
    """200 messages on 2 partitions, produced while the triggerer runs: one asset event per
    message per asset, committed offsets at the end."""
    tr = airflow_triggerer(manager=manager, assets=2, partitions=2)
    tr.start()
    for batch in range(2):
        tr.produce(100)
        tr.wait_for(
            f"batch {batch} stored for every asset",
            lambda: all(t.missing == 0 for t in tr.tally().values()),
            alive=True,
        )
    tr.check_manager()
    tr.wait_for("committed offsets at the end", tr.committed_to_end, alive=True)
    tr.stop()
    tallies = tr.tally()
    assert {name: (t.events, t.distinct) for name, t in tallies.items()} == {
        "asset_0": (200, 200),
        "asset_1": (200, 200),
    }
    assert tr.committed() == {0: 100, 1: 100}


MESSAGES = 200  # on 2 partitions: 400 asset events for the two assets
KILLS = [60, 180, 300]  # SIGKILLs of supervisor and runner, at these many asset events


@pytest.mark.timeout(900)
def test_outbox_drains_a_backlog_bigger_than_its_queue_through_crashes_and_duplicates_less(
    airflow_triggerer: Callable[..., Triggerer],
) -> None:
    """Issue 16: the same messages and SIGKILLs (supervisor and runner) for Airflow alone (its
    default queue, which holds the backlog: it can drain it) and for Airflow on outbox (a
    queue of 32, smaller than the backlog: it pauses instead of overflowing). Both drain:
    every message reaches every asset, committed offsets reach the end. Airflow alone stores
    again every message stored since its last commit; on outbox no message a subscriber had
    finished before a crash (its resolution and trigger event committed in outbox) is stored
    twice, and all its duplicates together are at most a tenth of Airflow alone's."""
    alone = airflow_triggerer(manager="airflow")
    tr = airflow_triggerer(manager="outbox", env=queue_size(32))
    # At each SIGKILL: the (asset, message) pairs finished in outbox (resolved, the trigger event
    # confirmed stored by Airflow: a record), and how many asset events each had then.
    finished: list[dict[tuple[str, str], int]] = []

    def note_finished() -> None:
        counts = tr.asset_event_counts()
        finished.append({pair: counts[pair] for pair in tr.finished_in_outbox()})

    # The two run side by side (their own topics, groups and databases): half the wall time.
    with ThreadPoolExecutor(2) as pool:
        airflow_run = pool.submit(run_backlog_scenario, alone, messages=MESSAGES, kill_after=KILLS)
        outbox_run = pool.submit(
            run_backlog_scenario, tr, messages=MESSAGES, kill_after=KILLS, on_kill=note_finished
        )
        baseline, result = airflow_run.result(), outbox_run.result()
    print(baseline.summary())
    print(result.summary())
    for scenario in (baseline, result):
        assert scenario.drained, scenario.summary()
        assert all(t.missing == 0 for t in scenario.tallies.values()), scenario.summary()
        assert scenario.committed == scenario.end_offsets, scenario.summary()
    assert result.overflows == 0, result.summary()
    counts = tr.asset_event_counts()
    again = sorted(
        pair for at_kill in finished for pair, count in at_kill.items() if counts[pair] > count
    )
    assert not again, f"stored again after a crash though finished before it: {again[:5]}"
    ours = sum(t.duplicates for t in result.tallies.values())
    airflows = sum(t.duplicates for t in baseline.tallies.values())
    print(
        f"duplicates through {len(KILLS)} SIGKILLs, {MESSAGES} messages x 2 assets: Airflow alone"
        f" {airflows}, Airflow on outbox {ours} (pairs finished before each crash:"
        f" {[len(f) for f in finished]}, none stored again after it)"
    )
    assert ours * 10 <= airflows, (ours, airflows)


def test_airflow_alone_loops_on_a_backlog_bigger_than_its_queue(
    airflow_triggerer: Callable[..., Triggerer],
) -> None:
    """300 messages waiting, subscriber queue 32: Airflow's manager overflows, fails the
    triggers, re-reads the stream from the committed offset when they come back and overflows
    again. The test stops once one trigger overflowed twice (the loop); outbox's manager runs
    the same backlog with ``run_backlog_scenario(..., kill_after=...)`` and must drain it."""
    tr = airflow_triggerer(manager="airflow", env=queue_size(32))
    tr.produce(300)
    tr.start()
    seconds = tr.wait_for(
        "a trigger to overflow its queue twice",
        lambda: max(tr.overflows_per_trigger().values(), default=0) >= 2,
        within=180,
        interval=0.5,
        alive=True,
    )
    tr.kill()
    tallies = tr.tally()
    committed = tr.committed()
    print(
        f"[airflow] 300 messages waiting, queue 32: a trigger overflowed twice {seconds:.1f}s"
        f" after start (overflows per trigger {tr.overflows_per_trigger()}); by then "
        + ", ".join(
            f"{n}: {t.events} events, {t.duplicates} duplicates" for n, t in tallies.items()
        )
        + f"; committed {committed} of {tr.end_offsets}"
    )

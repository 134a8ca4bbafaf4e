"""A trigger module that raises ``KeyboardInterrupt`` itself as it loads (no SIGINT)."""

from __future__ import annotations

raise KeyboardInterrupt("raised by the module, not by a signal")

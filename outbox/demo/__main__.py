"""``python -m outbox.demo triggerer ...``: the demo's triggerer process, started by
``outbox demo``."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # Through the imported module, so the trigger class is stored as outbox.demo.DemoTrigger
    # (a path the committer's --allow-module outbox.demo allows), not __main__.DemoTrigger.
    from outbox.demo.trigger import triggerer_main

    sys.exit(triggerer_main())

"""A trigger module that calls ``sys.exit`` as it loads (a script's ``main()`` run on import)."""

from __future__ import annotations

import sys

sys.exit(3)

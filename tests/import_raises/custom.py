"""A trigger module that raises a ``BaseException`` of its own as it loads."""

from __future__ import annotations


class Shutdown(BaseException):
    """Not an ``Exception``: slips past ``except Exception``."""


raise Shutdown("the module shut itself down")

"""The ``outbox`` command: migrate the schema, run the committer, watch and prune, see a demo.

Every flag has an environment-variable twin and a default, both shown in ``--help``; the command
line wins over the environment. A bad value, flag or variable is one line naming it and the fix,
exit code 2; a failure at run time (the database away, a refusal) is one line, exit code 1.
Logging (text or JSON lines, on stderr) is configured once, before anything of the user's is
imported, and kept (``outbox.logs``).

The parts: ``values`` (what flags and variables accept; durations), ``parser`` (argparse with
environment-variable twins), ``arguments`` (every command's flags: ``build_parser``),
``commands`` (what each command does) and ``worker`` (the committer, run until signalled).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from sqlalchemy.exc import DBAPIError

from outbox import logs
from outbox.cli.arguments import build_parser, parse
from outbox.cli.commands import COMMANDS, say
from outbox.cli.values import (
    DISTRIBUTION,
    MIN_POLL_INTERVAL,
    RETENTION_FLOOR,
    parse_duration,
    show_duration,
)
from outbox.dburl import scrub
from outbox.errors import ConfigurationError, OutboxError

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

__all__ = (
    "DISTRIBUTION",
    "MIN_POLL_INTERVAL",
    "RETENTION_FLOOR",
    "build_parser",
    "log",
    "main",
    "parse_duration",
    "show_duration",
)

log = logging.getLogger("outbox.cli")


def _demo(args: argparse.Namespace) -> int:
    try:
        from outbox.demo import run_demo
    except ImportError as exc:
        raise ConfigurationError(
            f"the demo needs {exc.name or 'aiokafka'}: pip install '{DISTRIBUTION}[demo]'"
        ) from None
    return run_demo(
        messages=args.messages,
        partitions=args.partitions,
        kill=args.kill,
        keep=args.keep,
        verbose=args.log_level == "debug",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``outbox`` command; its exit code."""
    args = parse(argv)
    if args.verbose:
        args.log_level = "debug"
    logs.configure(args.log_level, args.log_format)
    try:
        if args.command == "demo":
            return _demo(args)
        code: int = asyncio.run(COMMANDS[args.command](args))
        return code
    except ConfigurationError as exc:
        say(args, str(exc))
        return 2
    except OutboxError as exc:
        say(args, str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    except DBAPIError as exc:
        log.debug("the database refused", exc_info=True)
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""]
        said = scrub(reason[0], getattr(args, "resolved_url", None))
        say(args, f"the database refused: {said}; run with -v for details")
        return 1
    except Exception as exc:
        log.debug("unexpected error", exc_info=True)
        say(args, f"unexpected {logs.one_line(exc)}; run with -v for the traceback")
        return 1

"""The ``outbox`` command's parser: argparse with one-line errors, and options whose
environment-variable twins and defaults are applied after parsing."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from outbox.cli.values import boolean, each, not_boolean

if TYPE_CHECKING:
    from collections.abc import Callable


@dataclass(frozen=True, slots=True)
class _Setting:
    dest: str
    flag: str
    env: str | None
    convert: Callable[[str], Any] | None  # of a variable's text; None: not read from one
    default: Any
    required: bool


class Parser(argparse.ArgumentParser):
    """argparse, with one-line errors and settings read from the environment after parsing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings: list[_Setting] = []
        self.commands: dict[str, Parser] = {}

    def error(self, message: str) -> NoReturn:
        message = re.sub(r"^argument ([^:]+): ", r"\1 ", message)
        if "; " not in message:  # argparse's own messages name no fix
            message += f" (see `{self.prog} --help`)"
        self.exit(2, f"{self.prog}: {message}\n")

    def option(
        self,
        *flags: str,
        env: str | None,
        help: str,
        convert: Callable[[str], Any] | None = None,
        default: Any = None,
        shown_default: str | None = None,
        required: bool = False,
        **kwargs: Any,
    ) -> None:
        """A flag (``convert`` parses its value, and its variable's) with the variable ``env``
        as its twin; ``help`` gets the default and the variable."""
        action = kwargs.get("action")
        if action not in ("store_true", "store_false") and convert is not None:
            kwargs["type"] = _flag_type(convert)
        if shown_default is None:
            shown_default = "off" if default in (None, False) else str(default)
        notes = [f"default: {shown_default}" if not required else "required"]
        if env:
            notes.append(f"env {env}")
        added = self.add_argument(
            *flags, default=argparse.SUPPRESS, help=f"{help} ({'; '.join(notes)})", **kwargs
        )
        from_variable: Callable[[str], Any] | None = convert
        if action == "store_true":
            from_variable = boolean
        elif action == "store_false":
            from_variable = not_boolean
        elif action == "append" and convert is not None:
            from_variable = each(convert)
        self.settings.append(_Setting(added.dest, flags[-1], env, from_variable, default, required))

    def apply_settings(self, args: argparse.Namespace) -> None:
        """Fill what the command line left out from the environment, else the default."""
        for setting in self.settings:
            if hasattr(args, setting.dest):
                continue
            raw = os.environ.get(setting.env) if setting.env else None
            if raw is not None and raw.strip() and setting.convert is not None:
                try:
                    value = setting.convert(raw)
                except ValueError as exc:
                    self.exit(2, f"{self.prog}: {setting.env}={raw!r} {exc}\n")
            elif setting.required:
                twin = f" (or set {setting.env})" if setting.env else ""
                self.error(f"{setting.flag} is required{twin}")
            else:
                value = setting.default
            setattr(args, setting.dest, value)


def _flag_type(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def typed(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} {exc}") from None

    typed.__name__ = getattr(convert, "__name__", "value")
    return typed

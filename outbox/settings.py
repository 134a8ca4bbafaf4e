"""Settings from the environment: secrets given as a value, a file or a command, and the
database URL from outbox's, Airflow's or libpq's variables.

A secret ``NAME`` may be set as ``NAME`` (the value), ``NAME_FILE`` (a file holding it, as
Docker and Kubernetes mount secrets) or ``NAME_CMD`` (a command printing it, as Airflow's
``_cmd`` options), one of the three. Errors name the variable and never show its value.
"""

from __future__ import annotations

import getpass
import importlib.util
import logging
import os
import shlex
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from sqlalchemy.engine import URL, make_url

from outbox.errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = (
    "DATABASE_URL_ENV",
    "Found",
    "database_url",
    "quote_ident",
    "search_path_options",
    "secret",
)

log = logging.getLogger("outbox.settings")

DATABASE_URL_ENV: Final = "OUTBOX_DATABASE_URL"
COMMAND_TIMEOUT: Final = 30.0

# Airflow's options that may name outbox's database, in order: outbox's own section (what the
# triggerer plugin reads), then Airflow's metadata database.
_AIRFLOW_OPTIONS: Final = (("outbox", "database_url"), ("database", "sql_alchemy_conn"))
_LIBPQ: Final = ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE")

NO_URL: Final = (
    "no database URL: pass --database-url, or set OUTBOX_DATABASE_URL (or "
    "OUTBOX_DATABASE_URL_FILE, OUTBOX_DATABASE_URL_CMD), or libpq's PGHOST, PGPORT, PGUSER, "
    "PGPASSWORD, PGDATABASE, or Airflow's [database] sql_alchemy_conn"
)


class Found(NamedTuple):
    """A setting's value and where it came from (a variable's name, never its value)."""

    value: str
    source: str


def secret(name: str) -> Found | None:
    """The value of ``name``, ``name_FILE`` (the file's text) or ``name_CMD`` (what the command
    prints), without a trailing newline; ``None`` when none of them is set (or set empty)."""
    given = [v for v in (name, f"{name}_FILE", f"{name}_CMD") if os.environ.get(v)]
    if len(given) > 1:
        raise ConfigurationError(f"{' and '.join(given)} are all set; set only one of them")
    if not given:
        return None
    (variable,) = given
    setting = os.environ[variable]
    if variable == name:
        return Found(setting, name)
    if variable.endswith("_FILE"):
        return Found(_read_file(variable, setting), variable)
    return Found(_run_command(variable, setting), variable)


def _read_file(variable: str, path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigurationError(
            f"{variable}={path!r} cannot be read ({reason}); point it at a readable file"
        ) from None
    value = text.rstrip("\r\n")
    if not value:
        raise ConfigurationError(f"{variable}={path!r} is an empty file; write the value in it")
    return value


def _run_command(variable: str, command: str) -> str:
    """What ``command`` prints, run without a shell (as Airflow runs its ``_cmd`` options)."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ConfigurationError(
            f"{variable} is not a command line ({exc}); fix its quoting"
        ) from None
    if not argv:
        raise ConfigurationError(f"{variable} is empty; set it to a command that prints the value")
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise ConfigurationError(
            f"{variable}: command {argv[0]!r} not found; give its full path"
        ) from None
    except subprocess.TimeoutExpired:
        raise ConfigurationError(
            f"{variable}: {argv[0]!r} ran for more than {COMMAND_TIMEOUT:g}s; make it print "
            "the value and exit"
        ) from None
    except OSError as exc:
        raise ConfigurationError(f"{variable}: cannot run {argv[0]!r} ({exc.strerror})") from None
    if done.returncode != 0:
        said = next((line for line in done.stderr.splitlines() if line.strip()), "")
        said = f": {said.strip()[:200]}" if said else ""
        raise ConfigurationError(
            f"{variable}: {argv[0]!r} failed with exit code {done.returncode}{said}; fix the "
            "command"
        )
    value = done.stdout.rstrip("\r\n")
    if not value:
        raise ConfigurationError(
            f"{variable}: {argv[0]!r} printed nothing; make it print the value"
        )
    return value


def database_url(given: str | None = None) -> Found:
    """The database URL: ``given`` (the command line's), else ``OUTBOX_DATABASE_URL`` (or its
    ``_FILE`` or ``_CMD``), else Airflow's ``[outbox] database_url`` or ``[database]
    sql_alchemy_conn`` when it is PostgreSQL, else one made of libpq's ``PG*`` variables."""
    if given:
        return Found(given, "--database-url")
    sources: tuple[Callable[[], Found | None], ...] = (_from_outbox, _from_airflow, _from_libpq)
    for source in sources:
        found = source()
        if found is not None:
            log.debug("database URL from %s", found.source)
            return found
    raise ConfigurationError(NO_URL)


def _from_outbox() -> Found | None:
    return secret(DATABASE_URL_ENV)


def _from_airflow() -> Found | None:
    for section, key in _AIRFLOW_OPTIONS:
        name = f"AIRFLOW__{section.upper()}__{key.upper()}"
        found = secret(name)
        if found is not None and _is_postgres(found.value):
            return found
    if not _beside_airflow():
        return None
    # Airflow's configuration file, with everything Airflow layers on it (its secrets backend,
    # its own `_cmd` options). Importing airflow configures its logging: outbox.logs keeps ours.
    try:
        from airflow.configuration import conf
    except Exception as exc:  # Airflow installed but broken: not ours to fix here
        log.debug("cannot read Airflow's configuration: %s", exc)
        return None
    for section, key in _AIRFLOW_OPTIONS:
        try:
            value = conf.get(section, key, fallback=None)
        except Exception as exc:  # a `_cmd` or secrets backend that fails
            log.debug("cannot read Airflow's [%s] %s: %s", section, key, exc)
            continue
        if value and _is_postgres(str(value)):
            return Found(str(value), f"Airflow's [{section}] {key}")
    return None


def _beside_airflow() -> bool:
    """Whether Airflow is installed and configured here (so reading its configuration, which
    imports it, is worth its second or two)."""
    if importlib.util.find_spec("airflow") is None:
        return False
    if os.environ.get("AIRFLOW_CONFIG") or os.environ.get("AIRFLOW_HOME"):
        return True
    return (Path.home() / "airflow" / "airflow.cfg").is_file()


def _is_postgres(url: str) -> bool:
    """Whether ``url`` names a PostgreSQL database (Airflow's may be SQLite or MySQL)."""
    try:
        return make_url(url).get_backend_name() in ("postgresql", "postgres")
    except Exception:
        return url.startswith(("postgresql", "postgres:"))


def _from_libpq() -> Found | None:
    """A URL from libpq's variables, when any is set; what is unset takes libpq's default."""
    if not any(os.environ.get(name) for name in _LIBPQ):
        return None
    host = os.environ.get("PGHOST") or None
    port_text = os.environ.get("PGPORT") or None
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigurationError(f"PGPORT={port_text!r} is not a port number; fix or unset it")
        port = int(port_text)
    user = os.environ.get("PGUSER") or getpass.getuser()
    query = {}
    if host is not None and host.startswith("/"):  # a Unix socket directory
        query["host"] = host
        host = None
    url = URL.create(
        "postgresql",
        username=user,
        password=os.environ.get("PGPASSWORD") or None,
        host=host,
        port=port,
        database=os.environ.get("PGDATABASE") or user,
        query=query,
    )
    source = ", ".join(name for name in _LIBPQ if os.environ.get(name))
    return Found(url.render_as_string(hide_password=False), source)


def quote_ident(name: str) -> str:
    """``name`` as a quoted SQL identifier (a role or schema)."""
    if not name or "\x00" in name or len(name.encode()) > 63:
        raise ConfigurationError(
            f"{name!r} is not a valid role or schema name; name an existing one"
        )
    return '"' + name.replace('"', '""') + '"'


def search_path_options(schema: str | None) -> dict[str, Any]:
    """Engine options under which every connection finds outbox's tables in ``schema`` (none
    when ``schema`` is ``None``: the role's search path, normally ``public``)."""
    if schema is None:
        return {}
    return {"connect_args": {"server_settings": {"search_path": quote_ident(schema)}}}

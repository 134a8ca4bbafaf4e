"""Database URLs: parsed for asyncpg, and shown without their passwords, however malformed.

A password may come in the URL's user info (raw or percent-encoded) or as a ``?password=`` query
parameter (libpq's form). Whatever shows a URL or an error about it goes through ``redact_url``
(a string as given), ``shown_url`` (a parsed one) or ``scrub`` (text that might quote one), so
that no form of URL, valid or not, puts its password in a log line or an error message.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final
from urllib.parse import quote, quote_plus

from sqlalchemy.engine import URL, make_url

from outbox.errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ("asyncpg_url", "describe_connection_error", "redact_url", "scrub", "shown_url")

EXPECTED_FORM: Final = "use postgresql://user:password@host:port/dbname"

# Query parameters that hold secrets (password, sslpassword, a token ...): a value is hidden up
# to the end of the URL, since an unencoded ``&`` or ``#`` in it would otherwise end it early.
_SECRET_QUERY = re.compile(
    r"((?:^|[?&;])[^=&;?#]*(?:pass|secret|token|key)[^=&;?#]*=).*$", re.IGNORECASE | re.DOTALL
)

# What SQLAlchemy's asyncpg dialect and ``asyncpg.connect`` take from a URL's query.
_CONNECT_OPTIONS: Final = frozenset(
    {
        "host",
        "port",
        "user",
        "password",
        "passfile",
        "service",
        "servicefile",
        "database",
        "timeout",
        "statement_cache_size",
        "max_cached_statement_lifetime",
        "max_cacheable_statement_size",
        "command_timeout",
        "ssl",
        "direct_tls",
        "server_settings",
        "target_session_attrs",
        "krbsrvname",
        "gsslib",
        "prepared_statement_cache_size",
        "async_fallback",
    }
)


def asyncpg_url(url: str) -> str:
    """The SQLAlchemy URL for asyncpg, from ``postgresql://`` or ``postgres://`` forms. A
    ``?password=`` becomes the URL's password (hidden wherever SQLAlchemy shows the URL).
    Raises a one-line ``ConfigurationError`` that never shows the password."""
    parsed = _parse(url)
    return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def _parse(url: str) -> URL:
    if not isinstance(url, str) or not url.strip():
        raise ConfigurationError(f"the database URL is empty; {EXPECTED_FORM}")
    try:
        parsed = make_url(url)
    except Exception:  # ArgumentError, or ValueError for a port that is not a number
        raise ConfigurationError(
            f"database URL {redact_url(url)!r} is not a URL (a port that is not a number, or "
            f"characters out of place); {EXPECTED_FORM}, percent-encoding reserved characters "
            "in the password"
        ) from None
    if parsed.get_backend_name() not in ("postgresql", "postgres"):
        raise ConfigurationError(
            f"database URL {redact_url(url)!r} is not PostgreSQL; {EXPECTED_FORM}"
        )
    if _ambiguous(url, parsed):
        raise ConfigurationError(
            f"database URL {redact_url(url)!r} has an '@' in its password, user name or "
            "parameters; percent-encode it as %40"
        )
    query = dict(parsed.query)
    unknown = sorted(set(query) - _CONNECT_OPTIONS)
    if unknown:
        raise ConfigurationError(
            f"database URL {redact_url(url)!r} has query parameters that are not connection "
            "settings; keep only host, port, user, password, database, ssl, timeout and the "
            "other asyncpg.connect arguments"
        )
    password = query.pop("password", None)
    if isinstance(password, tuple):
        raise ConfigurationError(
            f"database URL {redact_url(url)!r} gives the password more than once; give it once"
        )
    if password is not None:
        parsed = parsed.set(password=password, query=query)
    return parsed


def _ambiguous(text: str, parsed: URL) -> bool:
    """Whether the URL has a raw ``@`` besides the one before the host: in a password, the
    parse ends it at the first one, and the rest of it shows up as the host."""
    return text.count("@") > 1 or "@" in (parsed.host or "") or "@" in (parsed.database or "")


def shown_url(url: URL) -> str:
    """A parsed URL with its password (and any secret query parameter) as ``***``, in the form
    users write (``postgresql://``, not the driver's ``postgresql+asyncpg://``)."""
    as_written = url.set(drivername=url.get_backend_name())
    return _hide_secret_query(as_written.render_as_string(hide_password=True))


def redact_url(url: str) -> str:
    """The URL as given, with any password replaced by ``***``, safe for logs and errors. A
    URL that does not parse cleanly into one with a password is redacted conservatively:
    everything between the user name and the last ``@`` (or, without one, whatever follows a
    ``:`` that is not a port)."""
    text = str(url)
    try:
        parsed = make_url(text)
    except Exception:
        parsed = None
    if parsed is not None and parsed.password is not None and not _ambiguous(text, parsed):
        return shown_url(parsed)
    return _redact_user_info(_hide_secret_query(text))


def _redact_user_info(text: str) -> str:
    scheme, separator, rest = text.partition("://")
    if not separator:
        scheme, rest = "", text
    at = rest.rfind("@")
    if at >= 0:
        user, colon, _ = rest[:at].partition(":")
        rest = f"{user}:***{rest[at:]}" if colon else rest
    else:
        # Without an "@", what follows a ":" is a port, or a password without a host.
        address, colon, after = rest.partition(":")
        if colon and re.match(r"\d+(?:[/?#]|$)", after) is None:
            rest = f"{address}:***"
    return f"{scheme}{separator}{rest}"


def _hide_secret_query(text: str) -> str:
    return _SECRET_QUERY.sub(r"\1***", text)


def scrub(text: str, url: URL | str | None) -> str:
    """``text`` without the password of ``url`` in any of the forms it may be quoted in."""
    secrets: set[str] = set()
    if isinstance(url, str):
        try:
            url = make_url(url)
        except Exception:
            url = None
    if isinstance(url, URL):
        for value in (url.password, *(v for k, v in url.query.items() if _is_secret(k))):
            if isinstance(value, str) and value:
                secrets.update({value, quote(value, safe=""), quote_plus(value)})
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _is_secret(key: str) -> bool:
    return any(word in key.lower() for word in ("pass", "secret", "token", "key"))


def describe_connection_error(engine: AsyncEngine, exc: BaseException) -> str:
    """One line naming the database (password hidden) and why it cannot be used."""
    reason = str(getattr(exc, "orig", None) or exc).strip()
    reason = scrub(reason.splitlines()[0], engine.url) if reason else type(exc).__name__
    return (
        f"cannot connect to {shown_url(engine.url)}: {reason}; "
        "check the URL and that the server runs"
    )

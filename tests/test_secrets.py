"""Secrets stay secret: no form of database URL puts its password in an error message."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
from urllib.parse import quote, quote_plus

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from outbox import OutboxStore
from outbox.cli import main as outbox_main
from outbox.errors import OutboxError
from outbox.store import redact_url
from outbox.writer import unavailable


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PORT = _closed_port()

# Every shape a password reaches outbox in: raw and percent-encoded in the user info, as
# libpq's ``?password=`` (encoded, raw, among other parameters), next to a port that is not a
# number, without a host, a scheme, or with the scheme mangled, for another database.
SHAPES = {
    "user info, raw": "postgresql://app:{raw}@127.0.0.1:{port}/app",
    "user info, encoded": "postgresql://app:{encoded}@127.0.0.1:{port}/app",
    "user info, no database": "postgresql://app:{raw}@127.0.0.1:{port}",
    "query, encoded": "postgresql://app@127.0.0.1:{port}/app?password={encoded}",
    "query, raw": "postgresql://app@127.0.0.1:{port}/app?password={raw}",
    "query, then more": "postgresql://app@127.0.0.1:{port}/app?password={plus}&timeout=5",
    "query, after another": "postgresql://app@127.0.0.1:{port}/app?ssl=disable&password={raw}",
    "both": "postgresql://app:{encoded}@127.0.0.1:{port}/app?password={encoded}",
    "port not a number": "postgresql://app:{raw}@127.0.0.1:port{port}/app",
    "no host": "postgresql://app:{raw}",
    "no scheme": "app:{raw}@127.0.0.1:{port}/app",
    "scheme mangled": "postgresql:/app:{raw}@127.0.0.1/app",
    "not postgres": "mysql://app:{raw}@127.0.0.1/app",
    "unknown parameter": "postgresql://app:{raw}@127.0.0.1:{port}/app?sslmodez=1",
    "asyncpg form": "postgresql+asyncpg://app:{encoded}@127.0.0.1:{port}/app",
}

passwords = st.text(
    alphabet=st.one_of(
        st.sampled_from("@:/%?#&=+;[] '\"\\$!*"),
        st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
    ),
    min_size=8,
    max_size=24,
)


def _url(shape: str, password: str) -> str:
    url = SHAPES[shape].format(
        raw=password,
        encoded=quote(password, safe=""),
        plus=quote_plus(password),
        port=PORT,
    )
    skeleton = SHAPES[shape].format(raw="", encoded="", plus="", port=PORT)
    # A password that is a piece of the URL around it ("127.0.0.1", "postgresql") cannot be
    # told apart from it.
    for form in _forms(password):
        assume(form not in skeleton)
    if shape == "no host":  # digits are a port; an "@" starts a host
        assume(not (password.isascii() and password.isdigit()) and "@" not in password)
    return url


def _forms(password: str) -> set[str]:
    return {password, quote(password, safe=""), quote_plus(password), quote(password)}


def _assert_safe(message: str, password: str, where: str) -> None:
    assert message.strip(), where
    assert "\n" not in message.strip() and "\r" not in message, (where, message)
    for form in _forms(password):
        assert form not in message, (where, form, message)


async def _messages(url: str) -> list[tuple[str, str]]:
    """What outbox says about ``url``: from ``from_url``, else ``check_schema`` (nothing
    listens on its port) and the writer's outage error, and how the engine shows the URL."""
    said = [("redact_url", redact_url(url))]
    try:
        store = OutboxStore.from_url(url)
    except OutboxError as exc:
        return [*said, ("from_url", str(exc))]
    async with store:
        try:
            await store.check_schema()
        except OutboxError as exc:
            said.append(("check_schema", str(exc)))
        else:  # pragma: no cover - nothing listens there
            raise AssertionError("connected to a closed port")
        # A driver's message that quotes the password it was given.
        refused = ConnectionRefusedError(f"refused, password {store.engine.url.password}")
        said.append(("unavailable", str(unavailable(store, refused, 61.0, 60.0))))
        said.append(("engine url", f"{store.engine.url} {store.engine.url!r}"))
    return said


@settings(max_examples=400, deadline=None)
@given(shape=st.sampled_from(sorted(SHAPES)), password=passwords)
def test_no_form_of_url_shows_its_password(shape: str, password: str) -> None:
    url = _url(shape, password)
    for where, message in asyncio.run(_messages(url)):
        _assert_safe(message, password, f"{shape}: {where}")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.sampled_from(sorted(SHAPES)), password=passwords)
def test_no_form_of_url_shows_its_password_on_the_command_line(shape: str, password: str) -> None:
    url = _url(shape, password)
    for command in (["status"], ["migrate"], ["grant", "--role", "app"]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = outbox_main([*command, "--database-url", url])
        assert code == 2, (command, out.getvalue(), err.getvalue())
        _assert_safe(err.getvalue(), password, f"{shape}: {command}")
        assert not out.getvalue(), (command, out.getvalue())

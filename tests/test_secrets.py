"""Secrets stay secret: no form of database URL puts its password in an error message, and
trigger kwargs (broker credentials) are encrypted at rest."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
from urllib.parse import quote, quote_plus

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from outbox import LaneCommitter, OutboxStore, fernet
from outbox.cli import main as outbox_main
from outbox.core import canonical_json
from outbox.errors import ConfigurationError, OutboxError
from outbox.store import EventToRecord, ResolutionRow, asyncpg_url, redact_url
from outbox.writer import unavailable
from tests.streams import RecordingProducer, StreamTrigger


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


_WORDINGS: dict[str, str] = {}


def _wording(shape: str) -> str:
    """Everything outbox says about a URL of this shape whose password is a plain word."""
    if shape not in _WORDINGS:
        said = asyncio.run(_messages(_url(shape, "plainword")))
        _WORDINGS[shape] = " ".join(message for _, message in said)
    return _WORDINGS[shape]


@settings(max_examples=400, deadline=None)
@given(shape=st.sampled_from(sorted(SHAPES)), password=passwords)
def test_no_form_of_url_shows_its_password(shape: str, password: str) -> None:
    url = _url(shape, password)
    # A password that is a piece of what outbox says anyway ("unreacha" in "unreachable")
    # cannot be told apart from it.
    for form in _forms(password):
        assume(form not in _wording(shape))
    for where, message in asyncio.run(_messages(url)):
        _assert_safe(message, password, f"{shape}: {where}")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.sampled_from(sorted(SHAPES)), password=passwords)
def test_no_form_of_url_shows_its_password_on_the_command_line(shape: str, password: str) -> None:
    url = _url(shape, password)
    for command in (["status"], ["migrate"], ["grant", "--role", "app", "--job", "reader"]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = outbox_main([*command, "--database-url", url])
        # A URL outbox cannot use is bad usage (2); one it cannot connect to fails at run time.
        try:
            asyncpg_url(url)
        except ConfigurationError:
            expected = 2
        else:
            expected = 1
        assert code == expected, (command, out.getvalue(), err.getvalue())
        _assert_safe(err.getvalue(), password, f"{shape}: {command}")
        assert not out.getvalue(), (command, out.getvalue())


# -- trigger kwargs encrypted at rest ---------------------------------------------------------

SASL_PASSWORD = "sasl-Pa55-in-consumer-options"


async def _stream_with_resolved_events(store: OutboxStore, events: int) -> int:
    """The stream of ``StreamTrigger(name="vault")``, whose kwargs hold a broker password, with
    ``events`` more events resolved by its subscriber."""
    trigger = StreamTrigger(name="vault", region=SASL_PASSWORD)
    class_path, kwargs = trigger.serialize()
    stream_id = await store.ensure_stream(
        canonical_json(trigger.shared_stream_key(), what="key"),
        class_path,
        json.dumps(kwargs),
        300.0,
    )
    lane_id = (await store.ensure_lanes(stream_id, ["null"]))["null"]
    staged = [
        EventToRecord(stream_id, lane_id, None, "{}", json.dumps(n), ["s1"]) for n in range(events)
    ]
    async with store.engine.begin() as conn:
        await store.record_events(conn, staged)
        await store.resolve(
            conn, [ResolutionRow(stream_id, e.event_id, "s1", "acked", None) for e in staged]
        )
    return stream_id


async def _stored_stream_row(store: OutboxStore) -> str:
    async with store.engine.connect() as conn:
        return str((await conn.execute(sa.text("SELECT s::text FROM outbox_stream AS s"))).one())


async def _rebuild_and_advance(url: str, fernet_key: str | None) -> tuple[int, str | None]:
    """A committer on a store with ``fernet_key`` rebuilds the stream's producer from its
    stored kwargs: events advanced, and the lane's last error."""
    StreamTrigger.PRODUCERS["vault"] = RecordingProducer([])
    StreamTrigger.factory_calls.clear()
    async with OutboxStore.from_url(url, fernet_key=fernet_key) as store:
        committer = LaneCommitter(store, allowed_modules=["tests.streams"])
        advanced = await committer.run_once()
        await committer.release()
        async with store.engine.begin() as conn:
            error = await conn.scalar(sa.text("SELECT last_error FROM outbox_lane"))
            # Clear the failure's backoff: the next committer tries at once.
            await conn.execute(sa.text("UPDATE outbox_lane SET retry_at = NULL"))
    if advanced:
        assert StreamTrigger.factory_calls == [{"name": "vault", "region": SASL_PASSWORD}]
    return advanced, error


async def test_trigger_kwargs_are_encrypted_at_rest_and_the_committer_rebuilds_from_them(
    database_url: str,
) -> None:
    old_key, stranger = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    async with OutboxStore.from_url(database_url, fernet_key=old_key) as store:
        await _stream_with_resolved_events(store, 3)
        row = await _stored_stream_row(store)
    assert SASL_PASSWORD not in row and "vault" in row  # the key stays readable

    assert await _rebuild_and_advance(database_url, old_key) == (3, None)

    async with OutboxStore.from_url(database_url, fernet_key=old_key) as store:
        await _stream_with_resolved_events(store, 2)
    for key, fix in ((stranger, "add the key they were encrypted with"), ("", "set OUTBOX_")):
        advanced, error = await _rebuild_and_advance(database_url, key)
        assert advanced == 0 and error is not None
        assert '["queue","vault"]' in error and fix in error and "\n" not in error, error
        assert SASL_PASSWORD not in error and old_key not in error


def _rotate(url: str, keys: str, monkeypatch: pytest.MonkeyPatch, *args: str) -> str:
    monkeypatch.setenv("OUTBOX_FERNET_KEY", keys)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = outbox_main(["rotate-fernet-key", "--database-url", url, *args])
    assert code == 0, err.getvalue()
    monkeypatch.delenv("OUTBOX_FERNET_KEY")
    return out.getvalue()


async def test_rotating_the_fernet_key(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Old key -> new key: with the new key first, ``outbox rotate-fernet-key`` encrypts every
    stream again; the old key can then go, and the committer still rebuilds the producer."""
    old_key, new_key = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    async with OutboxStore.from_url(database_url, fernet_key=old_key) as store:
        await _stream_with_resolved_events(store, 2)
    assert await _rebuild_and_advance(database_url, f"{new_key},{old_key}") == (2, None)

    said = await asyncio.to_thread(_rotate, database_url, f"{new_key},{old_key}", monkeypatch)
    assert "trigger kwargs of 1 streams encrypted" in said

    async with OutboxStore.from_url(database_url, fernet_key=new_key) as store:
        await _stream_with_resolved_events(store, 2)
    assert await _rebuild_and_advance(database_url, new_key) == (2, None)
    async with OutboxStore.from_url(database_url, fernet_key=new_key) as store:
        await _stream_with_resolved_events(store, 1)
    advanced, error = await _rebuild_and_advance(database_url, old_key)
    assert advanced == 0 and error is not None and "do not decrypt" in error

    # And back to plain text (before a downgrade), readable without any key.
    await asyncio.to_thread(_rotate, database_url, new_key, monkeypatch, "--decrypt")
    async with OutboxStore.from_url(database_url, fernet_key="") as store:
        assert SASL_PASSWORD in await _stored_stream_row(store)
    assert await _rebuild_and_advance(database_url, "") == (1, None)


async def test_the_key_comes_from_outbox_fernet_key_else_airflows(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    airflow_key, outbox_key = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    monkeypatch.delenv("OUTBOX_FERNET_KEY", raising=False)
    monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", airflow_key)
    async with OutboxStore.from_url(database_url) as store:
        await _stream_with_resolved_events(store, 1)
        assert SASL_PASSWORD not in await _stored_stream_row(store)
    assert await _rebuild_and_advance(database_url, airflow_key) == (1, None)

    monkeypatch.setenv("OUTBOX_FERNET_KEY", outbox_key)
    async with OutboxStore.from_url(database_url) as store:
        await _stream_with_resolved_events(store, 1)  # written again with OUTBOX_FERNET_KEY
    assert await _rebuild_and_advance(database_url, outbox_key) == (1, None)

    monkeypatch.setenv("OUTBOX_FERNET_KEY", "not-a-fernet-key," + outbox_key[:10])
    with pytest.raises(ConfigurationError) as bad:
        OutboxStore.from_url(database_url)
    message = str(bad.value)
    assert "OUTBOX_FERNET_KEY" in message and "generate one" in message and "\n" not in message
    assert "not-a-fernet-key" not in message and outbox_key[:10] not in message


async def test_without_a_key_kwargs_stay_plain_and_one_warning_says_so(
    database_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("OUTBOX_FERNET_KEY", raising=False)
    monkeypatch.delenv("AIRFLOW__CORE__FERNET_KEY", raising=False)
    monkeypatch.setattr(fernet, "_warned", False)
    async with OutboxStore.from_url(database_url) as store:
        await _stream_with_resolved_events(store, 1)
        await _stream_with_resolved_events(store, 1)
        assert SASL_PASSWORD in await _stored_stream_row(store)
    assert await _rebuild_and_advance(database_url, None) == (2, None)
    warnings = [r.getMessage() for r in caplog.records if r.name == "outbox.fernet"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "unencrypted" in warnings[0] and "OUTBOX_FERNET_KEY" in warnings[0]

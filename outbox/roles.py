"""Least privilege: what the runtime role (manager, committer, reader, status, prune) needs.

Two roles: an **owner** that runs ``outbox migrate`` and so owns the ``outbox_`` tables, and a
**runtime** role that the triggerers, committers and readers connect as. ``runtime_grants``
is the SQL the owner runs to give the runtime role exactly the statements outbox issues (no
DDL, no other table); ``outbox grant --role NAME`` runs it (``--print`` shows it instead).
Run it again after every ``outbox migrate`` (it revokes first, so it is idempotent).
"""

from __future__ import annotations

from typing import Final

from sqlalchemy.exc import DBAPIError, ProgrammingError

from outbox.dburl import describe_connection_error
from outbox.errors import ConfigurationError, DatabaseUnavailable
from outbox.store import VERSION_TABLE, OutboxStore

__all__ = (
    "RUNTIME_PRIVILEGES",
    "RUNTIME_SEQUENCES",
    "grant_runtime",
    "runtime_grants",
    "runtime_grants_sql",
)

# Each table and the statements outbox runs on it as the runtime role. UPDATE also covers the
# row locks (SELECT ... FOR UPDATE) that the write path, the committer and the reader take.
RUNTIME_PRIVILEGES: Final[dict[str, tuple[str, ...]]] = {
    "outbox_stream": ("SELECT", "INSERT", "UPDATE"),  # ensure_stream upserts
    "outbox_lane": ("SELECT", "INSERT", "UPDATE"),  # positions, cursor, leases
    "outbox_event": ("SELECT", "INSERT", "UPDATE", "DELETE"),  # DELETE: prune
    "outbox_unacked": ("SELECT", "INSERT", "DELETE"),  # DELETE: a redelivery re-opens
    "outbox_delivery": ("SELECT",),  # a view of every resolution
    "outbox_record": ("SELECT", "INSERT", "UPDATE", "DELETE"),  # UPDATE: dispatched_at
    VERSION_TABLE: ("SELECT",),  # check_schema
}
RUNTIME_SEQUENCES: Final[tuple[str, ...]] = (
    "outbox_stream_id_seq",
    "outbox_lane_id_seq",
    "outbox_event_id_seq",
    "outbox_record_id_seq",
)


def _ident(name: str) -> str:
    if not name or "\x00" in name:
        raise ConfigurationError(f"role or schema name {name!r} is not valid; name an existing one")
    return '"' + name.replace('"', '""') + '"'


def runtime_grants(role: str, *, schema: str = "public") -> list[str]:
    """The statements that give ``role`` what outbox needs at runtime in ``schema``, after
    revoking whatever it had on outbox's tables and sequences."""
    who, where = _ident(role), _ident(schema)
    statements = [f"GRANT USAGE ON SCHEMA {where} TO {who}"]
    for table, privileges in RUNTIME_PRIVILEGES.items():
        qualified = f"{where}.{_ident(table)}"
        statements.append(f"REVOKE ALL ON TABLE {qualified} FROM {who}")
        statements.append(f"GRANT {', '.join(privileges)} ON TABLE {qualified} TO {who}")
    for sequence in RUNTIME_SEQUENCES:
        qualified = f"{where}.{_ident(sequence)}"
        statements.append(f"REVOKE ALL ON SEQUENCE {qualified} FROM {who}")
        statements.append(f"GRANT USAGE ON SEQUENCE {qualified} TO {who}")
    return statements


def runtime_grants_sql(role: str, *, schema: str = "public") -> str:
    """``runtime_grants`` as one script (a transaction) for ``psql``."""
    body = ";\n".join(runtime_grants(role, schema=schema))
    return f"BEGIN;\n{body};\nCOMMIT;\n"


async def grant_runtime(url: str, role: str, *, schema: str = "public") -> None:
    """Connected to ``url`` as the tables' owner, give ``role`` outbox's runtime privileges
    (one transaction). Raises a one-line ``ConfigurationError`` if the role does not exist or
    ``url`` does not connect as the owner."""
    statements = runtime_grants(role, schema=schema)
    async with OutboxStore.from_url(url, pool_size=1) as store:
        await store.check_schema()
        try:
            async with store.engine.begin() as conn:
                for statement in statements:
                    await conn.exec_driver_sql(statement)
        except ProgrammingError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
            if "does not exist" in reason and "role" in reason:
                fix = f"create it first (CREATE ROLE {_ident(role)} LOGIN PASSWORD '...')"
            else:
                fix = "connect as the role that ran `outbox migrate` (the tables' owner)"
            raise ConfigurationError(f"cannot grant to role {role!r}: {reason}; {fix}") from None
        except (OSError, DBAPIError) as exc:
            raise DatabaseUnavailable(describe_connection_error(store.engine, exc)) from None

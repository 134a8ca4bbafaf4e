"""Least privilege: what each job needs, and nothing else.

An **owner** runs ``outbox migrate`` and so owns the ``outbox_`` tables. Everything else runs as
a role per job, which ``outbox grant --job JOB --role NAME`` gives exactly the statements that
job's code issues (no DDL, no other table):

* **triggerer**: the manager (streams, lanes, events, resolutions, trigger events) with its
  in-process committer; it cannot mark records dispatched nor read their payloads.
* **committer**: ``outbox committer`` (lanes: cursors, leases, failures; the ack-timeout sweep,
  which resolves events as failed; prune; status and metrics); it cannot record events, store
  trigger events or change a stream, nor a lane's allocation.
* **reader**: ``OutboxReader`` (claim and mark records); it reads stream ids and keys and,
  to keep each subscriber's records in event order, which events are still owed; it cannot
  change streams, lanes or events.

``TABLE_PRIVILEGES`` lists, per table, each job's privileges (a privilege may name columns:
``UPDATE (dispatched_at)``); a new table is one more line. Run ``outbox grant`` again after
every ``outbox migrate`` (it revokes first, so it is idempotent).
"""

from __future__ import annotations

from typing import Final, NamedTuple

from sqlalchemy.exc import ProgrammingError

from outbox.dburl import describe_connection_error
from outbox.errors import ConfigurationError, DatabaseUnavailable
from outbox.settings import search_path_options
from outbox.store import VERSION_TABLE, OutboxStore

__all__ = (
    "ID_SEQUENCES",
    "JOBS",
    "TABLE_PRIVILEGES",
    "Grants",
    "grant",
    "grants",
    "grants_sql",
    "job_privileges",
    "job_sequences",
)

JOBS: Final = ("triggerer", "committer", "reader")


class Grants(NamedTuple):
    """A table's privileges for each job. UPDATE (of any column) also covers the row locks
    (``SELECT ... FOR UPDATE``) that job's statements take."""

    triggerer: tuple[str, ...] = ()
    committer: tuple[str, ...] = ()
    reader: tuple[str, ...] = ()


_READ_WRITE: Final = ("SELECT", "INSERT", "UPDATE")
# The lane columns a committer moves: cursor, lease, failures (not the allocation counters).
_COMMITTER_LANE = (
    "UPDATE (advanced_through, lease_owner, lease_expires_at, fencing_token, attempts, "
    "last_error, stalled_since, retry_at, held_identity, held_since)"
)
# What the ack-timeout sweep writes when it fails a delivery.
# (and, moving a delivery owed to an earlier registration of a subscriber to its newer one,
# the snapshot).
_SWEPT_EVENT = "UPDATE (resolved, pending, acked, failed, rejected, resolved_at, snapshot)"

TABLE_PRIVILEGES: Final[dict[str, Grants]] = {
    # The committer's sweep releases the producer of a triggerer whose session expired.
    "outbox_stream": Grants(
        _READ_WRITE, ("SELECT", "UPDATE (consumer_session)"), ("SELECT (id, key)",)
    ),
    # The reader holds back a subscriber's records after an event it still owes: it reads
    # where each lane's unadvanced events start and which of them are still owed.
    "outbox_lane": Grants(
        _READ_WRITE, ("SELECT", _COMMITTER_LANE), ("SELECT (id, stream_id, advanced_through)",)
    ),
    "outbox_event": Grants(
        _READ_WRITE,
        ("SELECT", _SWEPT_EVENT, "DELETE"),
        ("SELECT (id, stream_id, lane_id, position, pending, resolved, snapshot)",),
    ),
    "outbox_unacked": Grants(("SELECT", "INSERT", "DELETE"), ("SELECT", "INSERT", "DELETE")),
    "outbox_delivery": Grants(),  # a view of every resolution, for people (as the owner)
    "outbox_record": Grants(
        ("INSERT", "SELECT (stream_id)"),
        ("SELECT (id, stream_id, event_id, dispatched_at)", "UPDATE (event_id)", "DELETE"),
        ("SELECT", "UPDATE (dispatched_at)"),
    ),
    # Triggerers keep their session alive and register their subscribers; the committer's
    # sweep ends expired sessions (and forgets them a day later) and reads who is owed what.
    "outbox_session": Grants(_READ_WRITE, ("SELECT", "UPDATE (ended_at)", "DELETE")),
    "outbox_subscriber": Grants((*_READ_WRITE, "DELETE"), ("SELECT",)),
    VERSION_TABLE: Grants(("SELECT",), ("SELECT",), ("SELECT",)),  # check_schema
}

# The id sequence of each table that has one: a job that inserts into the table uses it.
ID_SEQUENCES: Final[dict[str, str]] = {
    "outbox_stream": "outbox_stream_id_seq",
    "outbox_lane": "outbox_lane_id_seq",
    "outbox_event": "outbox_event_id_seq",
    "outbox_record": "outbox_record_id_seq",
    "outbox_session": "outbox_session_id_seq",
    "outbox_subscriber": "outbox_subscriber_id_seq",
}


def job_privileges(job: str) -> dict[str, tuple[str, ...]]:
    """Each table's privileges for ``job`` (tables it has none on are left out)."""
    index = _job_index(job)
    return {table: grants[index] for table, grants in TABLE_PRIVILEGES.items() if grants[index]}


def job_sequences(job: str) -> list[str]:
    """The id sequences ``job`` draws from."""
    return [
        sequence
        for table, sequence in ID_SEQUENCES.items()
        if "INSERT" in job_privileges(job).get(table, ())
    ]


def _job_index(job: str) -> int:
    if job not in JOBS:
        raise ConfigurationError(f"job {job!r} is not one of outbox's jobs; use one of {JOBS}")
    return JOBS.index(job)


def _ident(name: str) -> str:
    if not name or "\x00" in name:
        raise ConfigurationError(f"role or schema name {name!r} is not valid; name an existing one")
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def grants(
    role: str, jobs: list[str], *, schema: str = "public", create: bool = False
) -> list[str]:
    """The statements that give ``role`` what ``jobs`` need in ``schema``, after revoking
    whatever it had on outbox's tables and sequences; with ``create``, the role (NOLOGIN, to
    be granted to login roles) is created first if it does not exist."""
    if not jobs:
        raise ConfigurationError(f"no job for role {role!r}; name one or more of {JOBS}")
    who, where = _ident(role), _ident(schema)
    statements = []
    if create:
        statements.append(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {_literal(role)}) "
            f"THEN CREATE ROLE {who} NOLOGIN; END IF; END $$"
        )
    statements.append(f"GRANT USAGE ON SCHEMA {where} TO {who}")
    for table in TABLE_PRIVILEGES:
        qualified = f"{where}.{_ident(table)}"
        statements.append(f"REVOKE ALL ON TABLE {qualified} FROM {who}")
        privileges = sorted({p for job in jobs for p in job_privileges(job).get(table, ())})
        if privileges:
            statements.append(f"GRANT {', '.join(privileges)} ON TABLE {qualified} TO {who}")
    used = {sequence for job in jobs for sequence in job_sequences(job)}
    for sequence in ID_SEQUENCES.values():
        qualified = f"{where}.{_ident(sequence)}"
        statements.append(f"REVOKE ALL ON SEQUENCE {qualified} FROM {who}")
        if sequence in used:
            statements.append(f"GRANT USAGE ON SEQUENCE {qualified} TO {who}")
    return statements


def grants_sql(role: str, jobs: list[str], *, schema: str = "public", create: bool = False) -> str:
    """``grants`` as one script (a transaction) for ``psql``."""
    body = ";\n".join(grants(role, jobs, schema=schema, create=create))
    return f"BEGIN;\n{body};\nCOMMIT;\n"


async def grant(
    url: str, role: str, jobs: list[str], *, schema: str = "public", create: bool = False
) -> None:
    """Connected to ``url`` as the tables' owner, give ``role`` what ``jobs`` need (one
    transaction). Raises a one-line ``ConfigurationError`` if the role does not exist (and is
    not to be created) or ``url`` does not connect as the owner."""
    statements = grants(role, jobs, schema=schema, create=create)
    async with OutboxStore.from_url(url, pool_size=1, **search_path_options(schema)) as store:
        await store.check_schema()
        try:
            async with store.engine.begin() as conn:
                for statement in statements:
                    await conn.exec_driver_sql(statement)
        except ProgrammingError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
            if "does not exist" in reason and "role" in reason:
                fix = "create it first, or pass --create"
            elif "permission denied to create role" in reason:
                fix = "create the role as a user with CREATEROLE, then grant without --create"
            else:
                fix = "connect as the role that ran `outbox migrate` (the tables' owner)"
            raise ConfigurationError(f"cannot grant to role {role!r}: {reason}; {fix}") from None
        except Exception as exc:  # the connection went away
            raise DatabaseUnavailable(describe_connection_error(store.engine, exc)) from None

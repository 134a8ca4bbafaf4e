"""The outbox tables, as SQLAlchemy Core metadata (the migrations are checked against it).

An event's ``snapshot`` lists the subscribers that must resolve it and ``resolved`` those that
did, first resolution winning; ``pending`` counts the difference. An ``acked`` resolution is
nothing more than the subscriber's name in ``resolved`` (next to its records, in the same
transaction); a ``rejected`` or ``failed`` one also gets an ``outbox_unacked`` row with its
reason. The ``outbox_delivery`` view (migration 0005) shows every resolution as a row, for reading.
"""

from __future__ import annotations

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

__all__ = (
    "event",
    "lane",
    "metadata",
    "record",
    "session",
    "stream",
    "subscriber",
    "unacked",
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

NOW = func.now()

stream = Table(
    "outbox_stream",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("key", Text, nullable=False, comment="canonical JSON of shared_stream_key()"),
    Column("trigger_class", Text, nullable=False),
    # Plain, or (with a Fernet key configured) encrypted: exactly one is set.
    Column("trigger_kwargs", JSONB),
    Column("ack_timeout", Float, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column(
        "consumer_session",
        BigInteger,
        ForeignKey("outbox_session.id", ondelete="SET NULL"),
        comment="the triggerer session whose manager runs the producer (reads the broker)",
    ),
    Column(
        "advance_in",
        Text,
        nullable=False,
        server_default=text("'anywhere'"),
        comment="'consumer': only the process that reads the broker may advance it",
    ),
    Column(
        "trigger_kwargs_encrypted",
        Text,
        comment="Fernet token of the kwargs' JSON, when a key is configured",
    ),
    UniqueConstraint("key"),
    CheckConstraint("advance_in IN ('anywhere', 'consumer')", name="advance_in_known"),
    CheckConstraint(
        "num_nonnulls(trigger_kwargs, trigger_kwargs_encrypted) = 1", name="kwargs_stored_once"
    ),
)

# A triggerer process (one manager) while it lives: it renews ``expires_at``; a graceful stop, or
# a sweeper that finds it expired, sets ``ended_at``. Deliveries owed through a session that is
# no longer live are failed by the sweep at once.
session = Table(
    "outbox_session",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("owner", Text, nullable=False, comment="host:pid:random of the process"),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True)),
)

# A subscriber of a stream, on whichever triggerer it runs: its id changes each time it joins, and
# an event's snapshot names, for each subscriber owing it, the registration it is owed through.
subscriber = Table(
    "outbox_subscriber",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column(
        "stream_id", BigInteger, ForeignKey("outbox_stream.id", ondelete="CASCADE"), nullable=False
    ),
    Column("name", Text, nullable=False, comment="str(trigger_id)"),
    Column(
        "session_id",
        BigInteger,
        ForeignKey("outbox_session.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column(
        "excluded",
        Boolean,
        nullable=False,
        server_default=text("false"),
        comment="failed or leaving: in no new snapshot",
    ),
    Column("joined_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    UniqueConstraint("stream_id", "name"),
    Index("ix_outbox_subscriber_session_id", "session_id"),
)

lane = Table(
    "outbox_lane",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column(
        "stream_id", BigInteger, ForeignKey("outbox_stream.id", ondelete="CASCADE"), nullable=False
    ),
    Column("lane_key", Text, nullable=False, comment="canonical JSON of get_advance_lane()"),
    Column("next_position", BigInteger, nullable=False, server_default=text("1")),
    Column("advanced_through", BigInteger, nullable=False, server_default=text("0")),
    Column("lease_owner", Text),
    Column("lease_expires_at", DateTime(timezone=True)),
    Column("fencing_token", BigInteger, nullable=False, server_default=text("0")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text),
    Column("stalled_since", DateTime(timezone=True)),
    Column("retry_at", DateTime(timezone=True)),
    Column(
        "rewrites",
        BigInteger,
        nullable=False,
        server_default=text("0"),
        comment="redeliveries that changed one of the lane's events (a cursor move checks it)",
    ),
    Column(
        "held_identity",
        Text,
        comment="the event the lane's broker acknowledgement is held at, as its producer said",
    ),
    Column("held_since", DateTime(timezone=True), comment="when that hold began"),
    UniqueConstraint("stream_id", "lane_key"),
    CheckConstraint("advanced_through < next_position", name="cursor_behind_allocation"),
)

# No foreign keys on the three hot tables: their rows are only ever written by the store, with
# the stream, lane or event it has just read or written in the same transaction, and streams and
# lanes are never deleted. The checks cost half of recording an event and a third of resolving.
event = Table(
    "outbox_event",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("stream_id", BigInteger, nullable=False),
    Column("lane_id", BigInteger, nullable=False),
    Column("position", BigInteger, nullable=False),
    Column("identity", Text),
    Column("raw", JSONB),
    Column("payload", JSONB),
    Column(
        "snapshot",
        JSONB,
        nullable=False,
        comment="subscribers that must resolve it, each with the registration it is owed through",
    ),
    Column(
        "resolved",
        ARRAY(Text),
        nullable=False,
        server_default=text("'{}'"),
        comment="subscribers that resolved it, in any state",
    ),
    Column("pending", Integer, nullable=False),
    Column("acked", Integer, nullable=False, server_default=text("0")),
    Column("failed", Integer, nullable=False, server_default=text("0")),
    Column("rejected", Integer, nullable=False, server_default=text("0")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("resolved_at", DateTime(timezone=True)),
    Column(
        "recorded_by",
        BigInteger,
        comment="the triggerer session that recorded it (or last re-recorded it)",
    ),
    UniqueConstraint("lane_id", "position"),
    CheckConstraint("pending >= 0", name="pending_not_negative"),
    Index(
        "ix_outbox_event_identity",
        "stream_id",
        "identity",
        postgresql_where=text("identity IS NOT NULL"),
    ),
    # Room on each page for the resolutions of all its events (a new, longer row version each)
    # to stay HOT, writing no index entries: no index covers the columns they change.
    postgresql_with={"fillfactor": 40},
)

unacked = Table(
    "outbox_unacked",
    metadata,
    Column("event_id", BigInteger, nullable=False),
    Column("subscriber", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("reason", Text),
    Column("resolved_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    PrimaryKeyConstraint("event_id", "subscriber"),
    CheckConstraint("state IN ('rejected', 'failed')", name="state_known"),
)


record = Table(
    "outbox_record",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("stream_id", BigInteger, nullable=False),
    Column("event_id", BigInteger, comment="NULL for fast-path records and once pruned"),
    Column("subscriber", Text, nullable=False),
    Column("ordinal", Integer, nullable=False),
    Column("payload", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("dispatched_at", DateTime(timezone=True)),
    UniqueConstraint("event_id", "subscriber", "ordinal"),
    # The reader's claim order: a stream's undispatched records in event order (see
    # ``outbox.store.claims._CLAIM_RECORDS``).
    Index(
        "ix_outbox_record_undispatched",
        "stream_id",
        text("event_id NULLS FIRST"),
        "id",
        postgresql_where=text("dispatched_at IS NULL"),
    ),
)

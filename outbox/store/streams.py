"""Streams and lanes: created on first use; trigger kwargs encrypted at rest."""

from __future__ import annotations

import json
import json.scanner
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from outbox.errors import (
    ConfigurationError,
)
from outbox.fernet import ENV as FERNET_ENV
from outbox.fernet import InvalidToken, warn_unencrypted_once
from outbox.schema import lane, stream
from outbox.store.base import StoreBase

if TYPE_CHECKING:
    from collections.abc import Iterable


class Streams(StoreBase):
    async def ensure_stream(
        self, key_json: str, trigger_class: str, kwargs_json: str, ack_timeout: float
    ) -> int:
        """The id of the stream with this key, created or updated with the given builder (its
        kwargs encrypted when a Fernet key is configured)."""
        statement = sa.text(
            """
            INSERT INTO outbox_stream
                (key, trigger_class, trigger_kwargs, trigger_kwargs_encrypted, ack_timeout)
            VALUES (:key, :trigger_class, CAST(:kwargs AS jsonb), :encrypted, :ack_timeout)
            ON CONFLICT (key) DO UPDATE
            SET trigger_class = excluded.trigger_class, trigger_kwargs = excluded.trigger_kwargs,
                trigger_kwargs_encrypted = excluded.trigger_kwargs_encrypted,
                ack_timeout = excluded.ack_timeout
            RETURNING id
            """
        )
        plain, encrypted = self._kwargs_at_rest(kwargs_json)
        async with self.engine.begin() as conn:
            stream_id = await conn.scalar(
                statement,
                {
                    "key": key_json,
                    "trigger_class": trigger_class,
                    "kwargs": plain,
                    "encrypted": encrypted,
                    "ack_timeout": ack_timeout,
                },
            )
        assert stream_id is not None
        return int(stream_id)

    def _kwargs_at_rest(self, kwargs_json: str) -> tuple[str | None, str | None]:
        """``(plain, encrypted)`` kwargs to store: one of them."""
        if self._cipher is None:
            warn_unencrypted_once()
            return kwargs_json, None
        return None, self._cipher.encrypt(kwargs_json)

    def _kwargs_from_rest(self, key_json: str, plain: str | None, encrypted: str | None) -> str:
        """The kwargs' JSON of the stream ``key_json`` as stored."""
        if encrypted is None:
            if self._cipher is None:
                warn_unencrypted_once()
            return plain or "{}"
        if self._cipher is None:
            raise ConfigurationError(
                f"stream {key_json}: its trigger kwargs are encrypted and no Fernet key is "
                f"configured; set {FERNET_ENV} to the key they were encrypted with"
            )
        try:
            return self._cipher.decrypt(encrypted)
        except InvalidToken:
            raise ConfigurationError(
                f"stream {key_json}: its trigger kwargs do not decrypt with the Fernet keys in "
                f"{self._cipher.source}; add the key they were encrypted with (keys are "
                "comma-separated, the first encrypts)"
            ) from None

    async def rotate_fernet_key(self, *, decrypt: bool = False) -> int:
        """Encrypt every stream's trigger kwargs again with the first Fernet key (plain ones
        too), or with ``decrypt`` store them all plain; returns how many streams. One
        transaction: a stream that does not decrypt changes nothing."""
        if self._cipher is None and not decrypt:
            raise ConfigurationError(
                f"no Fernet key to encrypt with; set {FERNET_ENV} to the new key first, "
                "followed by the old ones, comma-separated"
            )
        async with self.engine.begin() as conn:
            rows = (
                await conn.execute(
                    sa.text(
                        "SELECT id, key, trigger_kwargs::text, trigger_kwargs_encrypted "
                        "FROM outbox_stream ORDER BY id FOR UPDATE"
                    )
                )
            ).all()
            updates = []
            for stream_id, key_json, plain, encrypted in rows:
                if decrypt:
                    kwargs_json = self._kwargs_from_rest(key_json, plain, encrypted)
                    updates.append({"id": stream_id, "plain": kwargs_json, "encrypted": None})
                    continue
                assert self._cipher is not None
                if encrypted is not None:
                    self._kwargs_from_rest(key_json, plain, encrypted)  # names the stream
                    token = self._cipher.rotate(encrypted)
                else:
                    token = self._cipher.encrypt(plain or "{}")
                updates.append({"id": stream_id, "plain": None, "encrypted": token})
            if updates:
                await conn.execute(
                    sa.text(
                        "UPDATE outbox_stream SET trigger_kwargs = CAST(:plain AS jsonb), "
                        "trigger_kwargs_encrypted = :encrypted WHERE id = :id"
                    ),
                    updates,
                )
        return len(rows)

    async def ensure_lanes(self, stream_id: int, lane_keys: Iterable[str]) -> dict[str, int]:
        """Lane ids by lane key for ``stream_id``, creating the lanes that do not exist."""
        keys = sorted(set(lane_keys))
        async with self.engine.begin() as conn:
            await conn.execute(
                sa.text(
                    """
                    INSERT INTO outbox_lane (stream_id, lane_key)
                    SELECT :stream_id, k FROM unnest(CAST(:keys AS text[])) AS k
                    ON CONFLICT (stream_id, lane_key) DO NOTHING
                    """
                ),
                {"stream_id": stream_id, "keys": keys},
            )
            rows = await conn.execute(
                sa.select(lane.c.lane_key, lane.c.id).where(
                    lane.c.stream_id == stream_id, lane.c.lane_key.in_(keys)
                )
            )
            return {row[0]: row[1] for row in rows}

    async def stream_builder(self, stream_id: int) -> tuple[str, str, dict[str, Any]]:
        """``(key, trigger class path, kwargs)`` of a stream, for rebuilding its producer.
        Raises a one-line ``ConfigurationError`` naming the stream if its kwargs are encrypted
        and no configured key decrypts them."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(
                        stream.c.key,
                        stream.c.trigger_class,
                        sa.cast(stream.c.trigger_kwargs, sa.Text),
                        stream.c.trigger_kwargs_encrypted,
                    ).where(stream.c.id == stream_id)
                )
            ).one()
        kwargs = json.loads(self._kwargs_from_rest(row[0], row[2], row[3]))
        return row[0], row[1], dict(kwargs)

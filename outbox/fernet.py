"""Trigger kwargs encrypted at rest with Fernet, as Airflow encrypts them.

A stream stores its trigger's kwargs (broker credentials among them, a Kafka trigger's SASL
password say) so that a committer can rebuild its producer. With a key they are stored as a
Fernet token. Keys come as Airflow's ``[core] fernet_key`` does, comma-separated: the first
encrypts, each decrypts (``MultiFernet``), so a key is rotated by putting the new one first,
running ``outbox rotate-fernet-key``, then dropping the old one.
"""

from __future__ import annotations

import logging
import os
from typing import Final

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from outbox.errors import ConfigurationError
from outbox.settings import secret

__all__ = ("AIRFLOW_ENV", "ENV", "InvalidToken", "KwargsCipher", "warn_unencrypted_once")

log = logging.getLogger("outbox.fernet")

ENV: Final = "OUTBOX_FERNET_KEY"
AIRFLOW_ENV: Final = "AIRFLOW__CORE__FERNET_KEY"
GENERATE: Final = (
    "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"
)

_warned = False


class KwargsCipher:
    """Encrypts with the first of its keys, decrypts with any of them."""

    def __init__(self, keys: str, *, source: str) -> None:
        try:
            fernets = [Fernet(key.strip().encode()) for key in keys.split(",") if key.strip()]
        except (ValueError, TypeError):
            fernets = []
        if not fernets:
            # Never quote the value: it is a secret, if a malformed one.
            raise ConfigurationError(
                f"{source} is not a comma-separated list of Fernet keys (32 url-safe "
                f"base64-encoded bytes each); generate one with {GENERATE}"
            )
        self._fernet = MultiFernet(fernets)
        self.source = source

    @classmethod
    def configured(cls, fernet_key: str | None = None) -> KwargsCipher | None:
        """The cipher for ``fernet_key``, else for ``$OUTBOX_FERNET_KEY`` (or the file named by
        ``$OUTBOX_FERNET_KEY_FILE``, or what ``$OUTBOX_FERNET_KEY_CMD`` prints), else for
        Airflow's ``$AIRFLOW__CORE__FERNET_KEY`` (or its ``_CMD``); ``None`` if none is set (or
        set empty)."""
        if fernet_key is not None:
            return cls(fernet_key, source="fernet_key") if fernet_key.strip() else None
        for name in (ENV, AIRFLOW_ENV):
            if os.environ.get(name) is not None and not os.environ[name].strip():
                return None  # set empty: explicitly no key
            found = secret(name)
            if found is not None:
                return cls(found.value, source=found.source) if found.value.strip() else None
        return None

    def encrypt(self, text: str) -> str:
        return self._fernet.encrypt(text.encode()).decode()

    def decrypt(self, token: str) -> str:
        """Raises ``InvalidToken`` if no key of this cipher encrypted it."""
        return self._fernet.decrypt(token.encode()).decode()

    def rotate(self, token: str) -> str:
        """The token encrypted again with the first key."""
        return self._fernet.rotate(token.encode()).decode()


def warn_unencrypted_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning(
            "trigger kwargs are stored unencrypted: no Fernet key is configured; set %s (or "
            "Airflow's %s) to encrypt them",
            ENV,
            AIRFLOW_ENV,
        )

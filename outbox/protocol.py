"""The producer side of a shared stream: what a broker adapter implements and receives.

These names and their behaviour follow Airflow's ``airflow.triggers.shared_stream`` so that a
producer written for Airflow runs here with only its import lines changed.
"""

from __future__ import annotations

import contextvars
import json
import json.encoder
import logging
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Hashable, Sequence

__all__ = (
    "AckTimeout",
    "AdvanceItem",
    "AdvanceOutcome",
    "SharedStreamProducer",
    "reject_shared_stream_event",
)

log = logging.getLogger("outbox")


class AckTimeout(Exception):
    """Raised into a subscriber that did not finish an event within the ack timeout.

    The timeout is counted from the event's broadcast and covers a subscriber still on the event,
    one that never pulled it, and one whose trigger events were never committed. A delivery the
    subscriber took over by joining the stream again is failed without it (its timeout counts
    from the recording; the producer's failure handling brings the message back).
    """


@dataclass(frozen=True, slots=True)
class AdvanceOutcome:
    """How the subscribers in an event's snapshot resolved it.

    ``acked + failed + rejected`` equals the snapshot size; an event nobody was subscribed to has
    all three at zero.
    """

    acked: int
    failed: int
    rejected: int = 0

    @property
    def is_clean(self) -> bool:
        """True when every subscriber accepted the event: none failed, none rejected, one or more
        accepted. An event nobody was subscribed to is not clean."""
        return self.failed == 0 and self.rejected == 0 and self.acked > 0


class AdvanceItem(NamedTuple):
    """One event of an advance batch; unpacks as ``(broker_payload, outcome)``."""

    broker_payload: Any
    outcome: AdvanceOutcome


class SharedStreamProducer(ABC):
    """Owns the broker connection of one shared stream and advances it.

    ``open_stream`` yields ``(raw_event, broker_payload)`` forever (returning is an error);
    ``advance`` receives one lane's contiguous resolved prefix, in event order, and commits,
    deletes, acks or dead-letters on the broker. ``advance`` is at-least-once: after a crash
    between the broker call and the cursor update the same batch is advanced again, so it must
    be safe to repeat.

    ``advances_from_consumer``: set it to True when ``advance`` must run in the process whose
    ``open_stream`` reads the broker (it acks through the consuming connection, or needs what
    ``open_stream`` opened); a separate ``outbox committer`` then leaves the stream to the
    triggerer's in-process committer.
    """

    advances_from_consumer: ClassVar[bool] = False

    @abstractmethod
    def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
        """Yield ``(raw_event, broker_payload)`` for the lifetime of the stream.

        Open the broker connection here, not in the trigger's factory.
        """

    @abstractmethod
    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        """Advance the broker over one lane's batch of fully resolved events."""

    def get_advance_lane(self, broker_payload: Any) -> Hashable:
        """The ordering lane of an event; events of one lane are advanced in order.

        Default ``None``: one lane for the whole stream. Kafka returns ``(topic, partition)``.
        The value is stored as canonical JSON, so it must be made of JSON scalars, lists and
        tuples.
        """
        return None

    def get_event_key(self, broker_payload: Any) -> str | None:
        """A stable identity of the event across redeliveries, or ``None`` (no deduplication).

        Kafka: topic, partition and offset; SQS: the ``MessageId``. When present, a redelivered
        event is not handed again to subscribers that already accepted or rejected it.
        """
        return None

    def describe_hold(self, lane: Hashable) -> str | None:
        """The identity of the event the broker acknowledgement of ``lane`` is held at (later
        events of the lane were advanced, the broker not past this one), or ``None``.

        Called by the committer after each ``advance`` of the lane; it records the answer on
        the lane (``outbox status``, metrics) and prune keeps the lane's events from that one
        on. Default ``None``: nothing held.
        """
        return None

    def on_hold_reported(self, identity: str, held_for: float) -> None:  # noqa: B027
        """The committer reports this stream's broker acknowledgement held at the event
        ``identity`` for ``held_for`` seconds (database clock; it may run in another process).

        Called by the manager, in the process that reads, every second or so while the hold
        lasts. A producer that can have the event delivered again (Kafka: seek back) does;
        default: nothing.
        """

    def serialize_payload(self, broker_payload: Any) -> Any:
        """Turn a broker payload into a value for storage (default: as is).

        What this returns is stored by ``outbox.codec``: plain JSON as JSON, and losslessly,
        as tagged JSON, ``bytes`` (NUL and 0x00-framed values included), ``str`` holding NUL,
        tuples, NamedTuples, enums, dicts with non-``str`` keys, sets, datetimes, dates, times,
        timedeltas, ``Decimal``, ``UUID`` and NaN or infinite floats. Override it for anything
        else (an arbitrary object is refused with a one-line error), together with
        ``deserialize_payload``.
        """
        return broker_payload

    def deserialize_payload(self, stored: Any) -> Any:
        """Rebuild a broker payload from what ``serialize_payload`` returned, as ``outbox.codec``
        gives it back (default: as is: by default ``advance`` receives the payload equal in
        type and value to what ``open_stream`` yielded). A NamedTuple or Enum class is rebuilt
        in a separate committer only from its ``allowed_modules``."""
        return stored

    def serialize_event(self, raw_event: Any) -> Any:
        """Turn a raw event into a value for storage (default: as is; stored by
        ``outbox.codec``, so the types ``serialize_payload`` lists are kept as they are)."""
        return raw_event

    async def aclose(self) -> None:  # noqa: B027 - a hook with an empty default
        """Close the broker connection; called once when the stream ends, best-effort."""


class _Binding:
    """What ``reject_shared_stream_event`` reaches: the event a filter is processing now."""

    __slots__ = ("reject",)

    def __init__(self, reject: Callable[[], None]) -> None:
        self.reject = reject


_current_binding: contextvars.ContextVar[_Binding | None] = contextvars.ContextVar(
    "outbox_shared_stream_binding", default=None
)


def reject_shared_stream_event() -> None:
    """Refuse the raw event the calling filter is processing.

    The subscriber's resolution of that event becomes ``rejected`` at once (no trigger event is
    stored for it, even one yielded afterwards). Outside an ack-mode binding window (fast path,
    standalone ``run()``, between two raw events, another task) it logs a warning and does
    nothing.
    """
    binding = _current_binding.get()
    if binding is None:
        log.warning("reject_shared_stream_event called outside an ack-mode binding window; ignored")
        return
    binding.reject()


def _unserialisable(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _encoder() -> Callable[[Any], str]:
    """Compact, NaN-refusing JSON encoding, built once: ``json.dumps`` with non-default options
    builds a new encoder per call, which costs four times the encoding of a small value."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython always has the C accelerator
        return lambda value: json.dumps(value, separators=(",", ":"), allow_nan=False)
    encode = make(
        None,
        _unserialisable,
        json.encoder.encode_basestring_ascii,
        None,
        ":",
        ",",
        False,
        False,
        False,
    )
    return lambda value: "".join(encode(value, 0))


_encode = _encoder()


def to_json(value: Any, *, what: str) -> str:
    """Serialise ``value`` to JSON text, or raise ``TypeError`` naming ``what`` and the fix.

    Also refuses what Postgres' ``jsonb`` cannot hold (NUL characters, lone surrogates), so
    that such a value fails here, alone, rather than the whole batch it would be written with.
    """
    try:
        text = _encode(value)
    except (TypeError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise TypeError(f"{what} is not JSON-serialisable ({reason})") from None
    except RecursionError:
        raise TypeError(f"{what} is nested too deeply to serialise; flatten it") from None
    # Rare escapes only: a NUL, or a surrogate (a non-BMP character, or a lone one).
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        raise TypeError(
            f"{what} contains a NUL character (\\u0000), which Postgres cannot store; "
            "remove it or encode the value (e.g. base64)"
        )
    if "\\ud" in text:
        try:
            json.dumps(json.loads(text), ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise TypeError(
                f"{what} contains a lone surrogate (invalid Unicode), which Postgres cannot "
                "store; decode the text properly or encode the value (e.g. base64)"
            ) from None
    return text


# ``\u0000`` as an escape, not as a backslash followed by ``u0000``.
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")

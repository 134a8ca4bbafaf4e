"""Pieces the statements share: notification channels, the SQL for a live session, and the
encodings that pass a batch's columns as one parameter each."""

from __future__ import annotations

import json
import json.scanner
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

NOTIFY_CHANNEL = "outbox_resolved"
RECORDS_CHANNEL = "outbox_records"
RECORDED_CHANNEL = "outbox_recorded"
# A delivery moved to a subscriber's newer registration (payload: stream ids).
MOVED_CHANNEL = "outbox_moved"
CONSUMER_CHANNEL = "outbox_consumer"


# The hot statements take their integer and short-text columns as one text parameter each (see
# ``ints`` and ``texts``): asyncpg encodes a list parameter element by element, which costs more
# Python time than the statement costs the server. Raw events and payloads stay text arrays.
def int_array(param: str, sql_type: str = "bigint") -> str:
    return f"CAST(string_to_array(:{param}, ',') AS {sql_type}[])"


def text_array(param: str) -> str:
    return (
        f"ARRAY(SELECT t FROM jsonb_array_elements_text(CAST(:{param} AS jsonb))"
        " WITH ORDINALITY AS a(t, i) ORDER BY i)"
    )


def ints(values: Iterable[int]) -> str:
    """An integer column for ``int_array``."""
    items = values if isinstance(values, list) else list(values)
    if items and items.count(items[0]) == len(items):
        # A constant column (a batch's stream, counts, ordinals): one conversion, a tenth of
        # the time.
        return ",".join([str(items[0])] * len(items))
    return ",".join(map(str, items))


def texts(values: Sequence[str | None]) -> str:
    """A text column (``None`` for NULL) for ``text_array``."""
    return json.dumps(values, separators=(",", ":"))


def json_array(items: Sequence[str]) -> str:
    """JSON values (already JSON text) as one JSON array, for ``jsonb_array_elements``."""
    return "[" + ",".join(items) + "]"


# Postgres prints a jsonb value as exactly one JSON value with nothing around it: the C scanner
# decodes it without ``json.loads``' Python wrapper (two regular-expression matches a call), in a
# third of the time. The committer decodes one broker payload per event it advances.
# (typeshed types make_scanner's argument as the scanner class itself: it is the decoder.)
scan_json: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(
    json.JSONDecoder()  # type: ignore[arg-type]
)


def from_jsonb(text: str) -> Any:
    return scan_json(text, 0)[0]


def holds_separator(name: str) -> bool:
    """Whether a subscriber name holds a character ``_RESOLVE`` splits its names on (a trigger
    id that does cannot subscribe)."""
    return NAME_SEPARATOR in name or EVENT_SEPARATOR in name


def separated(names: Sequence[str]) -> str:
    """``names`` as one text for ``string_to_array(..., E'\\x1f')[2:]``: each name preceded by
    the separator, so that an empty name survives the split."""
    return NAME_SEPARATOR + NAME_SEPARATOR.join(names) if names else ""


def count_state(states: dict[str, str], state: str) -> int:
    return sum(1 for s in states.values() if s == state) if states else 0


# A session is live while it is renewed; once it is not, it died at ``ended_at`` (a graceful stop,
# or the expiry a sweeper found, which it records there). What a registration is owed while its
# session is dead stays owed, for the stream's ack timeout from that death, in case the subscriber
# joins again (its triggerer restarting, or it moving to another): then it is moved over.
SESSION_LIVE = "s.ended_at IS NULL AND s.expires_at > now()"
DIED_AT = "coalesce(s.ended_at, s.expires_at)"


# The resolve statement takes a batch's subscriber names grouped by event as one text
# (``separated``): each name preceded by ``NAME_SEPARATOR``, the events' texts joined by
# ``EVENT_SEPARATOR``. Postgres splits texts faster than it groups a row per resolution (a sort,
# ``array_agg``, a hash join per record): measured 50.4 -> 45.8 us per event for the statement
# alone and +3.7% events/s end to end (bench/results, sixth pass). A name holding either character
# is refused at ``subscribe`` (``holds_separator``).
NAME_SEPARATOR: Final = "\x1f"
EVENT_SEPARATOR: Final = "\x1e"

# The registration id in a snapshot entry (``null`` for events recorded before registrations).
OWNER_ID = "(CASE WHEN jsonb_typeof(m.owner) = 'number' THEN (m.owner)::text::bigint END)"

"""``outbox.codec`` against what it replaced, per value, on the hot path's shapes.

Encoding (every raw event, broker payload and trigger event a manager stores): ``codec.encode``
against ``outbox.protocol.to_json``. Decoding: ``Codec.decode`` (a jsonb value's text) against
``outbox.store.sqlparts.from_jsonb``, and the committer's path (a lane's payloads parsed as one JSON
array, then ``Codec.decode_parsed`` each) against the parse alone. Values: a plain int, a small
dict, a Kafka payload as ``outbox.kafka`` stores it (a dict), and Airflow's ``KafkaBrokerPayload``
(a NamedTuple holding bytes; nothing stored it before, so it has no baseline).

CPU time (``time.process_time``: a busy machine's preemptions are not counted), old and new
timed in alternation, the best of ``--rounds`` rounds each.

    python bench/codec_speed.py          # 25 rounds of 20,000 calls
    python bench/codec_speed.py --tiny   # CI: 3 rounds of 2,000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import timeit
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from outbox.codec import Codec, encode
from outbox.protocol import to_json
from outbox.store.sqlparts import from_jsonb

if TYPE_CHECKING:
    from collections.abc import Callable


class KafkaBrokerPayload(NamedTuple):
    """The shape of ``airflow.providers.apache.kafka.triggers.shared_stream.KafkaBrokerPayload``
    (not imported: the benchmark runs without Airflow)."""

    topic: str
    partition: int
    offset: int
    value: Any = None
    key: Any = None


SMALL = {"n": 1, "kind": "a", "ok": True, "ratio": 0.5, "name": "hello"}
KAFKA_DICT = {
    "topic": "orders",
    "partition": 3,
    "offset": 123456,
    "key": "a2V5LTE=",
    "value": "AAAAAAF7ImEiOjF9",
}
KAFKA_TUPLE = KafkaBrokerPayload("orders", 3, 123456, b"\x00\x00\x00\x00\x01{'a':1}", b"key-1")
VALUES: dict[str, Any] = {
    "int": 123456,
    "small dict": SMALL,
    "Kafka dict": KAFKA_DICT,
    "KafkaBrokerPayload": KAFKA_TUPLE,
}
LANE = 1000  # payloads per committer read


def best_pair(
    old: Callable[[], object] | None, new: Callable[[], object], calls: int, rounds: int
) -> tuple[float | None, float]:
    """Nanoseconds per call of ``old`` and ``new``, the best of ``rounds`` alternating rounds."""
    olds: list[float] = []
    news: list[float] = []
    for _ in range(rounds):
        if old is not None:
            olds.append(timeit.Timer(old, timer=time.process_time).timeit(calls))
        news.append(timeit.Timer(new, timer=time.process_time).timeit(calls))
    return (min(olds) / calls * 1e9 if olds else None), min(news) / calls * 1e9


def _plain(value: Any) -> bool:
    try:
        to_json(value, what="value")
    except TypeError:
        return False
    return True


def measure_value(name: str, value: Any, calls: int, rounds: int) -> dict[str, Any]:
    codec = Codec()
    text = encode(value, what="value")
    plain = _plain(value)
    if plain:
        assert text == to_json(value, what="value")
    encode_old, encode_new = best_pair(
        (lambda: to_json(value, what="value")) if plain else None,
        lambda: encode(value, what="value"),
        calls,
        rounds,
    )
    decode_old, decode_new = best_pair(
        (lambda: from_jsonb(text)) if plain else None, lambda: codec.decode(text), calls, rounds
    )
    lane = "[" + ",".join([text] * LANE) + "]"
    decode_parsed = codec.decode_parsed
    lane_old, lane_new = best_pair(
        (lambda: from_jsonb(lane)) if plain else None,
        lambda: [decode_parsed(p) for p in from_jsonb(lane)],
        max(1, calls // LANE),
        rounds,
    )
    return {
        "value": name,
        "encode_ns": encode_new,
        "to_json_ns": encode_old,
        "decode_ns": decode_new,
        "from_jsonb_ns": decode_old,
        "committer_decode_ns": lane_new / LANE,
        "committer_parse_ns": None if lane_old is None else lane_old / LANE,
    }


def _ratio(new: float, old: float | None) -> str:
    return "-" if old is None else f"{new / old:.2f}"


def _ns(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CI size: 3 rounds of 2,000 calls")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--json", action="store_true", help="one JSON line per value")
    args = parser.parse_args()
    rounds, calls = (3, 2_000) if args.tiny else (args.rounds, args.calls)
    rows = [measure_value(name, value, calls, rounds) for name, value in VALUES.items()]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"ns per value, best of {rounds} rounds of {calls:,} (CPU time)")
    header = (
        f"{'value':20} {'encode':>8} {'to_json':>8} {'x':>5}   {'decode':>8} {'from_jsonb':>11}"
        f" {'x':>5}   {'committer':>9} {'parse only':>10} {'x':>5}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['value']:20} {_ns(r['encode_ns']):>8} {_ns(r['to_json_ns']):>8} "
            f"{_ratio(r['encode_ns'], r['to_json_ns']):>5}   {_ns(r['decode_ns']):>8} "
            f"{_ns(r['from_jsonb_ns']):>11} {_ratio(r['decode_ns'], r['from_jsonb_ns']):>5}   "
            f"{_ns(r['committer_decode_ns']):>9} {_ns(r['committer_parse_ns']):>10} "
            f"{_ratio(r['committer_decode_ns'], r['committer_parse_ns']):>5}"
        )


if __name__ == "__main__":
    main()

"""DAG file for the real-triggerer tests (copied into a test's DAGs folder by
tests/airflow_triggerer.py, with its parameters in ``kafka_watchers.json`` beside it).

N assets, each watched by the Kafka provider's ``KafkaSharedStreamTrigger`` on the SAME topic and
connection (so all of them subscribe to one shared stream), and one DAG scheduled on each asset.
Airflow stores one trigger per distinct (class path, kwargs) and lets identical watchers share
it; ``poll_timeout`` (not part of ``shared_stream_key()``) differs by a millisecond per asset so
that each asset gets its own trigger, i.e. its own subscriber.
"""

from __future__ import annotations

import json
from pathlib import Path

from airflow.providers.apache.kafka.triggers.shared_stream import KafkaSharedStreamTrigger
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, Asset, AssetWatcher

PARAMS = json.loads(Path(__file__).with_suffix(".json").read_text())

for i in range(PARAMS["assets"]):
    trigger = KafkaSharedStreamTrigger(
        topics=[PARAMS["topic"]],
        kafka_config_id=PARAMS["kafka_config_id"],
        poll_timeout=PARAMS["poll_timeout"] + i / 1000,
    )
    asset = Asset(name=f"asset_{i}", watchers=[AssetWatcher(name=f"watcher_{i}", trigger=trigger)])
    with DAG(dag_id=f"on_asset_{i}", schedule=[asset], catchup=False):
        EmptyOperator(task_id="noop")

"""End to end on the real stack: PostgreSQL -> Debezium -> Kafka -> Spark -> ClickHouse. After the
stream catches up, ClickHouse `FINAL` (deleted rows hidden) equals PostgreSQL row for row, every column."""

from __future__ import annotations

import json
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from clickhouse_connect.driver.client import Client
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from cdc_pipeline.clickhouse import connect_clickhouse
from cdc_pipeline.resources import KafkaResource
from cdc_pipeline.settings import Settings
from cdc_pipeline.stack.stack import LocalStack
from cdc_pipeline.workload.ecommerce import TABLES, Workload, create_schema
from cdc_pipeline_tests.replica import RunningPipeline, pipeline_for_schema

pytestmark = pytest.mark.integration


@pytest.fixture
def source(settings: Settings, local_stack: LocalStack) -> Iterator[psycopg.Connection]:
    with psycopg.connect(settings.postgres_conninfo(), autocommit=True) as conn:
        yield conn


@pytest.fixture
def clickhouse(settings: Settings, local_stack: LocalStack) -> Iterator[Client]:
    client = connect_clickhouse(settings.clickhouse_endpoint, settings.clickhouse_user)
    yield client
    client.close()


@pytest.fixture
def shop(
    settings: Settings, source: psycopg.Connection, unique_name: str, tmp_path: Path
) -> Iterator[tuple[RunningPipeline, Workload]]:
    """The e-commerce schema with rows already present before the connector starts (snapshot)."""
    create_schema(source, unique_name)
    workload = Workload(unique_name, seed=int(unique_name[2:], 16) % 10_000)
    for table in TABLES:
        for _ in range(50):
            workload.insert(source, table)
    with pipeline_for_schema(settings, unique_name, list(TABLES), tmp_path) as running:
        yield running, workload


def test_snapshot_and_random_changes_arrive_exactly(shop, source: psycopg.Connection, clickhouse: Client) -> None:  # noqa: ANN001
    running, workload = shop
    running.start_stream()
    workload.run(source, 3000)
    assert running.wait_until_replica_matches(source, clickhouse, list(TABLES), timeout=600) > 500


def test_driver_killed_mid_stream_resumes_without_loss_or_duplicates(
    shop, source: psycopg.Connection, clickhouse: Client
) -> None:  # noqa: ANN001
    running, workload = shop
    rng = random.Random(7)
    for _round in range(3):
        running.start_stream()
        workload.run(source, 600)
        time.sleep(rng.uniform(15, 35))  # somewhere in the middle of startup or a batch
        running.kill_stream(signal.SIGKILL)
    running.start_stream()
    workload.run(source, 300)
    assert running.wait_until_replica_matches(source, clickhouse, list(TABLES), timeout=600) > 500
    # wait_until_replica_matches also fails on any duplicate key in the FINAL view.


def test_poison_records_go_to_the_dlq_and_the_stream_keeps_going(
    shop,
    settings: Settings,
    source: psycopg.Connection,
    clickhouse: Client,  # noqa: ANN001
) -> None:
    running, workload = shop
    running.start_stream()
    workload.run(source, 200)
    running.wait_until_replica_matches(source, clickhouse, list(TABLES), timeout=600)

    topic = running.config.topic_for(running.config.table(f"{running.schema}.customers"))
    kafka = KafkaResource(bootstrap_servers=settings.kafka_bootstrap_servers)
    # A real record of the topic, to make well-formed envelopes with one bad value.
    consumer = kafka.consumer(f"{running.schema}-peek")
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    template = None
    while template is None:
        message = consumer.poll(10)
        if message is not None and message.error() is None and message.value():
            template = json.loads(message.value())
    consumer.close()
    bad_int = json.loads(json.dumps(template))
    bad_int["payload"]["op"] = "u"
    bad_int["payload"]["after"]["loyalty_points"] = "lots"
    bad_date = json.loads(json.dumps(template))
    bad_date["payload"]["op"] = "u"
    bad_date["payload"]["after"]["created_at"] = "2400-01-01T00:00:00Z"  # beyond DateTime64's range
    no_key_op = json.loads(json.dumps(template))
    no_key_op["payload"]["op"] = "x"
    poison = {
        b"malformed": (b'{"payload":{"id":999999}}', b"{this is not json"),
        b"unknown op": (b'{"payload":{"id":999998}}', json.dumps(no_key_op).encode()),
        b"missing key": (None, json.dumps({**template, "payload": {**template["payload"], "op": "c"}}).encode()),
        b"conversion failed": (json.dumps({"payload": {"id": 1}}).encode(), json.dumps(bad_int).encode()),
        b"range": (json.dumps({"payload": {"id": 2}}).encode(), json.dumps(bad_date).encode()),
    }
    producer = kafka.producer()
    for key, value in poison.values():
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0

    workload.run(source, 300)  # valid changes keep flowing around the poison
    running.wait_until_replica_matches(source, clickhouse, list(TABLES), timeout=600)
    assert running.stream_alive()

    dead = kafka.consumer(f"{running.schema}-dlq")
    dead.assign([TopicPartition(running.config.dlq_topic, 0, OFFSET_BEGINNING)])
    letters = []
    deadline = time.monotonic() + 120
    while len(letters) < len(poison) and time.monotonic() < deadline:
        message = dead.poll(2)
        if message is not None and message.error() is None:
            letters.append(message)
    dead.close()
    assert len(letters) == len(poison), [dict(m.headers()) for m in letters]
    by_value = {m.value(): dict(m.headers()) for m in letters}
    for _key, value in poison.values():
        headers = by_value[value]  # the original value, byte for byte
        assert headers["cdc.source.topic"] == topic.encode()
        assert headers["cdc.error"]
        assert int(headers["cdc.source.offset"]) >= 0
    reasons = b" | ".join(h["cdc.error"] for h in by_value.values())
    for expected in (b"malformed", b"unknown op", b"missing key", b"conversion failed", b"DateTime64"):
        assert expected in reasons, reasons


def test_added_column_appears_while_the_stream_runs(shop, source: psycopg.Connection, clickhouse: Client) -> None:  # noqa: ANN001
    running, workload = shop
    running.start_stream()
    workload.run(source, 200)
    running.wait_until_replica_matches(source, clickhouse, list(TABLES), timeout=600)
    source.execute(f'ALTER TABLE "{running.schema}".customers ADD COLUMN nickname text')
    source.execute(f"UPDATE \"{running.schema}\".customers SET nickname = 'nick ' || id WHERE id % 3 = 0")
    workload.run(source, 200)
    running.wait_until_replica_matches(source, clickhouse, list(TABLES), timeout=600)
    columns = clickhouse.query(
        "SELECT name FROM system.columns WHERE database = {d:String} AND table = 'customers'",
        parameters={"d": running.database},
    ).result_columns[0]
    assert "nickname" in columns

"""Given the local stack, each service does its job for real: logical replication, Kafka round trips,
Debezium capturing an INSERT, and every Dagster resource's health probe."""

from __future__ import annotations

import json
import time
from typing import Any

import psycopg
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from psycopg import sql

from cdc_pipeline.defs.health import check_services
from cdc_pipeline.jvm import DEBEZIUM_CONNECTOR_CLASS
from cdc_pipeline.resources import (
    ClickHouseResource,
    KafkaConnectResource,
    KafkaResource,
    PostgresResource,
    SparkResource,
    build_resources,
)
from cdc_pipeline.settings import Settings
from cdc_pipeline.stack.lifecycle import LocalStack
from cdc_pipeline_tests.conftest import wait_for

pytestmark = pytest.mark.integration


def test_postgres_logical_replication_slot_sees_an_insert(local_stack: LocalStack, unique_name: str) -> None:
    conninfo = local_stack.settings.postgres_conninfo()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, name text)").format(sql.Identifier(unique_name)))
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (unique_name,))
        try:
            conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'ada')").format(sql.Identifier(unique_name)))
            changes = [
                row[0]
                for row in conn.execute("SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL)", (unique_name,))
            ]
        finally:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (unique_name,))
    assert any(f"table public.{unique_name}: INSERT: id[integer]:1 name[text]:'ada'" in c for c in changes), changes


def test_kafka_produce_consume_round_trip(settings: Settings, local_stack: LocalStack, unique_name: str) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
    for i in range(10):
        producer.produce(unique_name, key=str(i).encode(), value=json.dumps({"n": i}).encode())
    assert producer.flush(30) == 0

    consumer = Consumer({
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "group.id": unique_name,
        "auto.offset.reset": "earliest",
    })  # fmt: skip
    consumer.subscribe([unique_name])
    received: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 60
        while len(received) < 10 and time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is not None and message.error() is None:
                received.append(json.loads(message.value()))
    finally:
        consumer.close()
    assert [r["n"] for r in received] == list(range(10))


def test_debezium_connector_emits_an_event_for_an_insert(
    settings: Settings, local_stack: LocalStack, unique_name: str
) -> None:
    connect = KafkaConnectResource(url=settings.connect_url)
    assert DEBEZIUM_CONNECTOR_CLASS in {p["class"] for p in connect.connector_plugins()}

    params = settings.postgres_params
    with psycopg.connect(settings.postgres_conninfo(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, name text)").format(sql.Identifier(unique_name)))
    config = {
        "connector.class": DEBEZIUM_CONNECTOR_CLASS,
        "database.hostname": params["host"],
        "database.port": params["port"],
        "database.user": params["user"],
        # Resolved inside the Connect worker from its environment: the secret is never in the config.
        "database.password": "${env:CDC_POSTGRES_PASSWORD}",
        "database.dbname": params["dbname"],
        "topic.prefix": unique_name,
        "plugin.name": "pgoutput",
        "slot.name": unique_name,
        "slot.drop.on.stop": "true",
        "publication.name": f"{unique_name}_pub",
        "publication.autocreate.mode": "filtered",
        "table.include.list": f"public.{unique_name}",
        "key.converter": "org.apache.kafka.connect.json.JsonConverter",
        "key.converter.schemas.enable": "false",
        "value.converter": "org.apache.kafka.connect.json.JsonConverter",
        "value.converter.schemas.enable": "false",
    }
    connect.put_connector_config(unique_name, config)
    assert connect.put_connector_config(unique_name, config)["name"] == unique_name  # PUT is idempotent
    try:
        wait_for(
            lambda: (
                (s := connect.connector_status(unique_name))["connector"]["state"] == "RUNNING"
                and s["tasks"]
                and s["tasks"][0]["state"] == "RUNNING"
            ),
            120,
            "the connector and its task to run",
        )
        secret = settings.postgres_password.get_secret_value()
        stored = connect.connector_config(unique_name)
        assert stored["database.password"] == "${env:CDC_POSTGRES_PASSWORD}"
        assert secret not in json.dumps(stored) and secret not in json.dumps(connect.connector_status(unique_name))

        topic = f"{unique_name}.public.{unique_name}"
        kafka = KafkaResource(bootstrap_servers=settings.kafka_bootstrap_servers)
        admin = kafka.admin()
        inserted = iter(range(1, 10_000))

        def insert_until_topic_exists() -> bool:
            # Debezium creates the topic with the first event; the task may still be starting.
            with psycopg.connect(settings.postgres_conninfo(), autocommit=True) as conn:
                conn.execute(
                    sql.SQL("INSERT INTO {} VALUES (%s, 'ada')").format(sql.Identifier(unique_name)), (next(inserted),)
                )
            return topic in admin.list_topics(timeout=10).topics

        wait_for(insert_until_topic_exists, 120, f"topic {topic}", interval=2)
        consumer = kafka.consumer(unique_name)
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        event = None
        try:
            deadline = time.monotonic() + 60
            while event is None and time.monotonic() < deadline:
                message = consumer.poll(1.0)
                if message is not None and message.error() is None and message.value():
                    value = json.loads(message.value())
                    if value.get("op") == "c":
                        event = (message.key(), value)
        finally:
            consumer.close()
        assert event is not None, "no Debezium create event arrived"
        key, value = event
        assert json.loads(key)["id"] == value["after"]["id"]
        assert value["after"]["name"] == "ada"
        assert value["source"]["table"] == unique_name
    finally:
        connect.delete(unique_name)


def test_every_resource_is_healthy(settings: Settings, local_stack: LocalStack) -> None:
    password = settings.postgres_password.get_secret_value() if settings.postgres_password else None
    resources = [
        PostgresResource(dsn=settings.postgres_dsn, password=password),
        KafkaResource(bootstrap_servers=settings.kafka_bootstrap_servers),
        KafkaConnectResource(url=settings.connect_url),
        SparkResource(master=settings.spark_master),
        ClickHouseResource(
            url=settings.clickhouse_endpoint,
            password=settings.clickhouse_password.get_secret_value() if settings.clickhouse_password else None,
            database=settings.clickhouse_database,
        ),
    ]
    for resource in resources:
        result = resource.health()
        assert result.ok, f"{type(resource).__name__}: {result.detail}"


def test_health_job_runs_in_dagster_with_env_resources(local_stack: LocalStack) -> None:
    result = check_services.execute_in_process(resources=build_resources())
    assert result.success


def test_health_job_fails_and_names_the_broken_service(local_stack: LocalStack) -> None:
    resources = build_resources()
    resources["kafka_connect"] = KafkaConnectResource(url="http://127.0.0.1:9")  # nothing listens there
    result = check_services.execute_in_process(resources=resources, raise_on_error=False)
    assert not result.success
    failure = result.failure_data_for_node("probe_services")
    assert failure is not None and "kafka_connect" in failure.error.message

"""The Debezium connector config rendered from the pipeline definition (pure), and one real run:
provisioned twice, running, and capturing an INSERT with exact decimals and source types."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition
from psycopg import sql

from cdc_pipeline.config import PipelineConfig, load_pipeline_config, parse_pipeline_config
from cdc_pipeline.connector import (
    DEBEZIUM_CONNECTOR_CLASS,
    connector_config,
    connector_name,
    prepare_source,
    provision_connector,
)
from cdc_pipeline.control.source import UnsupportedSnapshotName, snapshot_collection
from cdc_pipeline.kafka_connect import ConnectError
from cdc_pipeline.resources import KafkaConnectResource, KafkaResource
from cdc_pipeline.settings import Settings
from cdc_pipeline.stack.lifecycle import LocalStack
from cdc_pipeline_tests.conftest import REPO_ROOT
from cdc_pipeline_tests.test_stack_services import wait_for

EXPECTED_PROPERTIES = {
    "connector.class",
    "tasks.max",
    "database.hostname",
    "database.port",
    "database.user",
    "database.password",
    "database.dbname",
    "topic.prefix",
    "plugin.name",
    "slot.name",
    "publication.name",
    "publication.autocreate.mode",
    "snapshot.mode",
    "table.include.list",
    "column.propagate.source.type",
    "column.exclude.list",
    "message.key.columns",
    "decimal.handling.mode",
    "time.precision.mode",
    "interval.handling.mode",
    "binary.handling.mode",
    "hstore.handling.mode",
    "poll.interval.ms",
    "max.batch.size",
    "max.queue.size",
    "max.queue.size.in.bytes",
    "skipped.operations",
    "tombstones.on.delete",
    "signal.enabled.channels",
    "signal.data.collection",
    "incremental.snapshot.chunk.size",
    "notification.enabled.channels",
    "notification.sink.topic.name",
    "heartbeat.interval.ms",
    "heartbeat.action.query",
    "key.converter",
    "key.converter.schemas.enable",
    "value.converter",
    "value.converter.schemas.enable",
    "topic.creation.default.partitions",
    "topic.creation.default.replication.factor",
}


@pytest.fixture
def offline_settings() -> Settings:
    return Settings(_env_file=None, postgres_dsn="postgresql://cdc@db.example:6543/shop", postgres_password="s3cret")


@pytest.fixture
def example() -> PipelineConfig:
    return load_pipeline_config(REPO_ROOT / "pipeline.yaml")


def test_example_pipeline_renders_every_property(example: PipelineConfig, offline_settings: Settings) -> None:
    config = connector_config(example, offline_settings)
    assert set(config) == EXPECTED_PROPERTIES
    assert all(isinstance(value, str) for value in config.values())
    assert connector_name(example) == "cdc-shop-postgres"
    assert config["connector.class"] == DEBEZIUM_CONNECTOR_CLASS
    assert (config["database.hostname"], config["database.port"]) == ("db.example", "6543")
    assert (config["database.user"], config["database.dbname"]) == ("cdc", "shop")
    assert (config["topic.prefix"], config["slot.name"], config["publication.name"]) == ("shop", "cdc_shop", "cdc_shop")
    assert config["plugin.name"] == "pgoutput"
    assert config["decimal.handling.mode"] == "string"
    assert config["skipped.operations"] == "none"  # truncates must reach the sink
    assert config["value.converter.schemas.enable"] == "true"
    assert config["signal.data.collection"] == "public.cdc_signal"
    # Backfills learn from Debezium's notifications that a snapshot finished.
    assert (config["notification.enabled.channels"], config["notification.sink.topic.name"]) == (
        "sink",
        "shop.notifications",
    )
    assert config["heartbeat.action.query"] == (
        'INSERT INTO "public"."cdc_heartbeat" (id, ts) VALUES (1, now()) '
        "ON CONFLICT (id) DO UPDATE SET ts = EXCLUDED.ts"
    )


def test_password_is_an_env_reference_never_the_secret(example: PipelineConfig, offline_settings: Settings) -> None:
    config = connector_config(example, offline_settings)
    assert config["database.password"] == "${env:CDC_POSTGRES_PASSWORD}"
    assert "s3cret" not in json.dumps(config)


def test_capture_is_tuned_for_throughput_and_latency_and_the_pipeline_can_override_it(
    example: PipelineConfig, offline_settings: Settings
) -> None:
    config = connector_config(example, offline_settings)
    # Debezium's 500 ms idle sleep would delay every change committed while its queue is empty.
    assert int(config["poll.interval.ms"]) <= 100
    assert int(config["max.batch.size"]) < int(config["max.queue.size"])
    assert 0 < int(config["max.queue.size.in.bytes"]) <= 128 << 20  # wide rows cannot fill the worker's heap
    tuned = example.model_copy(
        update={"source": example.source.model_copy(update={"connector_properties": {"poll.interval.ms": "500"}})}
    )
    assert connector_config(tuned, offline_settings)["poll.interval.ms"] == "500"


def test_include_lists_are_escaped_regexes(example: PipelineConfig, offline_settings: Settings) -> None:
    config = connector_config(example, offline_settings)
    assert config["table.include.list"].split(",") == [
        r"public\.customers",
        r"public\.products",
        r"public\.orders",
        r"public\.order_items",
        r"public\.cdc_signal",
        r"public\.cdc_heartbeat",
    ]
    assert config["column.propagate.source.type"].split(",")[0] == r"public\.customers\..+"


def test_primary_key_override_renders_message_key_columns(offline_settings: Settings) -> None:
    pipeline = parse_pipeline_config({
        "name": "shop",
        "tables": [
            {"name": "public.order_items", "primary_key": ["order_id", "line_no"]},
            {"name": "public.orders"},
            {"name": "public.events", "primary_key": ["event_id"]},
        ],
    })  # fmt: skip
    config = connector_config(pipeline, offline_settings)
    assert config["message.key.columns"] == r"public\.order_items:order_id,line_no;public\.events:event_id"


def test_without_overrides_or_heartbeat_the_optional_properties_are_absent(offline_settings: Settings) -> None:
    pipeline = parse_pipeline_config({"name": "shop", "tables": [{"name": "public.orders"}]})
    config = connector_config(pipeline, offline_settings)
    assert not {"message.key.columns", "column.exclude.list", "heartbeat.action.query"} & set(config)
    assert config["table.include.list"] == r"public\.orders,public\.cdc_signal"


def test_column_include_and_exclude_render_as_one_exclude_list(offline_settings: Settings) -> None:
    pipeline = parse_pipeline_config({
        "name": "shop",
        "tables": [
            {"name": "public.customers", "columns": {"exclude": ["password_hash", "ssn"]}},
            {"name": "public.orders"},
            {"name": "public.products", "columns": {"include": ["id", "sku", "price"]}},
        ],
    })  # fmt: skip
    exclusions = connector_config(pipeline, offline_settings)["column.exclude.list"].split(",")
    assert exclusions == [
        r"public\.customers\.password_hash",
        r"public\.customers\.ssn",
        r"public\.products\.(?!(?:id|sku|price)$).+",
    ]


def test_quoted_names_render_as_exact_case_sensitive_regexes(offline_settings: Settings) -> None:
    pipeline = parse_pipeline_config({
        "name": "shop",
        "source": {"schemas": ["public", '"Sales"'], "signal_table": 'public."cdc signal"'},
        "tables": [
            {"name": 'public."User"', "primary_key": ['"createdAt"', "id"], "columns": {"exclude": ['"displayName"']}},
            {"name": '"Sales"."Order Item"', "columns": {"include": ['"orderId"', "qty"]}},
            {"name": 'public."x:y;z"'},
            {"name": "public.orders"},
        ],
    })  # fmt: skip
    config = connector_config(pipeline, offline_settings)
    # `(?-i)`: Debezium compiles these case-insensitively, which would also capture a table "user". Characters
    # other than letters, digits, '_' and '.' are \x{...} escapes: Debezium splits these lists on ',', ';' and
    # ':' and trims spaces, before it compiles the regexes.
    assert config["table.include.list"].split(",") == [
        r"(?-i)public\.User",
        r"(?-i)Sales\.Order\x{20}Item",
        r"(?-i)public\.x\x{3a}y\x{3b}z",
        r"(?-i)public\.orders",
        r"(?-i)public\.cdc\x{20}signal",
    ]
    assert config["column.exclude.list"].split(",") == [
        r"(?-i)public\.User\.displayName",
        r"(?-i)Sales\.Order\x{20}Item\.(?!(?:orderId|qty)$).+",
    ]
    assert config["message.key.columns"] == r"(?-i)public\.User:createdAt,id"
    assert config["column.propagate.source.type"].split(",")[1] == r"(?-i)Sales\.Order\x{20}Item\..+"
    # Parsed by Debezium's identifier parser: double quotes keep the space.
    assert config["signal.data.collection"] == 'public."cdc signal"'


def test_snapshot_signals_name_quoted_tables_as_debezium_parses_them() -> None:
    pipeline = parse_pipeline_config({
        "name": "shop",
        "tables": [{"name": 'public."User"'}, {"name": 'public."Order Item"'}, {"name": 'public."a(b).c"'}],
    })  # fmt: skip
    user, spaced, odd = pipeline.tables
    # A plain name: an exact regex; Debezium parses the identifier it matches (public.User).
    assert snapshot_collection(user) == (r"(?-i)public\.User", r"(?-i)public\.User")
    # A space (or dot, or quote) would be split by Debezium's parser: double quotes, which match no identifier
    # as a regex and so are parsed as they are; the condition's regex matches that text.
    assert snapshot_collection(spaced) == (
        '"public"."Order Item"',
        r"(?-i)\x{22}public\x{22}\.\x{22}Order\x{20}Item\x{22}",
    )
    with pytest.raises(UnsupportedSnapshotName, match=r'public\."a\(b\)\.c": a name with a dot'):
        snapshot_collection(odd)


@pytest.mark.integration
def test_provisioned_connector_captures_an_insert(
    settings: Settings, local_stack: LocalStack, unique_name: str
) -> None:
    orders, signal, heartbeat = f"{unique_name}_orders", f"{unique_name}_signal", f"{unique_name}_heartbeat"
    pipeline = parse_pipeline_config({
        "name": unique_name,
        "source": {
            "signal_table": f"public.{signal}",
            "heartbeat_table": f"public.{heartbeat}",
            "heartbeat_interval_ms": 1000,
        },
        "tables": [{"name": orders}],
    })  # fmt: skip
    connect = KafkaConnectResource(url=settings.connect_url)
    kafka = KafkaResource(bootstrap_servers=settings.kafka_bootstrap_servers)
    conninfo = settings.postgres_conninfo()
    name = connector_name(pipeline)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, amount numeric(12,2) NOT NULL, note text)").format(
                sql.Identifier(orders)
            )
        )
    try:
        assert prepare_source(conninfo, pipeline) == [
            f"created table public.{signal}",
            f"created table public.{heartbeat}",
        ]
        assert prepare_source(conninfo, pipeline) == []
        stored = provision_connector(connect, pipeline, settings)
        assert stored == {**connector_config(pipeline, settings), "name": name}
        assert provision_connector(connect, pipeline, settings) == stored
        wait_for(lambda: connector_running(connect, name), 120, "the connector and its task to run")

        topic = pipeline.topic_for(pipeline.tables[0])
        admin = kafka.admin()
        inserted = iter(range(1, 10_000))

        def insert_until_topic_exists() -> bool:
            # Debezium creates the topic with the first event; the task may still be starting its stream.
            with psycopg.connect(conninfo, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("INSERT INTO {} VALUES (%s, %s, 'x')").format(sql.Identifier(orders)),
                    (next(inserted), Decimal("1234567890.05")),
                )
            return topic in admin.list_topics(timeout=10).topics

        wait_for(insert_until_topic_exists, 120, f"topic {topic}", interval=2)
        event = first_create_event(kafka, topic, unique_name)
        payload, schema = event["payload"], event["schema"]
        assert payload["op"] == "c"
        assert payload["after"]["amount"] == "1234567890.05"
        after = next(field for field in schema["fields"] if field["field"] == "after")
        amount = next(field for field in after["fields"] if field["field"] == "amount")
        assert amount["type"] == "string"
        assert amount["parameters"]["__debezium.source.column.type"] == "NUMERIC"
        assert amount["parameters"]["__debezium.source.column.length"] == "12"
        assert amount["parameters"]["__debezium.source.column.scale"] == "2"

        with psycopg.connect(conninfo, autocommit=True) as conn:
            published = conn.execute(
                "SELECT tablename FROM pg_publication_tables WHERE pubname = %s", (pipeline.publication_name,)
            ).fetchall()
            assert {row[0] for row in published} == {orders, signal, heartbeat}
            heartbeat_row = sql.SQL("SELECT ts FROM {} WHERE id = 1").format(sql.Identifier(heartbeat))
            wait_for(lambda: conn.execute(heartbeat_row).fetchone(), 30, "the connector's heartbeat row")
    finally:
        cleanup(connect, conninfo, pipeline, name, [orders, signal, heartbeat])


def connector_running(connect: KafkaConnectResource, name: str) -> bool:
    try:
        status = connect.connector_status(name)
    except ConnectError:
        return False  # Connect answers 404 until the herder has started the new connector
    tasks = status["tasks"]
    return status["connector"]["state"] == "RUNNING" and bool(tasks) and tasks[0]["state"] == "RUNNING"


def first_create_event(kafka: KafkaResource, topic: str, group: str) -> dict[str, Any]:
    consumer = kafka.consumer(group)
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is not None and message.error() is None and message.value():
                value = json.loads(message.value())
                if value.get("payload", {}).get("op") == "c":
                    return value
    finally:
        consumer.close()
    raise AssertionError(f"no Debezium create event arrived on {topic}")


def cleanup(
    connect: KafkaConnectResource, conninfo: str, pipeline: PipelineConfig, name: str, tables: list[str]
) -> None:
    if name in connect.connectors():
        connect.delete(name)
    with psycopg.connect(conninfo, autocommit=True) as conn:

        def slot_released() -> bool:
            row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (pipeline.slot_name,))
            active = row.fetchone()
            return active is None or not active[0]

        # The task lets go of the slot asynchronously after the DELETE; dropping an active slot fails.
        wait_for(slot_released, 60, f"slot {pipeline.slot_name} to become inactive")
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
            (pipeline.slot_name,),
        )
        conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(pipeline.publication_name)))
        for table in tables:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))

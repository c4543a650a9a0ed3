"""End to end on the real stack: PostgreSQL -> Debezium -> Kafka -> Spark -> ClickHouse. After the
stream catches up, ClickHouse `FINAL` (deleted rows hidden) equals PostgreSQL row for row, every column."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pyspark
import pytest
from clickhouse_connect.driver.client import Client
from confluent_kafka import OFFSET_BEGINNING, Producer, TopicPartition
from psycopg import sql

from cdc_pipeline.config import PipelineConfig
from cdc_pipeline.process import port_open
from cdc_pipeline.resources import KafkaResource
from cdc_pipeline.settings import Settings
from cdc_pipeline.stack.lifecycle import LocalStack
from cdc_pipeline.workload.ecommerce import TABLES, Workload, create_schema
from cdc_pipeline_tests.conftest import free_ports, stop_process_group
from cdc_pipeline_tests.replica import RunningPipeline, pipeline_for_schema
from cdc_pipeline_tests.test_stack_services import wait_for

pytestmark = pytest.mark.integration


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


def test_snapshot_and_random_changes_arrive_exactly(
    shop: tuple[RunningPipeline, Workload],
    settings: Settings,
    source: psycopg.Connection,
    clickhouse: Client,
) -> None:
    running, workload = shop
    running.start_stream()
    workload.run(source, 3000)
    assert running.wait_until_replica_matches(source, clickhouse, list(TABLES), timeout=600) > 500

    # Progress is readable without the driver, and the consumer group shows what was processed. The stream
    # records a batch's progress after committing it: the replica can match a moment before.
    def progress_recorded() -> bool:
        applied = clickhouse.command(
            "SELECT sum(applied_rows) + sum(deleted_rows) FROM {db:Identifier}._cdc_stream_progress "
            "WHERE query_name = {q:String}",
            parameters={"db": running.database, "q": running.config.query_name},
        )
        return int(applied) > 0

    wait_for(progress_recorded, 120, "the stream's progress table to show applied rows")
    consumer = KafkaResource(bootstrap_servers=settings.kafka_bootstrap_servers).consumer(running.config.consumer_group)
    try:

        def committed_to_the_end() -> bool:
            for topic in running.config.topics():
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
                (committed,) = consumer.committed([TopicPartition(topic, 0)], timeout=10)
                if committed.offset != high:
                    return False
            return True

        wait_for(committed_to_the_end, 120, "the stream's consumer group to reach the end of every topic")
    finally:
        consumer.close()


def test_driver_killed_mid_stream_resumes_without_loss_or_duplicates(
    shop, source: psycopg.Connection, clickhouse: Client
) -> None:
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
    shop: tuple[RunningPipeline, Workload],
    settings: Settings,
    source: psycopg.Connection,
    clickhouse: Client,
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
    # Keys the workload never writes: a poison value superseded in its micro-batch by a newer change of
    # the same key is (by design) never converted, so it would not reach the DLQ.
    bad_int = json.loads(json.dumps(template))
    bad_int["payload"]["op"] = "u"
    bad_int["payload"]["after"]["id"] = 999_990
    bad_int["payload"]["after"]["loyalty_points"] = "lots"
    bad_date = json.loads(json.dumps(template))
    bad_date["payload"]["op"] = "u"
    bad_date["payload"]["after"]["id"] = 999_991
    # Not a timestamp at all (out-of-range timestamps are clamped by default, see test_exactness.py).
    bad_date["payload"]["after"]["created_at"] = "the day after tomorrow"
    no_key_op = json.loads(json.dumps(template))
    no_key_op["payload"]["op"] = "x"
    poison = {
        b"malformed": (b'{"payload":{"id":999999}}', b"{this is not json"),
        b"unknown op": (b'{"payload":{"id":999998}}', json.dumps(no_key_op).encode()),
        b"missing key": (None, json.dumps({**template, "payload": {**template["payload"], "op": "c"}}).encode()),
        b"conversion failed": (json.dumps({"payload": {"id": 999_990}}).encode(), json.dumps(bad_int).encode()),
        b"timestamp": (json.dumps({"payload": {"id": 999_991}}).encode(), json.dumps(bad_date).encode()),
        # Bytes that are not text at all (invalid UTF-8, NUL), as key and value.
        b"random bytes": (bytes(range(255, 127, -1)), bytes(range(256))[::-1] * 4),
    }
    producer = Producer(kafka.client_settings())
    for key, value in poison.values():
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0

    # The poison arrives alone (nothing else is written meanwhile), so its micro-batch holds no record with a
    # key schema: the keyless-schema records must convert with the replica's own key.
    dead = kafka.consumer(f"{running.schema}-dlq")
    dead.assign([TopicPartition(running.config.dlq_topic, 0, OFFSET_BEGINNING)])
    letters = []
    deadline = time.monotonic() + 300
    while len(letters) < len(poison) and time.monotonic() < deadline:
        message = dead.poll(2)
        if message is not None and message.error() is None:
            letters.append(message)
    dead.close()

    workload.run(source, 300)  # valid changes keep flowing around the poison
    running.wait_until_replica_matches(source, clickhouse, list(TABLES), timeout=600)
    assert running.stream_alive()
    assert len(letters) == len(poison), [dict(m.headers()) for m in letters]
    by_value = {m.value(): dict(m.headers()) for m in letters}
    for _key, value in poison.values():
        headers = by_value[value]  # the original value, byte for byte
        assert headers["cdc.source.topic"] == topic.encode()
        assert headers["cdc.error"]
        assert int(headers["cdc.source.offset"]) >= 0
    reasons = b" | ".join(h["cdc.error"] for h in by_value.values())
    for expected in (b"malformed", b"unknown op", b"missing key", b"conversion failed", b"ISO 8601"):
        assert expected in reasons, (reasons, running.log_tail())
    assert by_value[poison[b"random bytes"][1]]["cdc.error"].startswith(b"malformed"), by_value


def test_added_column_appears_while_the_stream_runs(
    shop: tuple[RunningPipeline, Workload], source: psycopg.Connection, clickhouse: Client
) -> None:
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

    # A dropped column does not break the stream: it stays in ClickHouse, new rows get its default.
    source.execute(f'ALTER TABLE "{running.schema}".customers DROP COLUMN nickname')
    workload.run(source, 200)
    running.wait_until_replica_matches(source, clickhouse, list(TABLES), timeout=600)
    assert running.stream_alive()


def test_truncate_empties_the_replica_and_later_changes_apply(
    shop: tuple[RunningPipeline, Workload], source: psycopg.Connection, clickhouse: Client
) -> None:
    running, workload = shop
    running.start_stream()
    workload.run(source, 300)
    with source.transaction():
        workload.insert(source, "order_items")
        source.execute(f'TRUNCATE "{running.schema}".order_items')
        workload.live["order_items"].clear()
        workload.insert(source, "order_items")  # same transaction, after the truncate: must survive
    workload.run(source, 300)
    assert running.wait_until_replica_matches(source, clickhouse, list(TABLES), timeout=600) > 100


def test_a_transaction_open_across_the_initial_snapshot_is_applied(
    settings: Settings, source: psycopg.Connection, clickhouse: Client, unique_name: str, tmp_path: Path
) -> None:
    """A transaction that wrote before the snapshot point and committed after it is invisible to the
    snapshot, then streamed as the connector's first transaction (no previous commit position, only
    change LSNs older than the snapshot's). Its changes must win over the snapshot rows; they lost, and
    the replica kept the snapshot's value for good."""
    accounts = sql.Identifier(unique_name, "accounts")
    source.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(unique_name)))
    source.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, balance int NOT NULL)").format(accounts))
    source.execute(sql.SQL("INSERT INTO {} SELECT i, 10 FROM generate_series(1, 3) i").format(accounts))
    holder = psycopg.connect(settings.postgres_conninfo())  # not autocommit: holds the transaction open

    def open_transaction(config: PipelineConfig) -> None:
        # Creating a slot waits for the transactions running at that moment, so the slot comes first.
        # (pgoutput reads the publication as of each change: it must exist before the slot.)
        parts = [(t.schema_name, t.table_name) for t in config.tables] + [config.signal_table_parts]
        published = sql.SQL(", ").join(sql.Identifier(*p) for p in parts)
        source.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
            sql.Identifier(config.publication_name), published
        ))  # fmt: skip
        source.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (config.slot_name,))
        holder.execute(sql.SQL("UPDATE {} SET balance = 42 WHERE id = 1").format(accounts))
        holder.execute(sql.SQL("INSERT INTO {} VALUES (4, 44)").format(accounts))
        # The slot moves past those changes (they are not committed: the slot keeps them): the connector
        # snapshots at the slot's position, after the transaction's changes but without them.
        source.execute("SELECT pg_logical_emit_message(false, 'cdc-test', 'wal')")
        source.execute("SELECT pg_replication_slot_advance(%s, pg_current_wal_lsn())", (config.slot_name,))

    def snapshot_applied() -> bool:
        try:
            query = "SELECT count() FROM {db:Identifier}.accounts FINAL WHERE _is_deleted = 0"
            return int(clickhouse.command(query, parameters={"db": unique_name})) == 3
        except Exception:  # the table is created by the first batch
            return False

    try:
        with pipeline_for_schema(
            settings, unique_name, ["accounts"], tmp_path, before_provision=open_transaction
        ) as running:
            running.start_stream()
            wait_for(snapshot_applied, 600, "the snapshot rows in the replica")
            holder.commit()
            source.execute(sql.SQL("UPDATE {} SET balance = 7 WHERE id = 2").format(accounts))  # a later one
            assert running.wait_until_replica_matches(source, clickhouse, ["accounts"], timeout=300) == 4
    finally:
        holder.close()


def test_connect_killed_and_restarted_mid_stream(
    shop: tuple[RunningPipeline, Workload],
    local_stack: LocalStack,
    source: psycopg.Connection,
    clickhouse: Client,
) -> None:
    running, workload = shop
    running.start_stream()
    workload.run(source, 500)
    local_stack.connect.process.stop(sig=signal.SIGKILL)
    workload.run(source, 500)  # changes made while Debezium is down wait in the replication slot
    local_stack.up()
    workload.run(source, 500)
    assert running.wait_until_replica_matches(source, clickhouse, list(TABLES), timeout=600) > 500


@pytest.fixture(scope="module")
def spark_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Spark standalone master and one worker, started from the pyspark distribution with spark-class."""
    spark_class = str(Path(pyspark.__file__).parent / "bin" / "spark-class")
    master_port, master_ui, worker_ui = free_ports(3)
    master_url = f"spark://127.0.0.1:{master_port}"
    logs = tmp_path_factory.mktemp("spark-cluster")
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_WORKER_DIR": str(logs / "work")}
    commands = [
        [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
         "--port", str(master_port), "--webui-port", str(master_ui)],
        [spark_class, "org.apache.spark.deploy.worker.Worker", master_url, "--host", "127.0.0.1",
         "--cores", "1", "--memory", "1536m", "--webui-port", str(worker_ui)],
    ]  # fmt: skip
    processes = []
    try:
        for index, argv in enumerate(commands):
            with open(logs / f"{index}.log", "wb") as log:
                processes.append(
                    subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                )
            if index == 0:
                wait_for(lambda: port_open("127.0.0.1", master_port), 120, "the Spark master")
        wait_for(
            lambda: b"Successfully registered with master" in (logs / "1.log").read_bytes(), 120, "the Spark worker"
        )
        yield master_url
    finally:
        for process in reversed(processes):
            stop_process_group(process)


def test_end_to_end_on_a_spark_standalone_cluster(
    shop: tuple[RunningPipeline, Workload],
    spark_cluster: str,
    source: psycopg.Connection,
    clickhouse: Client,
) -> None:
    running, workload = shop
    running.start_stream(
        master=spark_cluster,
        conf={"spark.executor.memory": "768m", "spark.cores.max": "1", "spark.driver.host": "127.0.0.1"},
    )
    workload.run(source, 1000)
    assert running.wait_until_replica_matches(source, clickhouse, list(TABLES), timeout=600) > 500
    # The query really ran on the cluster: the driver registered an application with the master.
    assert f"Connecting to master {spark_cluster}" in running.log_tail(100_000)


ALL_TYPES_DDL = """
CREATE TYPE {s}.mood AS ENUM ('sad', 'ok', 'très 😀');
CREATE TABLE {s}.all_types (
    id bigint PRIMARY KEY,
    c_smallint smallint, c_int integer, c_bigint bigint,
    c_numeric numeric(38, 9), c_numeric_wide numeric(50, 10), c_numeric_any numeric,
    c_real real, c_double double precision,
    c_text text, c_varchar varchar(20), c_char char(5), c_bool boolean,
    c_date date, c_time time, c_timestamp timestamp(6), c_timestamp3 timestamp(3), c_timestamptz timestamptz,
    c_interval interval, c_uuid uuid, c_json json, c_jsonb jsonb,
    c_int_array integer[], c_text_array text[], c_numeric_array numeric(10, 2)[],
    c_enum {s}.mood, c_enum_array {s}.mood[], c_bytea bytea
);
"""
ALL_TYPES_ROWS = """
INSERT INTO {s}.all_types (id) VALUES (1);
INSERT INTO {s}.all_types VALUES (2,
    32767, 2147483647, 9223372036854775807,
    99999999999999999999999999999.999999999, 1234567890123456789012345678901234567890.0123456789,
    123456789012345678901234567890123456789.123456789,
    3.4e38, 1.7976931348623157e308,
    'Zoë 李 😀 \\ "quoted"', 'ünïcödé', 'ab', true,
    '2299-12-31', '23:59:59.999999', '2262-04-11 23:47:16.854775', '2200-01-01 00:00:00.123',
    '2299-12-31 23:59:59.999999+00',
    '1 year 2 mons 3 days 04:05:06.789', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
    '{{"a": {{"b": [1, 2, {{"c": "ü"}}]}}, "n": 12345678901234567890}}',
    '{{"a": {{"b": [1, 2, {{"c": "ü"}}]}}, "n": 12345678901234567890}}',
    '{{1,2,3}}', '{{"a","ü",""}}', '{{1.50,-2.25}}', 'très 😀', '{{ok,sad}}', '\\x00ff10'
);
INSERT INTO {s}.all_types VALUES (3,
    -32768, -2147483648, -9223372036854775808,
    -99999999999999999999999999999.999999999, -0.0000000001, 'NaN',
    '-Infinity', 'NaN',
    '', '', '', false,
    '1900-01-01', '00:00:00', '1900-01-01 00:00:00', '1969-12-31 23:59:59.999', '1950-06-15 12:34:56.123456+05:30',
    '-1 year -2 mons -3 days -04:05:06.789', '00000000-0000-0000-0000-000000000000', '[]', '{{}}',
    '{{}}', '{{NULL,"x"}}', '{{}}', 'sad', '{{}}', ''
);
"""


def test_every_mapped_type_arrives_exactly(
    settings: Settings, source: psycopg.Connection, clickhouse: Client, unique_name: str, tmp_path: Path
) -> None:
    source.execute(f'CREATE SCHEMA "{unique_name}"')
    source.execute(ALL_TYPES_DDL.format(s=f'"{unique_name}"'))
    source.execute(ALL_TYPES_ROWS.format(s=f'"{unique_name}"'))  # before the connector: snapshot
    with pipeline_for_schema(settings, unique_name, ["all_types"], tmp_path) as running:
        running.start_stream()
        # and the same values again through streaming (inserts and an update)
        source.execute(
            f'INSERT INTO "{unique_name}".all_types SELECT id + 10, c_smallint, c_int, c_bigint, c_numeric, '
            "c_numeric_wide, c_numeric_any, c_real, c_double, c_text, c_varchar, c_char, c_bool, c_date, c_time, "
            "c_timestamp, c_timestamp3, c_timestamptz, c_interval, c_uuid, c_json, c_jsonb, c_int_array, "
            f'c_text_array, c_numeric_array, c_enum, c_enum_array, c_bytea FROM "{unique_name}".all_types'
        )
        source.execute(f"UPDATE \"{unique_name}\".all_types SET c_text = 'updated ✓' WHERE id = 12")
        assert running.wait_until_replica_matches(source, clickhouse, ["all_types"], timeout=240) == 6

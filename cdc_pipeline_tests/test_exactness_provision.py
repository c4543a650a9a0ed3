"""Provisioning and the stream's processes under real-world conditions, on the real stack:

- an empty captured table (no topic until its first record) or a topic missing when the stream starts
  never stops the stream: provisioning and the stream create the topics (1 partition, no retention limit);
- a key the replica cannot keep right (a `primary_key` override whose columns the old-row image
  lacks, a table without a primary key, a key without a unique index) is refused with the fix, and a
  key override with REPLICA IDENTITY FULL replicates key-changing updates and deletes exactly;
- a stream never leaves a process behind: a driver whose JVM dies (killed, or out of memory) ends with
  it, and starting or stopping a stream ends whatever a crashed run left of its process group."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import psutil
import psycopg
import pytest
from click.testing import CliRunner
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource
from psycopg import sql

from cdc_pipeline.cli import main
from cdc_pipeline.connector import connector_name, prepare_source
from cdc_pipeline.control.source import check_source
from cdc_pipeline.control.stream import StreamController
from cdc_pipeline.kafka_connect import ConnectError
from cdc_pipeline.process import ProcessRecord, group_members
from cdc_pipeline.resources import KafkaConnectResource
from cdc_pipeline.settings import Settings
from cdc_pipeline.stack.lifecycle import LocalStack
from cdc_pipeline.streaming.launch import APPLICATION, SparkSubmit
from cdc_pipeline.topics import pipeline_topics
from cdc_pipeline_tests.conftest import wait_for
from cdc_pipeline_tests.replica import RunningPipeline, launch, pipeline_for_schema, write_schema_pipeline

pytestmark = pytest.mark.integration


def _schema(conn: psycopg.Connection, name: str, ddl: str) -> None:
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    conn.execute(f"SET search_path TO {name}")
    conn.execute(ddl)
    conn.execute("SET search_path TO DEFAULT")


def _topic_configs(admin: AdminClient, topic: str) -> dict[str, str]:
    (future,) = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, topic)]).values()
    return {name: entry.value for name, entry in future.result(timeout=30).items()}


def _alive(members: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in members:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            continue
    return alive


def _group(pid: int) -> ProcessRecord:
    return ProcessRecord(pid, psutil.Process(pid).create_time(), [])


def _driver(group: ProcessRecord) -> psutil.Process:
    return wait_for(
        lambda: next((p for p in group_members(group) if any(a.endswith(APPLICATION.name) for a in p.cmdline())), None),
        120,
        "the Python driver of the stream",
    )


def _kill_all(members: list[psutil.Process]) -> None:
    for proc in members:
        with contextlib.suppress(psutil.Error):
            proc.kill()


# --- empty tables and missing topics ---------------------------------------------------------------


def test_an_empty_table_and_a_missing_topic_never_stop_the_stream(
    settings: Settings, source: psycopg.Connection, clickhouse: Client, unique_name: str, tmp_path: Path
) -> None:
    _schema(
        source,
        unique_name,
        "CREATE TABLE filled (id int PRIMARY KEY, v text); INSERT INTO filled SELECT g, 'v' || g FROM "
        "generate_series(1, 20) g; CREATE TABLE empty (id int PRIMARY KEY, v text); "
        "CREATE TABLE later (id int PRIMARY KEY, v text)",
    )
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    with pipeline_for_schema(settings, unique_name, ["filled", "empty", "later"], tmp_path) as running:
        config = running.config
        empty_topic, later_topic = config.topic_for(config.tables[1]), config.topic_for(config.tables[2])
        # Provisioning created every topic the pipeline uses, also those of tables without a record yet.
        topics = admin.list_topics(timeout=30).topics
        for topic in pipeline_topics(config):
            assert topic in topics, f"{topic} was not created at provisioning"
            assert len(topics[topic].partitions) == 1
        configs = _topic_configs(admin, empty_topic)
        assert (configs["cleanup.policy"], configs["retention.ms"], configs["retention.bytes"]) == (
            "delete",
            "-1",
            "-1",
        )

        # A table added to pipeline.yaml after provisioning has no topic yet: the stream creates it.
        admin.delete_topics([later_topic])[later_topic].result(timeout=30)
        wait_for(lambda: later_topic not in admin.list_topics(timeout=30).topics, 60, f"{later_topic} deleted")

        running.start_stream()
        running.wait_until_replica_matches(source, clickhouse, ["filled"])
        wait_for(
            lambda: later_topic in admin.list_topics(timeout=30).topics, 120, f"the stream to create {later_topic}"
        )
        assert _topic_configs(admin, later_topic)["retention.ms"] == "-1"
        # Spark gives up on a topic it cannot read after a minute of retries: outlive that by far.
        deadline = time.monotonic() + 100
        while time.monotonic() < deadline:
            assert running.stream_alive(), f"the stream exited:\n{running.log_tail()}"
            time.sleep(5)
        source.execute(f"INSERT INTO {unique_name}.empty VALUES (1, 'first'), (2, 'second')")
        source.execute(f"UPDATE {unique_name}.filled SET v = 'changed' WHERE id <= 5")
        assert running.wait_until_replica_matches(source, clickhouse, ["filled", "empty"]) == 22


def test_a_table_topic_with_several_partitions_is_refused(
    settings: Settings, source: psycopg.Connection, unique_name: str, tmp_path: Path
) -> None:
    from confluent_kafka.admin import NewTopic

    from cdc_pipeline.topics import TopicError, ensure_topics

    config, _ = write_schema_pipeline(unique_name, ["orders"], tmp_path)
    topic = config.topics()[0]
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result(timeout=30)
    try:
        with pytest.raises(TopicError, match=f"topic {topic} has 3 partitions.*exactly 1"):
            ensure_topics({"bootstrap.servers": settings.kafka_bootstrap_servers}, config)
    finally:
        admin.delete_topics([topic])[topic].result(timeout=30)


def test_existing_topics_are_left_alone_and_a_finite_retention_is_reported(
    settings: Settings, local_stack: LocalStack, unique_name: str, tmp_path: Path
) -> None:
    from confluent_kafka.admin import NewTopic

    from cdc_pipeline.topics import ensure_topics

    config, _ = write_schema_pipeline(unique_name, ["orders", "items"], tmp_path)
    kafka = {"bootstrap.servers": settings.kafka_bootstrap_servers}
    admin = AdminClient(kafka)
    dlq = config.dlq_topic
    admin.create_topics([NewTopic(dlq, 1, 1, config={"retention.ms": "3600000"})])[dlq].result(timeout=30)
    try:
        report = ensure_topics(kafka, config)
        assert sorted(report.created) == sorted([*config.topics(), config.notification_topic])
        assert report.existing == [dlq]
        assert _topic_configs(admin, dlq)["retention.ms"] == "3600000"  # left as it was
        (warning,) = report.warnings
        assert f"topic {dlq} deletes records after retention.ms=3600000" in warning and "retention.ms=-1" in warning
        again = ensure_topics(kafka, config)  # idempotent
        assert again.created == [] and len(again.existing) == 4
    finally:
        for topic in pipeline_topics(config):
            admin.delete_topics([topic])[topic].result(timeout=30)


# --- keys the replica cannot keep right -------------------------------------------------------------


def test_keys_without_a_full_old_row_image_are_refused_with_the_fix(
    settings: Settings, source: psycopg.Connection, unique_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _schema(
        source,
        unique_name,
        "CREATE TABLE coded (id int PRIMARY KEY, code text NOT NULL UNIQUE, v text); "
        "CREATE TABLE keyless (code text NOT NULL, v text); CREATE UNIQUE INDEX keyless_code ON keyless (code); "
        "CREATE TABLE loose (id int PRIMARY KEY, v text)",
    )
    tables = [
        {"name": "coded", "primary_key": ["code"]},  # default identity: the old row carries only id
        {"name": "keyless"},  # no primary key, no override
        {"name": "loose", "primary_key": ["v"]},  # no unique index on v
    ]
    config, path = write_schema_pipeline(unique_name, tables, tmp_path)
    prepare_source(settings.postgres_conninfo(), config)
    failed = {check.name: check for check in check_source(source, config) if not check.ok}
    identity = failed[f"replica identity {unique_name}.coded"]
    assert "lacks key column(s) ['code']" in identity.detail
    assert identity.fix == (
        f'ALTER TABLE "{unique_name}"."coded" REPLICA IDENTITY FULL '
        f'(or ALTER TABLE "{unique_name}"."coded" REPLICA IDENTITY USING INDEX "coded_code_key")'
    )
    keyless = failed[f"primary key {unique_name}.keyless"]
    assert "no primary key" in keyless.detail and "tables[1].primary_key" in keyless.fix
    assert "CREATE UNIQUE INDEX" in failed[f"unique key {unique_name}.loose"].fix
    assert set(failed) == {
        f"replica identity {unique_name}.coded",
        f"primary key {unique_name}.keyless",
        f"unique key {unique_name}.loose",
        f"replica identity {unique_name}.loose",
    }

    # The CLI refuses the same way and provisions nothing.
    monkeypatch.chdir(tmp_path)  # no developer .env
    result = CliRunner().invoke(main, ["provision", "--config", str(path)])
    assert result.exit_code != 0
    assert "source checks failed; no topic or connector was provisioned" in result.output
    assert f'ALTER TABLE "{unique_name}"."coded" REPLICA IDENTITY FULL' in result.output
    with pytest.raises(ConnectError, match="^404 "):
        KafkaConnectResource(url=settings.connect_url).connector_config(connector_name(config))

    # With the fixes applied, every check passes.
    source.execute(f"ALTER TABLE {unique_name}.coded REPLICA IDENTITY USING INDEX coded_code_key")
    source.execute(f"ALTER TABLE {unique_name}.keyless REPLICA IDENTITY FULL")
    (tmp_path / "fixed").mkdir()
    fixed, _ = write_schema_pipeline(
        unique_name, [tables[0], {"name": "keyless", "primary_key": ["code"]}], tmp_path / "fixed"
    )
    assert [check.line() for check in check_source(source, fixed) if not check.ok] == []


def test_provisioning_sets_the_identity_a_key_override_needs_when_allowed(
    settings: Settings, source: psycopg.Connection, unique_name: str, tmp_path: Path
) -> None:
    _schema(
        source,
        unique_name,
        "CREATE TABLE coded (id int PRIMARY KEY, code text NOT NULL UNIQUE, v text); "
        "CREATE TABLE plain (id int PRIMARY KEY, v text); CREATE TABLE keyless (code text, v text)",
    )
    tables = [{"name": "coded", "primary_key": ["code"]}, {"name": "plain"}, {"name": "keyless"}]
    config, _ = write_schema_pipeline(unique_name, tables, tmp_path, set_replica_identity=True)
    assert prepare_source(settings.postgres_conninfo(), config) == [
        f"created table {unique_name}.cdc_signal",
        f"set REPLICA IDENTITY FULL on {unique_name}.coded (its key ['code'] was not in the old row)",
    ]
    identities = dict(
        source.execute(
            "SELECT relname, relreplident FROM pg_class WHERE relnamespace = %s::regnamespace", (unique_name,)
        ).fetchall()
    )
    assert (identities["coded"], identities["plain"], identities["keyless"]) == ("f", "d", "d")
    # What FULL cannot fix is still refused: a table without any key.
    failed = [check.name for check in check_source(source, config) if not check.ok]
    assert failed == [f"primary key {unique_name}.keyless"]
    assert prepare_source(settings.postgres_conninfo(), config) == []  # idempotent


def test_a_key_override_with_full_identity_replicates_key_changes_and_deletes(
    settings: Settings, source: psycopg.Connection, clickhouse: Client, unique_name: str, tmp_path: Path
) -> None:
    _schema(
        source,
        unique_name,
        "CREATE TABLE coded (id int PRIMARY KEY, code text NOT NULL UNIQUE, v text); "
        "ALTER TABLE coded REPLICA IDENTITY FULL; "
        "CREATE TABLE keyless (code text NOT NULL, v text); CREATE UNIQUE INDEX keyless_code ON keyless (code); "
        "ALTER TABLE keyless REPLICA IDENTITY FULL; "
        "INSERT INTO coded SELECT g, 'c' || g, 'v' || g FROM generate_series(1, 10) g; "
        "INSERT INTO keyless SELECT 'k' || g, 'v' || g FROM generate_series(1, 10) g",
    )
    tables = [{"name": "coded", "primary_key": ["code"]}, {"name": "keyless", "primary_key": ["code"]}]
    (tmp_path / "run").mkdir()
    with pipeline_for_schema(settings, unique_name, tables, tmp_path / "run") as running:
        assert [c.line() for c in check_source(source, running.config) if not c.ok] == []
        running.start_stream()
        running.wait_until_replica_matches(source, clickhouse, ["coded", "keyless"])
        for table, p in (("coded", "c"), ("keyless", "k")):
            name = sql.Identifier(unique_name, table).as_string(source)
            source.execute(f"UPDATE {name} SET v = 'other' WHERE code = '{p}1'")  # not the key
            source.execute(f"UPDATE {name} SET code = 'moved' || code WHERE code IN ('{p}2', '{p}3')")  # the key
            source.execute(f"UPDATE {name} SET code = '{p}4x', v = 'both' WHERE code = '{p}4'")
            source.execute(f"DELETE FROM {name} WHERE code IN ('{p}5', 'moved{p}3')")
            source.execute(f"INSERT INTO {name} SELECT {'100, ' if table == 'coded' else ''}'{p}2', 'reused'")
        assert running.wait_until_replica_matches(source, clickhouse, ["coded", "keyless"]) == 18


# --- no process left behind -------------------------------------------------------------------------


def _started(running: RunningPipeline, source: psycopg.Connection, clickhouse: Client, table: str) -> ProcessRecord:
    running.start_stream()
    running.wait_until_replica_matches(source, clickhouse, [table])
    return _group(running.stream.pid)


def test_a_driver_ends_with_its_jvm_even_when_it_is_hung(
    settings: Settings, source: psycopg.Connection, clickhouse: Client, unique_name: str, tmp_path: Path
) -> None:
    _schema(source, unique_name, "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a')")
    with pipeline_for_schema(settings, unique_name, ["t"], tmp_path) as running:
        group = _started(running, source, clickhouse, "t")
        driver = _driver(group)
        try:
            driver.suspend()  # a hung driver: it cannot notice anything by itself
            os.kill(group.pid, signal.SIGKILL)  # the JVM (spark-submit execs it: it leads the group)
            running.stream.wait(timeout=60)
            wait_for(lambda: not _alive(group_members(group)), 120, "every process of the stream to end")
        finally:
            _kill_all(group_members(group))


_BIG_TABLE = (
    "CREATE TABLE big (id int PRIMARY KEY, v text); ALTER TABLE big ALTER v SET STORAGE EXTERNAL; "
    "INSERT INTO big SELECT g.i, (SELECT string_agg(md5(g.i || '-' || h), '') FROM generate_series(1, 1500) h) "
    "FROM generate_series(1, 3000) g(i)"
)


def _small_heap_submit(settings: Settings) -> SparkSubmit:
    """spark-submit with a 128 MB driver heap (spark.testing.memory lets Spark start below its 450 MB minimum)."""
    return SparkSubmit(
        driver_memory="128m", conf={"spark.testing.memory": str(512 << 20)}, jvm_cache_dir=settings.jvm_cache_dir
    )


def test_an_out_of_memory_driver_jvm_ends_every_process_of_the_stream(
    settings: Settings, source: psycopg.Connection, clickhouse: Client, unique_name: str, tmp_path: Path
) -> None:
    # 3000 rows of 48 kB: a micro-batch of 2000 is about 100 MB, far more than a 128 MB driver heap. The
    # stream would bound its batches to what the heap holds (next test): a byte budget far beyond the heap is
    # configured, so a batch reads max_offsets_per_trigger (2000) records.
    _schema(source, unique_name, _BIG_TABLE)
    with pipeline_for_schema(
        settings, unique_name, ["big"], tmp_path, stream={"max_bytes_per_trigger": "1GiB"}
    ) as running:
        submit = _small_heap_submit(settings)
        argv = submit.stream_argv(running.config_path, checkpoint_location=running.checkpoint, name="oom")
        running.stream = launch(argv, log_path=running.log_path)
        group = _group(running.stream.pid)
        try:
            code = running.stream.wait(timeout=900)
            assert code != 0
            assert "OutOfMemoryError" in running.log_path.read_text(errors="replace")
            wait_for(lambda: not _alive(group_members(group)), 120, "every process of the stream to end")
        finally:
            _kill_all(group_members(group))


def test_200k_offsets_per_trigger_are_bounded_to_what_the_heap_holds(
    settings: Settings, source: psycopg.Connection, clickhouse: Client, unique_name: str, tmp_path: Path
) -> None:
    """The data of the OutOfMemoryError test above on Spark's smallest driver heap (512 MB), with
    max_offsets_per_trigger 200,000 (one batch would be all 144 MB of records: the heap runs out) and no byte
    budget configured: the stream derives one from its heap and the record size it measures in the topic, and
    applies every row in batches the heap holds."""
    _schema(source, unique_name, _BIG_TABLE)
    with pipeline_for_schema(
        settings, unique_name, ["big"], tmp_path, stream={"max_offsets_per_trigger": 200_000}
    ) as running:
        (topic,) = running.config.topics()
        consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": unique_name})
        try:
            # The snapshot in Kafka first: the record size is measured when the stream starts.
            wait_for(
                lambda: consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=30)[1] >= 3000,
                600,
                "the snapshot's 3000 records in Kafka",
            )
        finally:
            consumer.close()
        argv = SparkSubmit(driver_memory="512m", jvm_cache_dir=settings.jvm_cache_dir).stream_argv(
            running.config_path, checkpoint_location=running.checkpoint, name="bounded"
        )
        running.stream = launch(argv, log_path=running.log_path)
        group = _group(running.stream.pid)
        try:

            def applied() -> bool:
                assert running.stream is not None and running.stream.poll() is None, (
                    f"the stream ended:\n{running.log_tail()}"
                )
                try:
                    return clickhouse.command(f"SELECT count() FROM `{unique_name}`.big FINAL") == 3000
                except DatabaseError:  # not created by the stream yet
                    return False

            wait_for(applied, 1200, "the 3000 rows in ClickHouse", interval=2)
            log_text = running.log_path.read_text(errors="replace")
            assert "bounded from max_offsets_per_trigger 200,000" in log_text
            assert "OutOfMemoryError" not in log_text
            assert clickhouse.command(f"SELECT sum(length(v)) FROM `{unique_name}`.big FINAL") == 3000 * 1500 * 32
        finally:
            _kill_all(group_members(group))


def test_stop_and_start_end_whatever_a_crashed_stream_left(tmp_path: Path) -> None:
    """The control plane's side, with plain processes: a leader that exited leaves two children in its
    process group (as a crashed spark-submit leaves a driver); start and stop end them."""
    controller = StreamController(tmp_path, "crashy")
    argv = ["bash", "-c", "sleep 600 & sleep 600 & wait"]

    def start() -> tuple[ProcessRecord, list[psutil.Process]]:
        controller.start(argv, env={}, master="local", checkpoint="none")
        record = controller.process.record()
        wait_for(lambda: len(group_members(record)) == 3, 30, "bash and its two children")
        return record, group_members(record)

    first, first_members = start()
    second_members: list[psutil.Process] = []
    try:
        os.kill(first.pid, signal.SIGKILL)
        wait_for(lambda: not controller.status().running, 30, "the leader to exit")
        assert len(_alive(first_members)) == 2  # orphaned, still running

        second, second_members = start()  # a restart
        assert _alive(first_members) == [], "the old run's processes run beside the new one"
        assert controller.status().running and second.pid != first.pid

        os.kill(second.pid, signal.SIGKILL)
        wait_for(lambda: not controller.status().running, 30, "the leader to exit")
        assert controller.stop() is True
        assert _alive(second_members) == []
        assert controller.stop() is False  # nothing left
    finally:
        _kill_all(first_members + second_members)

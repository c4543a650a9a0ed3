"""The Spark Structured Streaming application: Debezium topics -> ClickHouse replica tables.

A plain Spark program (nothing from Dagster): run it with `spark-submit` on any master, e.g.

    spark-submit --master local[2] --packages org.apache.spark:spark-sql-kafka-0-10_2.13:<pyspark version> \\
        cdc_pipeline/streaming/app.py --config pipeline.yaml

Connection settings come from the CDC_* environment variables (see .env.example).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException
from pyspark.sql import DataFrame, SparkSession

from cdc_pipeline.clickhouse_client import connect_clickhouse
from cdc_pipeline.config import PipelineConfig, load_pipeline_config
from cdc_pipeline.settings import Settings
from cdc_pipeline.streaming.apply import ChangeApplier
from cdc_pipeline.streaming.dlq import DeadLetters
from cdc_pipeline.streaming.envelope import decode_envelope, offset_ranges
from cdc_pipeline.streaming.evolution import SchemaEvolution
from cdc_pipeline.streaming.launch import is_local_master
from cdc_pipeline.streaming.limits import (
    TriggerLimit,
    batch_heap_bytes,
    derive_trigger_limit,
    largest_mean,
    over_budget_warning,
    sample_record_bytes,
)
from cdc_pipeline.streaming.progress import ProgressRecorder, progress_table_migrations, progress_table_sql
from cdc_pipeline.streaming.sink import ClickHouseSink
from cdc_pipeline.streaming.sinks import build_sink
from cdc_pipeline.topics import TopicError, ensure_topics

log = logging.getLogger("cdc_pipeline.streaming")

# Reading offsets of a topic Debezium has just created can fail until the broker serves its partition
# (seen on a busy single broker for over 3 s). Spark's default, 3 tries 1 s apart, then ends the query;
# a minute of tries rides that out, while a Kafka that is really gone still fails the query.
KAFKA_OFFSET_FETCH = {"fetchOffset.numRetries": "60", "fetchOffset.retryIntervalMs": "1000"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", type=Path, default=None, help="pipeline.yaml (default: CDC_PIPELINE_CONFIG or ./pipeline.yaml)"
    )
    parser.add_argument("--checkpoint-location", default=None, help="override stream.checkpoint_location")
    return parser.parse_args(argv)


# prctl(2) option: the signal this process gets when its parent exits (Linux).
PR_SET_PDEATHSIG = 1
# Exit codes of the driver: the query failed; the JVM that ran it is gone; a topic cannot be created.
EXIT_QUERY_FAILED = 1
EXIT_JVM_GONE = 3
EXIT_TOPICS = 4
WATCHDOG_INTERVAL_S = 2.0


def _exit(code: int) -> None:
    """End this process now: no non-daemon thread (py4j's callback server, a client) can keep it alive."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def bind_to_jvm() -> int | None:
    """Under spark-submit this driver is a child of the spark-submit JVM: make sure it never outlives it.

    The kernel SIGKILLs it when that JVM exits (PR_SET_PDEATHSIG: also a driver that is hung, or
    stopped, or blocked in a call), and a watchdog thread exits it if it has been re-parented anyway
    (the JVM died before prctl, or another OS). Returns the JVM's pid, or None when Python started
    the JVM itself (`python app.py`: the JVM is our child and dies with us)."""
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        return None
    jvm = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %s", ctypes.get_errno())
        except (OSError, AttributeError) as exc:
            log.warning("prctl(PR_SET_PDEATHSIG) unavailable: %s", exc)

    def watch() -> None:
        while True:
            if os.getppid() != jvm:
                log.error("the Spark JVM (pid %s) that started this driver is gone: exiting", jvm)
                _exit(EXIT_JVM_GONE)
            time.sleep(WATCHDOG_INTERVAL_S)

    if os.getppid() != jvm:  # it exited between the two calls above
        _exit(EXIT_JVM_GONE)
    threading.Thread(target=watch, name="jvm-watchdog", daemon=True).start()
    return jvm


def read_kafka_range(
    spark: SparkSession, settings: Settings, starting: dict[str, dict[str, int]], ending: dict[str, dict[str, int]]
) -> DataFrame:
    """The Kafka records from `starting` to `ending` (exclusive), both {"topic": {"partition": offset}}."""
    assign = {topic: sorted(int(p) for p in partitions) for topic, partitions in starting.items()}
    return (
        spark.read.format("kafka")
        .option("kafka.bootstrap.servers", settings.kafka_bootstrap_servers)
        .option("assign", json.dumps(assign))
        .option("startingOffsets", json.dumps(starting))
        .option("endingOffsets", json.dumps(ending))
        .option("failOnDataLoss", "true")
        .options(**KAFKA_OFFSET_FETCH)
        .load()
    )


def read_records(spark: SparkSession, settings: Settings, wanted: list[tuple[str, int, int]]) -> DataFrame:
    """The Kafka records from the first to the last of these (topic, partition, offset) positions of each
    partition (the batch writer keeps the wanted ones, see `envelope.records_at`)."""
    return read_kafka_range(spark, settings, *offset_ranges(wanted))


def trigger_limit(spark: SparkSession, pipeline: PipelineConfig, settings: Settings) -> TriggerLimit:
    """The offsets per trigger that keep a batch within the heap (cdc_pipeline/streaming/limits.py): from this
    JVM's heap (and an executor's with a cluster master) and the record size at the end of the topics."""
    context = spark.sparkContext
    jvm: Any = context._jvm  # noqa: SLF001 - py4j gateway
    driver_heap = int(jvm.java.lang.Runtime.getRuntime().maxMemory())
    heap = batch_heap_bytes(
        driver_heap,
        local_master=is_local_master(str(context.master)),
        executor_memory=context.getConf().get("spark.executor.memory", None),
    )
    try:
        sizes = sample_record_bytes({"bootstrap.servers": settings.kafka_bootstrap_servers}, pipeline.topics())
    except KafkaException as exc:
        log.warning("could not sample the topics' record sizes (%s): assuming a size", exc)
        sizes = {}
    record_bytes, origin = largest_mean(sizes)
    return derive_trigger_limit(
        pipeline.stream.max_offsets_per_trigger,
        heap_bytes=heap,
        record_bytes=record_bytes,
        record_bytes_from=origin,
        max_bytes=pipeline.stream.max_bytes_per_trigger,
    )


def run(pipeline: PipelineConfig, settings: Settings, checkpoint_location: str) -> None:
    """Start the query and block until it stops (SIGTERM/SIGINT stop it cleanly between batches).
    Raises the query's exception when it fails."""
    # Debezium creates a table's topic only with its first record: an empty table, or one added to
    # pipeline.yaml but not provisioned yet, would otherwise end the query after a minute of retries.
    report = ensure_topics({"bootstrap.servers": settings.kafka_bootstrap_servers}, pipeline)
    for line in report.lines():
        log.info("%s", line)
    password = settings.clickhouse_password.get_secret_value() if settings.clickhouse_password else None
    database = pipeline.clickhouse_database(settings.clickhouse_database)
    admin = connect_clickhouse(settings.clickhouse_endpoint, settings.clickhouse_user, password)
    admin.command(f"CREATE DATABASE IF NOT EXISTS `{database}`")
    admin.command(progress_table_sql(database))
    for statement in progress_table_migrations(database):
        admin.command(statement)
    admin.close()

    spark = SparkSession.builder.appName(pipeline.query_name).getOrCreate()
    limit = trigger_limit(spark, pipeline, settings)
    log.info("query %s reads at most %s", pipeline.query_name, limit.describe())
    warning = over_budget_warning(limit)
    if warning:
        log.warning("%s", warning)
    # The batch writer and the progress listener run on different threads: one client each.
    recorder = ProgressRecorder(
        pipeline.query_name,
        database,
        connect_clickhouse(settings.clickhouse_endpoint, settings.clickhouse_user, password),
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": pipeline.consumer_group},
    )
    spark.streams.addListener(recorder)
    evolution = SchemaEvolution.from_settings(pipeline, settings)
    applier = ChangeApplier(
        pipeline,
        database,
        build_sink(
            pipeline,
            settings,
            ClickHouseSink(
                connect_clickhouse(settings.clickhouse_endpoint, settings.clickhouse_user, password), evolution
            ),
            evolution,
        ),
        DeadLetters(settings.kafka_bootstrap_servers, pipeline.dlq_topic),
        on_batch=recorder.batch_applied,
        read_records=lambda wanted: read_records(spark, settings, wanted),
    )
    # Split each Kafka partition's offsets among the master's cores: decoding (the JSON parse) is most of a
    # batch's time, and a table's topic has one partition. Ordering does not depend on it (source positions).
    read_parallelism = pipeline.stream.read_parallelism or spark.sparkContext.defaultParallelism
    source = (
        spark.readStream.format("kafka")
        .option("kafka.bootstrap.servers", settings.kafka_bootstrap_servers)
        .option("subscribe", ",".join(pipeline.topics()))
        .option("startingOffsets", pipeline.stream.starting_offsets)
        .option("maxOffsetsPerTrigger", limit.max_offsets)
        # Missing offsets (retention, a recreated topic) stop the query loudly instead of skipping data.
        .option("failOnDataLoss", "true")
        .options(**KAFKA_OFFSET_FETCH)
        .option("minPartitions", str(read_parallelism))
        .load()
    )
    # Decoded in the query's own plan: analysed once, when the query starts, rather than for every batch in
    # the batch writer (planning the decode there cost ~0.3 s per batch).
    source = decode_envelope(source, keep_raw=True)
    query = (
        source.writeStream.queryName(pipeline.query_name)
        .foreachBatch(applier)
        .option("checkpointLocation", checkpoint_location)
        .trigger(processingTime=f"{pipeline.stream.trigger_interval_ms} milliseconds")
        .start()
    )

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %s: stopping query %s", signum, pipeline.query_name)
        # Not from the handler itself: the main thread is inside a py4j call (awaitTermination).
        threading.Thread(target=query.stop, name="stop-query", daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("query %s started, checkpoint %s, topics %s", pipeline.query_name, checkpoint_location, pipeline.topics())
    query.awaitTermination()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bind_to_jvm()
    args = parse_args(argv)
    settings = Settings()
    pipeline = load_pipeline_config(args.config)
    checkpoint = args.checkpoint_location or pipeline.checkpoint_location(settings.stack_dir.resolve())
    try:
        run(pipeline, settings, checkpoint)
    except TopicError as exc:
        log.error("query %s not started: %s", pipeline.query_name, exc)
        return EXIT_TOPICS
    except Exception:
        log.exception("query %s failed", pipeline.query_name)
        return EXIT_QUERY_FAILED
    return 0


if __name__ == "__main__":
    # Whatever happened, the process ends here: a thread left behind (py4j's callback server, a client
    # waiting on a dead JVM) must not keep a driver alive without its query.
    code = EXIT_QUERY_FAILED
    try:
        code = main()
    finally:
        _exit(code)

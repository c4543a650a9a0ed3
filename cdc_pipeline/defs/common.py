"""What several Dagster objects share: starting the stream with the resources' settings, measuring
lag, and reading the stream's progress table."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from clickhouse_connect.driver.binding import quote_identifier
from confluent_kafka import Consumer

from cdc_pipeline.config import PipelineConfig
from cdc_pipeline.contract import PROGRESS_TABLE
from cdc_pipeline.control.lag import LagSnapshot, measure_lag
from cdc_pipeline.control.stream import StreamController, StreamStatus
from cdc_pipeline.resources import (
    ClickHouseResource,
    ControlPlaneResource,
    KafkaResource,
    PostgresResource,
    SparkResource,
)
from cdc_pipeline.settings import ENV_PREFIX, Settings

READY_MARKER = "started, checkpoint"  # logged by streaming/app.py once the query runs
AUTOMATIC_TAG = "cdc/automatic"  # on runs a sensor requested (a manual stop since then wins)


def source_settings(postgres: PostgresResource) -> Settings:
    """Settings carrying the resource's DSN: what `connector_config` reads (host, port, db, user)."""
    return Settings(_env_file=None, postgres_dsn=postgres.dsn)


def database_of(pipeline: PipelineConfig, clickhouse: ClickHouseResource) -> str:
    return pipeline.clickhouse_database(clickhouse.database)


def stream_env(kafka: KafkaResource, clickhouse: ClickHouseResource, control_plane: ControlPlaneResource) -> dict:
    """The CDC_* variables the Spark application reads, from the Dagster resources (so the stream
    writes where the checks look). Secrets pass through the child's environment, never its argv."""
    env = {
        f"{ENV_PREFIX}KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        f"{ENV_PREFIX}CLICKHOUSE_URL": clickhouse.url,
        f"{ENV_PREFIX}CLICKHOUSE_USER": clickhouse.user,
        f"{ENV_PREFIX}CLICKHOUSE_DATABASE": clickhouse.database,
        f"{ENV_PREFIX}STACK_DIR": control_plane.stack_dir,
    }
    if clickhouse.password:
        env[f"{ENV_PREFIX}CLICKHOUSE_PASSWORD"] = clickhouse.password
    return env


def _ready(controller: StreamController) -> bool:
    log = controller.log_tail(400)
    current_run = log.rsplit("\n=== ", 1)[-1]  # ManagedProcess writes a header line at each start
    return READY_MARKER in current_run


def start_stream(
    control_plane: ControlPlaneResource,
    spark: SparkResource,
    kafka: KafkaResource,
    clickhouse: ClickHouseResource,
    *,
    started_by: str | None,
    timeout: float = 300.0,
) -> StreamStatus:
    """Start the pipeline's stream with spark-submit (idempotent) and wait until the query runs."""
    pipeline = control_plane.load()
    controller = control_plane.controller(pipeline)
    checkpoint = control_plane.checkpoint(pipeline)
    argv = spark.submit().stream_argv(
        control_plane.resolved_config_path, checkpoint_location=checkpoint, name=pipeline.query_name
    )
    return controller.start(
        argv, env=stream_env(kafka, clickhouse, control_plane), master=spark.master, checkpoint=checkpoint,
        started_by=started_by, ready=lambda: _ready(controller), timeout=timeout,
    )  # fmt: skip


@contextmanager
def group_consumer(kafka: KafkaResource, pipeline: PipelineConfig) -> Iterator[Consumer]:
    """A consumer in the stream's group that never subscribes: it only reads committed offsets."""
    consumer = kafka.consumer(pipeline.consumer_group)
    try:
        yield consumer
    finally:
        consumer.close()


def stream_lag(kafka: KafkaResource, pipeline: PipelineConfig) -> LagSnapshot:
    with group_consumer(kafka, pipeline) as consumer:
        return measure_lag(consumer, pipeline.topics())


def lag_metadata(snapshot: LagSnapshot) -> dict[str, Any]:
    partitions = {f"{p.topic}[{p.partition}]": p.lag for p in snapshot.partitions}
    return {"total_lag": snapshot.total, "lag_by_partition": partitions}


def progress_rows(clickhouse: ClickHouseResource, pipeline: PipelineConfig, after: str, limit: int = 50) -> list:
    """Rows of the stream's progress table recorded after `after` (ISO time; oldest first, at most the
    newest `limit`); [] if none yet. Time, not batch id: a new checkpoint starts at batch 0 again."""
    database = database_of(pipeline, clickhouse)
    client = clickhouse.client()
    try:
        exists = client.command(
            "EXISTS TABLE {db:Identifier}.{t:Identifier}", parameters={"db": database, "t": PROGRESS_TABLE}
        )
        if not int(exists):
            return []
        result = client.query(
            f"SELECT batch_id, recorded_at, num_input_rows, input_rows_per_second, processed_rows_per_second, "
            f"batch_duration_ms, applied_rows, deleted_rows, dlq_count, latest_source_ts "
            f"FROM {quote_identifier(database)}.{PROGRESS_TABLE} FINAL "
            "WHERE query_name = {q:String} AND recorded_at > parseDateTime64BestEffort({t:String}, 3, 'UTC') "
            "ORDER BY recorded_at DESC LIMIT {n:UInt32}",
            parameters={"q": pipeline.query_name, "t": after, "n": limit},
        )
        return list(result.named_results())[::-1]
    finally:
        with contextlib.suppress(Exception):
            client.close()

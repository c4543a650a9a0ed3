"""Jobs an operator launches from the Dagster UI (or a schedule): stream control, connector
pause/resume, backfill, replay and reconcile. Provisioning and checks are asset jobs (definitions.py)."""

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from confluent_kafka import TopicPartition
from dagster import (
    AssetKey,
    AssetObservation,
    Config,
    Failure,
    JobDefinition,
    MetadataValue,
    OpExecutionContext,
    Output,
    job,
    op,
)
from psycopg import sql
from pydantic import Field

from cdc_pipeline.config import PipelineConfig, TableConfig
from cdc_pipeline.connector import connector_name
from cdc_pipeline.control.backfill import (
    NotApplied,
    SnapshotFailed,
    SnapshotProgress,
    end_offsets,
    follow_snapshot,
    wait_until_applied,
)
from cdc_pipeline.control.reconcile import Differences, normalize, reconcile
from cdc_pipeline.control.replay_runner import ReplayTimeout, replay_arguments, run_replay
from cdc_pipeline.control.replicas import ClickHouseReplica, Replica, WarehouseReplica
from cdc_pipeline.control.rules import connector_running, connector_states
from cdc_pipeline.control.source import (
    SignalLock,
    SignalLockTimeout,
    UnsupportedSnapshotName,
    exact_count,
    primary_key,
    request_incremental_snapshot,
    source_columns,
)
from cdc_pipeline.defs import common
from cdc_pipeline.defs.common import AUTOMATIC_TAG, database_of, lag_metadata, stream_env, stream_lag
from cdc_pipeline.defs.translator import CdcTranslator
from cdc_pipeline.resources import (
    ClickHouseResource,
    ControlPlaneResource,
    KafkaConnectResource,
    KafkaResource,
    PostgresResource,
    SparkResource,
)
from cdc_pipeline.sqlcheck import InvalidFragment, validate_condition
from cdc_pipeline.streaming import replay as replay_app
from cdc_pipeline.streaming.launch import submit_env


def _observe_status(context: OpExecutionContext, key: AssetKey, status: Any, **extra: Any) -> None:
    metadata = {k: v for k, v in status.as_dict().items() if v is not None}
    context.log_event(AssetObservation(asset_key=key, metadata={**metadata, **extra}))


# --- stream control -------------------------------------------------------------------------------


def build_stream_jobs(translator: CdcTranslator) -> list[JobDefinition]:
    """start_stream, stop_stream, restart_stream and stream_status, observing `translator`'s stream asset."""
    stream_key = translator.stream_key()

    @op(
        name=translator.name("start_stream_op"),
        description="Start the streaming query with spark-submit (idempotent: a running stream is left alone).",
    )
    @translator.with_resource_keys
    def start_stream_op(
        context: OpExecutionContext,
        control_plane: ControlPlaneResource,
        spark: SparkResource,
        kafka: KafkaResource,
        clickhouse: ClickHouseResource,
    ) -> None:
        config = control_plane.load()
        status = common.start_stream(control_plane, spark, kafka, clickhouse, started_by=context.run_id)
        context.log.info(
            f"stream {config.query_name} runs as pid {status.pid} on {status.master}; log {status.log_path}"
        )
        _observe_status(context, stream_key, status)

    @op(
        name=translator.name("stop_stream_op"),
        description="Stop the streaming query: it finishes its batch and exits; SIGKILL only after a timeout.",
    )
    @translator.with_resource_keys
    def stop_stream_op(context: OpExecutionContext, control_plane: ControlPlaneResource) -> None:
        config = control_plane.load()
        controller = control_plane.controller(config)
        stopped = controller.stop()
        context.log.info(f"stream {config.query_name}: {'stopped' if stopped else 'was not running'}")
        _observe_status(context, stream_key, controller.status())

    @op(
        name=translator.name("restart_stream_op"),
        description="Stop, then start the streaming query (e.g. after changing pipeline.yaml or Spark settings).",
    )
    @translator.with_resource_keys
    def restart_stream_op(
        context: OpExecutionContext,
        control_plane: ControlPlaneResource,
        spark: SparkResource,
        kafka: KafkaResource,
        clickhouse: ClickHouseResource,
    ) -> None:
        config = control_plane.load()
        controller = control_plane.controller(config)
        if context.run.tags.get(AUTOMATIC_TAG) and controller.status().desired != "running":
            # Requested by the checkpoint sensor, but an operator stopped the stream since: theirs is the last word.
            context.log.info(
                f"stream {config.query_name} was stopped on purpose since this restart was requested: skipped"
            )
            return
        controller.stop(desired="running")
        status = common.start_stream(control_plane, spark, kafka, clickhouse, started_by=context.run_id)
        context.log.info(f"stream {config.query_name} restarted as pid {status.pid}")
        _observe_status(context, stream_key, status)

    @op(
        name=translator.name("stream_status_op"),
        description="Report whether the stream runs, its lag, and the connector's state.",
    )
    @translator.with_resource_keys
    def stream_status_op(
        context: OpExecutionContext,
        control_plane: ControlPlaneResource,
        kafka: KafkaResource,
        kafka_connect: KafkaConnectResource,
    ) -> None:
        config = control_plane.load()
        status = control_plane.controller(config).status()
        lag = stream_lag(kafka, config)
        try:
            connector = kafka_connect.connector_status(connector_name(config))
            connector_state = connector["connector"]["state"]
            tasks = ", ".join(f"{t['id']}:{t['state']}" for t in connector.get("tasks", []))
        except Exception as exc:  # a status report reports problems rather than failing on them
            connector_state, tasks = f"unknown ({str(exc).splitlines()[0][:200]})", ""
        context.log.info(
            f"stream {'RUNNING' if status.running else 'NOT RUNNING'} (desired {status.desired}), lag {lag.total}, "
            f"connector {connector_state} [{tasks}]"
        )
        _observe_status(
            context, stream_key, status, total_lag=lag.total, connector_state=connector_state,
            lag_by_partition=MetadataValue.json(lag_metadata(lag)["lag_by_partition"]),
        )  # fmt: skip

    @job(
        name=translator.name("start_stream"),
        description="Start the pipeline's streaming query (spark-submit on the Spark resource's master).",
    )
    def start_stream() -> None:
        start_stream_op()

    @job(name=translator.name("stop_stream"), description="Stop the pipeline's streaming query gracefully.")
    def stop_stream() -> None:
        stop_stream_op()

    @job(name=translator.name("restart_stream"), description="Restart the pipeline's streaming query.")
    def restart_stream() -> None:
        restart_stream_op()

    @job(
        name=translator.name("stream_status"),
        description="Show whether the stream runs, its consumer lag and the connector state.",
    )
    def stream_status() -> None:
        stream_status_op()

    return [start_stream, stop_stream, restart_stream, stream_status]


# --- connector ------------------------------------------------------------------------------------


def build_connector_jobs(translator: CdcTranslator) -> list[JobDefinition]:
    """pause_connector and resume_connector."""

    @op(
        name=translator.name("pause_connector_op"),
        description="Pause the Debezium connector (changes accumulate in the slot's WAL until resumed).",
    )
    @translator.with_resource_keys
    def pause_connector_op(
        context: OpExecutionContext, control_plane: ControlPlaneResource, kafka_connect: KafkaConnectResource
    ) -> None:
        name = connector_name(control_plane.load())
        kafka_connect.pause(name)
        context.log.info(
            f"paused {name}; PostgreSQL retains WAL for slot until it resumes: do not leave it paused long"
        )

    @op(name=translator.name("resume_connector_op"), description="Resume the Debezium connector.")
    @translator.with_resource_keys
    def resume_connector_op(
        context: OpExecutionContext, control_plane: ControlPlaneResource, kafka_connect: KafkaConnectResource
    ) -> None:
        name = connector_name(control_plane.load())
        kafka_connect.resume(name)
        context.log.info(f"resumed {name}")

    @job(name=translator.name("pause_connector"), description="Pause the Debezium connector.")
    def pause_connector() -> None:
        pause_connector_op()

    @job(name=translator.name("resume_connector"), description="Resume the Debezium connector.")
    def resume_connector() -> None:
        resume_connector_op()

    return [pause_connector, resume_connector]


# --- backfill -------------------------------------------------------------------------------------


class BackfillConfig(Config):
    table: str = Field(
        description='Source table of the pipeline to backfill, as in pipeline.yaml (`public.orders`, `public."User"`).'
    )
    condition: str | None = Field(
        default=None, description="Optional SQL filter on the source table, e.g. `updated_at > '2026-01-01'`."
    )
    timeout_s: float = Field(default=3600, description="Fail if the snapshot has not finished by then.")
    wait_applied: bool = Field(default=True, description="Also wait until the stream applied the snapshot.")


def _notification_topic(connect: KafkaConnectResource, config: PipelineConfig) -> str:
    """The connector's notification topic; Failure unless it runs with the sink notification channel."""
    name = connector_name(config)
    try:
        status = connect.connector_status(name)
        stored = connect.connector_config(name)
    except Exception as exc:
        raise Failure(f"cannot read connector {name} (run the provision job?): {exc}") from None
    if not connector_running(status):
        raise Failure(f"connector {name} is not running ({connector_states(status)}): the snapshot would never start")
    channels = [c.strip() for c in stored.get("notification.enabled.channels", "").split(",")]
    topic = stored.get("notification.sink.topic.name")
    if "sink" not in channels or not topic:
        raise Failure(
            f"connector {name} does not publish Debezium notifications, which tell a backfill that it is complete: "
            "run the provision job to update its config"
        )
    return topic


def run_backfill(
    context: OpExecutionContext,
    config: PipelineConfig,
    table: TableConfig,
    condition: str | None,
    postgres: PostgresResource,
    kafka: KafkaResource,
    connect: KafkaConnectResource,
    timeout: float,
    wait_applied: bool,
) -> dict[str, Any]:
    """Signal an incremental snapshot of `table`, follow it until Debezium reports it complete, then
    wait until the stream applied it."""
    if condition is not None:
        # One boolean expression on the table, checked by PostgreSQL before Debezium or a count sees it.
        with postgres.connect(autocommit=True) as conn:
            try:
                condition = validate_condition(conn, table.schema_name, table.table_name, condition)
            except InvalidFragment as exc:
                raise Failure(f"backfill {table.name}: {exc}") from None
    notification_topic = _notification_topic(connect, config)
    topic = config.topic_for(table)
    consumer = kafka.consumer(f"{config.consumer_group}-backfill", **{"enable.partition.eof": False})
    try:
        # The signal connection holds the pipeline's backfill lock until Debezium acknowledged the signal:
        # two signals it takes in at once would be reported under one id only (see control/backfill.py).
        with postgres.connect(autocommit=True) as conn:
            lock = SignalLock(conn, config.name)
            try:
                lock.acquire(
                    timeout,
                    lambda: context.log.info(
                        "waiting until Debezium has taken the signal of another backfill of this pipeline"
                    ),
                )
            except SignalLockTimeout as exc:
                raise Failure(str(exc)) from None
            start = end_offsets(consumer, topic)
            notification_start = end_offsets(consumer, notification_topic)
            expected = exact_count(conn, table, condition)
            try:
                signal_id = request_incremental_snapshot(conn, config, table, condition)
            except UnsupportedSnapshotName as exc:
                raise Failure(str(exc)) from None
            context.log.info(f"signal {signal_id}: incremental snapshot of {expected} rows of {table.name} requested")

            requested = time.monotonic()

            def report(progress: SnapshotProgress) -> None:
                chunk = f", chunk {progress.chunk[0]} of {progress.chunk[1]}" if progress.chunk else ""
                done = ", complete" if progress.completed else ""
                context.log.info(
                    f"backfill {table.name}: {progress.seen} of {progress.expected} rows snapshotted "
                    f"({progress.fraction:.0%}{chunk}{done}) after {time.monotonic() - requested:.0f} s"
                )

            try:
                progress = follow_snapshot(
                    consumer, topic=topic, notification_topic=notification_topic, start=start,
                    notification_start=notification_start, signal_id=signal_id, table=table.collection_id,
                    expected=expected,
                    timeout=timeout, on_acknowledged=lock.release, on_progress=report,
                )  # fmt: skip
            except (SnapshotFailed, TimeoutError) as exc:
                raise Failure(str(exc)) from None
    finally:  # closing the connection releases the lock if it is still held
        consumer.close()
    applied_lag = None
    if wait_applied:
        try:
            applied_lag = wait_until_applied(
                lambda: stream_lag(kafka, config), topic, progress.end_offsets, timeout
            ).total
        except NotApplied as exc:
            raise Failure(f"the snapshot of {table.name} is in Kafka but {exc}") from None
        context.log.info(f"backfill {table.name}: applied by the stream")
    return {
        "table": table.name, "signal_id": signal_id, "condition": condition or "", "expected_rows": expected,
        "snapshotted_rows": progress.seen, "snapshot_records": progress.records,
        "debezium_rows_scanned": progress.rows_scanned if progress.rows_scanned is not None else -1,
        "scan_status": progress.scan_status or "", "applied": applied_lag is not None,
        "lag_after": applied_lag if applied_lag is not None else -1,
    }  # fmt: skip


def _configured_table(pipeline_config: PipelineConfig, name: str) -> TableConfig:
    """The table `name` of pipeline.yaml, or a run failure that lists the configured tables."""
    try:
        return pipeline_config.table(name)
    except KeyError as exc:
        raise Failure(f"{exc.args[0]}; tables: {[t.name for t in pipeline_config.tables]}") from None


def build_backfill_job(translator: CdcTranslator) -> JobDefinition:
    @op(
        name=translator.name("backfill_table_op"),
        description="Re-read a table (or the rows matching a filter) from PostgreSQL through Debezium.",
    )
    @translator.with_resource_keys
    def backfill_table_op(
        context: OpExecutionContext,
        config: BackfillConfig,
        control_plane: ControlPlaneResource,
        postgres: PostgresResource,
        kafka: KafkaResource,
        kafka_connect: KafkaConnectResource,
    ) -> None:
        pipeline_config = control_plane.load()
        table = _configured_table(pipeline_config, config.table)
        result = run_backfill(
            context, pipeline_config, table, config.condition, postgres, kafka, kafka_connect, config.timeout_s,
            config.wait_applied,
        )  # fmt: skip
        for key in translator.replica_keys(table):
            context.log_event(AssetObservation(asset_key=key, metadata={"backfill": result}))
        context.log.info(json.dumps(result))

    @job(
        name=translator.name("backfill_table"),
        description="Backfill a table through a Debezium incremental snapshot (signal table), with progress.",
    )
    def backfill_table() -> None:
        backfill_table_op()

    return backfill_table


# --- replay ---------------------------------------------------------------------------------------


class ReplayConfig(Config):
    table: str = Field(
        description='Source table whose topic is replayed, as in pipeline.yaml (`public.orders`, `public."User"`).'
    )
    start_offset: int | None = Field(default=None, description="First offset (partition 0), inclusive.")
    end_offset: int | None = Field(default=None, description="Last offset, exclusive; default the current end.")
    start_time: str | None = Field(default=None, description="ISO 8601 start of a time window (instead of offsets).")
    end_time: str | None = Field(default=None, description="ISO 8601 end of the time window; default now.")
    timeout_s: float = Field(default=3600, description="Stop the Spark job and fail if it has not finished by then.")


REPLAY_NOTE_S = 30.0  # a replay logs that it is still at work this often


def _offset_for_time(consumer: Any, topic: str, partition: int, when: str, default: int) -> int:
    moment = datetime.fromisoformat(when)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    found = consumer.offsets_for_times([TopicPartition(topic, partition, int(moment.timestamp() * 1000))], timeout=10)
    return found[0].offset if found and found[0].offset >= 0 else default


def build_replay_job(translator: CdcTranslator) -> JobDefinition:
    @op(
        name=translator.name("replay_op"),
        description="Replay a range of a table's topic into ClickHouse (Spark batch job, same writer as the stream).",
    )
    @translator.with_resource_keys
    def replay_op(
        context: OpExecutionContext,
        config: ReplayConfig,
        control_plane: ControlPlaneResource,
        spark: SparkResource,
        kafka: KafkaResource,
        clickhouse: ClickHouseResource,
    ) -> None:
        pipeline_config = control_plane.load()
        table = _configured_table(pipeline_config, config.table)
        if (config.start_offset is None) == (config.start_time is None):
            raise Failure("give exactly one of start_offset or start_time")
        topic = pipeline_config.topic_for(table)
        consumer = kafka.consumer(f"{pipeline_config.consumer_group}-replay")
        try:
            ends = end_offsets(consumer, topic)
            if not ends:
                raise Failure(f"topic {topic} does not exist: nothing was captured for {table.name} yet")
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10, cached=False)
            if config.start_time is not None:
                start = _offset_for_time(consumer, topic, 0, config.start_time, high)
                end = _offset_for_time(consumer, topic, 0, config.end_time, high) if config.end_time else high
            else:
                start = config.start_offset
                end = config.end_offset if config.end_offset is not None else high
        finally:
            consumer.close()
        if start < low:
            raise Failure(f"offset {start} of {topic} is gone (retention); the earliest is {low}: backfill instead")
        end = min(end, high)
        if end <= start:
            context.log.info(f"{topic}: empty range [{start}, {end}), nothing to replay")
            return
        context.log.info(
            f"replaying {topic} offsets [{start}, {end}) ({end - start} records) with spark-submit on {spark.master}"
        )
        # spark-submit in its own process group, stopped on timeout (control/replay_runner.py).
        started = time.monotonic()
        try:
            outcome = run_replay(
                lambda result_file: spark.submit().argv(
                    replay_app.__file__,
                    *replay_arguments(control_plane.resolved_config_path, topic, start, end, result_file),
                    name=f"{pipeline_config.query_name}_replay",
                ),
                env=submit_env(stream_env(kafka, clickhouse, control_plane), master=spark.master),
                timeout_s=config.timeout_s,
                on_progress=lambda elapsed: context.log.info(
                    f"replay of {topic} [{start}, {end}): {end - start} records, running for {elapsed:.0f} s"
                ),
                note_every_s=REPLAY_NOTE_S,
            )
        except ReplayTimeout as exc:
            raise Failure(
                f"replay of {topic} [{start}, {end}) did not finish in {config.timeout_s:.0f} s and "
                "was stopped; nothing is lost (a replay only re-applies), run it again with a larger "
                "timeout_s or a smaller range:\n" + "\n".join(exc.tail)
            ) from None
        summary = outcome.result
        if outcome.returncode != 0 or summary is None:
            raise Failure(f"replay of {topic} failed (exit {outcome.returncode}):\n" + "\n".join(outcome.output[-40:]))
        summary.update(topic=topic, start_offset=start, end_offset=end, seconds=round(time.monotonic() - started, 1))
        context.log.info(f"replayed: {summary}")
        for key in translator.replica_keys(table):
            context.log_event(AssetObservation(asset_key=key, metadata={"replay": summary}))

    @job(
        name=translator.name("replay"),
        description="Replay a topic range (offsets or a time window) into ClickHouse; idempotent.",
    )
    def replay() -> None:
        replay_op()

    return replay


# --- reconcile ------------------------------------------------------------------------------------


MAX_SIGNAL_FILTER_CHARS = 1800


class ReconcileConfig(Config):
    tables: list[str] = Field(default_factory=list, description="Tables to reconcile; empty: every table.")
    backfill_differences: bool = Field(
        default=False, description="Backfill missing and different rows (incremental snapshot of their keys)."
    )
    settle_s: float = Field(default=120, description="Wait for the stream's lag to reach zero before comparing.")
    max_filter_keys: int = Field(default=500, description="More differing keys than this: backfill the whole table.")


def _key_filter(conn: psycopg.Connection, key: list[str], values: list[tuple]) -> str:
    columns = sql.SQL(", ").join(sql.Identifier(k) for k in key)
    tuples = sql.SQL(", ").join(
        sql.SQL("({})").format(sql.SQL(", ").join(sql.Literal(v) for v in row)) for row in values
    )
    return sql.SQL("({}) IN ({})").format(columns, tuples).as_string(conn)


def _differences_md(diff: Differences, limit: int = 50) -> str:
    lines = ["| kind | key | columns (source → replica) |", "|---|---|---|"]
    for key in diff.missing[:limit]:
        lines.append(f"| missing | {key} | |")
    for key in diff.extra[:limit]:
        lines.append(f"| extra | {key} | |")
    for key, columns in list(diff.different.items())[:limit]:
        change = ", ".join(f"{c}: {s!r} → {r!r}" for c, (s, r) in columns.items())
        lines.append(f"| different | {key} | {change[:300]} |")
    return "\n".join(lines)


@contextmanager
def _replicas(
    translator: CdcTranslator,
    config: PipelineConfig,
    table: TableConfig,
    clickhouse: ClickHouseResource,
    warehouse: PostgresResource,
) -> Iterator[list[tuple[Replica, AssetKey]]]:
    """The replicas of `table` (ClickHouse, the warehouse or both, per its `sinks`) with their asset keys."""
    sink, database = config.sink_table(table), database_of(config, clickhouse)
    with ExitStack() as stack:
        replicas: list[tuple[Replica, AssetKey]] = []
        if "clickhouse" in table.sinks:
            client = clickhouse.client()
            stack.callback(client.close)
            replicas.append((ClickHouseReplica(client, database, sink), translator.sink_key(table)))
        if "warehouse" in table.sinks:
            conn = stack.enter_context(warehouse.connect(autocommit=True))
            replicas.append((WarehouseReplica(conn, database, sink), translator.warehouse_key(table)))
        yield replicas


def _reconcile_settled(
    context: OpExecutionContext, config: PipelineConfig, table: TableConfig, postgres: PostgresResource,
    kafka: KafkaResource, replica: Replica, options: ReconcileConfig,
) -> Differences:  # fmt: skip
    """Compare after the stream caught up; keys that differ are compared once more after a pause,
    so a change in flight at the first pass is not reported."""
    deadline = time.monotonic() + options.settle_s
    while (lag := stream_lag(kafka, config).total) and time.monotonic() < deadline:
        time.sleep(2)
    if lag:
        context.log.warning(
            f"{table.name}: the stream still lags by {lag} after {options.settle_s:.0f} s; differences may be in "
            "flight (is the stream running?)"
        )
    with postgres.connect(autocommit=True) as conn:
        key = primary_key(conn, table)
        captured = source_columns(conn, table)
        diff = reconcile(conn, replica, table.schema_name, table.table_name, key, captured)
        if diff.total:
            time.sleep(min(10.0, options.settle_s))
            again = reconcile(conn, replica, table.schema_name, table.table_name, key, captured)
            still_missing, still_extra = set(again.missing), set(again.extra)
            diff.missing = [k for k in diff.missing if k in still_missing]
            diff.extra = [k for k in diff.extra if k in still_extra]
            diff.different = {k: v for k, v in again.different.items() if k in diff.different}
    diff.unsettled_lag = lag
    return diff


def _repair(
    context: OpExecutionContext, config: PipelineConfig, table: TableConfig, diff: Differences,
    postgres: PostgresResource, kafka: KafkaResource, replica: Replica, options: ReconcileConfig,
    connect: KafkaConnectResource,
) -> dict[str, Any]:  # fmt: skip
    """Backfill the missing and different keys; mark extra rows deleted (they are not in the source,
    so a snapshot cannot remove them)."""
    result: dict[str, Any] = {}
    with postgres.connect(autocommit=True) as conn:
        key = primary_key(conn, table)
        keys = diff.keys_to_backfill()
        condition = _key_filter(conn, key, keys) if 0 < len(keys) <= options.max_filter_keys else None
        if condition and len(condition) > MAX_SIGNAL_FILTER_CHARS:
            condition = None  # the signal table's `data` column is varchar(2048) in Debezium's documented DDL
        # The stale rows' versions are read before the source is asked whether the keys exist: a key the
        # source gains meanwhile arrives through the stream with a higher version than the marker's.
        stale = replica.live_versions(key, diff.extra) if diff.extra else {}
        existing = _existing_keys(conn, table, key, list(stale))
        extra = {k: found for k, found in stale.items() if k not in existing}
    if extra:
        replica.mark_deleted(key, extra)
        result["extra_marked_deleted"] = len(extra)
    if keys:
        context.log.info(
            f"backfilling {len(keys)} rows of {table.name}" + ("" if condition else " (whole table: too many keys)")
        )
        result.update(run_backfill(context, config, table, condition, postgres, kafka, connect, 3600, True))
    return result


def _existing_keys(conn: psycopg.Connection, table: TableConfig, key: list[str], keys: list[tuple]) -> set[tuple]:
    found: set[tuple] = set()
    for start in range(0, len(keys), 500):
        query = sql.SQL("SELECT {} FROM {} WHERE ").format(
            sql.SQL(", ").join(sql.Identifier(k) for k in key), sql.Identifier(table.schema_name, table.table_name)
        ) + sql.SQL(_key_filter(conn, key, keys[start : start + 500]))
        found |= {tuple(normalize(v) for v in row) for row in conn.execute(query)}  # as the diff has keys
    return found


def build_reconcile_job(translator: CdcTranslator) -> JobDefinition:
    @op(
        name=translator.name("reconcile_op"),
        description="Row-level diff by primary key between each source table and its replicas.",
    )
    @translator.with_resource_keys
    def reconcile_op(
        context: OpExecutionContext,
        config: ReconcileConfig,
        control_plane: ControlPlaneResource,
        postgres: PostgresResource,
        kafka: KafkaResource,
        clickhouse: ClickHouseResource,
        warehouse: PostgresResource,
        kafka_connect: KafkaConnectResource,
    ) -> Output[dict]:
        pipeline_config = control_plane.load()
        try:
            tables = [pipeline_config.table(name) for name in config.tables] or pipeline_config.tables
        except KeyError as exc:
            raise Failure(exc.args[0]) from None
        report: dict[str, Any] = {}
        unresolved: list[str] = []
        for table in tables:
            with _replicas(translator, pipeline_config, table, clickhouse, warehouse) as replicas:
                for replica, asset_key in replicas:
                    name = table.name if replica.kind == "clickhouse" else f"{table.name} ({replica.kind})"
                    diff = _reconcile_settled(context, pipeline_config, table, postgres, kafka, replica, config)
                    summary = {
                        "sink": replica.kind, "source_rows": diff.source_rows, "replica_rows": diff.replica_rows,
                        "missing": len(diff.missing), "extra": len(diff.extra), "different": len(diff.different),
                        "missing_keys": [list(map(str, k)) for k in diff.missing[:100]],
                        "extra_keys": [list(map(str, k)) for k in diff.extra[:100]],
                        "different_keys": [list(map(str, k)) for k in list(diff.different)[:100]],
                        "columns_not_in_replica": diff.columns_not_in_replica, "replica_exists": diff.replica_exists,
                        "lag_at_compare": diff.unsettled_lag,
                    }  # fmt: skip
                    context.log.info(
                        f"{name}: {diff.source_rows} source rows, {diff.replica_rows} replica rows; "
                        f"missing {len(diff.missing)}, extra {len(diff.extra)}, different {len(diff.different)}"
                    )
                    if diff.total and config.backfill_differences:
                        summary["backfill"] = _repair(
                            context, pipeline_config, table, diff, postgres, kafka, replica, config, kafka_connect
                        )
                        diff = _reconcile_settled(context, pipeline_config, table, postgres, kafka, replica, config)
                        summary["after_backfill"] = {"missing": len(diff.missing), "extra": len(diff.extra),
                                                     "different": len(diff.different)}  # fmt: skip
                    if diff.total:
                        unresolved.append(name)
                    report[name] = summary
                    context.log_event(
                        AssetObservation(
                            asset_key=asset_key,
                            metadata={"reconcile": MetadataValue.json(summary),
                                      "differences": MetadataValue.md(_differences_md(diff))},
                        )
                    )  # fmt: skip
        if unresolved:
            raise Failure(
                description=f"replicas differ from their source: {unresolved} (run with backfill_differences: true)",
                metadata={"report": MetadataValue.json(report)},
            )
        return Output(report, metadata={"report": MetadataValue.json(report)})

    @job(
        name=translator.name("reconcile_tables"),
        description="Diff each replica with its source by primary key; optionally backfill what differs.",
    )
    def reconcile_tables() -> None:
        reconcile_op()

    return reconcile_tables


def build_jobs(translator: CdcTranslator) -> list[JobDefinition]:
    """The operator's jobs of one pipeline; every observation they record goes to `translator`'s keys."""
    return [
        *build_stream_jobs(translator), *build_connector_jobs(translator), build_backfill_job(translator),
        build_replay_job(translator), build_reconcile_job(translator),
    ]  # fmt: skip

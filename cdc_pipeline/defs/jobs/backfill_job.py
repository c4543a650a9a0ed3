"""backfill_table: re-read a table (or the rows matching a filter) through a Debezium incremental
snapshot, follow it until complete and wait until the stream applied it (control/backfill.py,
control/source.py, control/notifications.py). `run_backfill` is also the reconcile job's repair."""

import json
import time
from typing import Any

from dagster import AssetObservation, Config, Failure, JobDefinition, OpExecutionContext, job, op
from pydantic import Field

from cdc_pipeline.config import PipelineConfig, TableConfig
from cdc_pipeline.connector import connector_name
from cdc_pipeline.control import notifications
from cdc_pipeline.control.backfill import (
    NotApplied,
    SnapshotFailed,
    SnapshotProgress,
    end_offsets,
    follow_snapshot,
    wait_until_applied,
)
from cdc_pipeline.control.source import (
    SignalLock,
    SignalLockTimeout,
    UnsupportedSnapshotName,
    exact_count,
    request_incremental_snapshot,
)
from cdc_pipeline.defs.common import stream_lag
from cdc_pipeline.defs.translator import CdcTranslator
from cdc_pipeline.resources import ControlPlaneResource, KafkaConnectResource, KafkaResource, PostgresResource
from cdc_pipeline.sqlcheck import InvalidFragment, validate_condition


class BackfillConfig(Config):
    table: str = Field(
        description='Source table of the pipeline to backfill, as in pipeline.yaml (`public.orders`, `public."User"`).'
    )
    condition: str | None = Field(
        default=None, description="Optional SQL filter on the source table, e.g. `updated_at > '2026-01-01'`."
    )
    timeout_s: float = Field(default=3600, description="Fail if the snapshot has not finished by then.")
    wait_applied: bool = Field(default=True, description="Also wait until the stream applied the snapshot.")


def _notification_topic(connect: KafkaConnectResource, pipeline: PipelineConfig) -> str:
    """The connector's notification topic; Failure unless it runs with the sink notification channel."""
    name = connector_name(pipeline)
    try:
        status = connect.connector_status(name)
        stored = connect.connector_config(name)
    except Exception as exc:
        raise Failure(f"cannot read connector {name} (run the provision job?): {exc}") from None
    try:
        return notifications.notification_topic(name, status, stored)
    except notifications.NotificationsUnavailable as exc:
        raise Failure(str(exc)) from None


def run_backfill(
    context: OpExecutionContext,
    pipeline: PipelineConfig,
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
    notification_topic = _notification_topic(connect, pipeline)
    topic = pipeline.topic_for(table)
    consumer = kafka.consumer(f"{pipeline.consumer_group}-backfill", **{"enable.partition.eof": False})
    try:
        # The signal connection holds the pipeline's backfill lock until Debezium acknowledged the signal:
        # two signals it takes in at once would be reported under one id only (see control/backfill.py).
        with postgres.connect(autocommit=True) as conn:
            lock = SignalLock(conn, pipeline.name)
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
                signal_id = request_incremental_snapshot(conn, pipeline, table, condition)
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
                lambda: stream_lag(kafka, pipeline), topic, progress.end_offsets, timeout
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


def configured_table(pipeline: PipelineConfig, name: str) -> TableConfig:
    """The table `name` of pipeline.yaml, or a run failure that lists the configured tables."""
    try:
        return pipeline.table(name)
    except KeyError as exc:
        raise Failure(f"{exc.args[0]}; tables: {[t.name for t in pipeline.tables]}") from None


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
        pipeline = control_plane.load()
        table = configured_table(pipeline, config.table)
        result = run_backfill(
            context, pipeline, table, config.condition, postgres, kafka, kafka_connect, config.timeout_s,
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

"""start_stream, stop_stream, restart_stream and stream_status: the streaming query's lifecycle
(control/stream.py through the control-plane resource), each observing the stream asset."""

from typing import Any

from dagster import AssetKey, AssetObservation, JobDefinition, MetadataValue, OpExecutionContext, job, op

from cdc_pipeline.connector import connector_name
from cdc_pipeline.defs import common
from cdc_pipeline.defs.common import AUTOMATIC_TAG, lag_metadata, stream_lag
from cdc_pipeline.defs.translator import CdcTranslator
from cdc_pipeline.resources import (
    ClickHouseResource,
    ControlPlaneResource,
    KafkaConnectResource,
    KafkaResource,
    SparkResource,
)


def _observe_status(context: OpExecutionContext, key: AssetKey, status: Any, **extra: Any) -> None:
    metadata = {k: v for k, v in status.as_dict().items() if v is not None}
    context.log_event(AssetObservation(asset_key=key, metadata={**metadata, **extra}))


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
        pipeline = control_plane.load()
        status = common.start_stream(control_plane, spark, kafka, clickhouse, started_by=context.run_id)
        context.log.info(
            f"stream {pipeline.query_name} runs as pid {status.pid} on {status.master}; log {status.log_path}"
        )
        _observe_status(context, stream_key, status)

    @op(
        name=translator.name("stop_stream_op"),
        description="Stop the streaming query: it finishes its batch and exits; SIGKILL only after a timeout.",
    )
    @translator.with_resource_keys
    def stop_stream_op(context: OpExecutionContext, control_plane: ControlPlaneResource) -> None:
        pipeline = control_plane.load()
        controller = control_plane.controller(pipeline)
        stopped = controller.stop()
        context.log.info(f"stream {pipeline.query_name}: {'stopped' if stopped else 'was not running'}")
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
        pipeline = control_plane.load()
        controller = control_plane.controller(pipeline)
        if context.run.tags.get(AUTOMATIC_TAG) and controller.status().desired != "running":
            # Requested by the checkpoint sensor, but an operator stopped the stream since: theirs is the last word.
            context.log.info(
                f"stream {pipeline.query_name} was stopped on purpose since this restart was requested: skipped"
            )
            return
        controller.stop(desired="running")
        status = common.start_stream(control_plane, spark, kafka, clickhouse, started_by=context.run_id)
        context.log.info(f"stream {pipeline.query_name} restarted as pid {status.pid}")
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
        pipeline = control_plane.load()
        status = control_plane.controller(pipeline).status()
        lag = stream_lag(kafka, pipeline)
        try:
            connector = kafka_connect.connector_status(connector_name(pipeline))
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

"""The stream's sensors: consumer lag (alerts, and observations of the stream and topic assets),
checkpoint health (alerts, and restart runs with backoff) and stream metrics (each micro-batch as an
observation). Their rules are in control/stream_rules.py, their alerts in control/sensor_alerts.py."""

import time

from dagster import (
    AssetObservation,
    DefaultSensorStatus,
    JobDefinition,
    MetadataValue,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from cdc_pipeline.config import PipelineConfig
from cdc_pipeline.control.alerts import Incidents
from cdc_pipeline.control.backoff import RestartBackoff
from cdc_pipeline.control.checkpoint import UnsupportedCheckpoint, inspect_checkpoint
from cdc_pipeline.control.cursors import EPOCH, progress_cursor
from cdc_pipeline.control.lag import LagSnapshot
from cdc_pipeline.control.sensor_alerts import StreamPlace, checkpoint_update, kafka_update, lag_update
from cdc_pipeline.control.stream_rules import (
    CheckpointCursor,
    LagCursor,
    StreamObservation,
    lag_rule,
    started_at_epoch,
    stream_health,
    stream_restart_step,
)
from cdc_pipeline.defs.common import AUTOMATIC_TAG, progress_rows, stream_lag
from cdc_pipeline.defs.sensors.shell import active_runs, deliver
from cdc_pipeline.defs.translator import CdcTranslator
from cdc_pipeline.resources import (
    ClickHouseResource,
    ControlPlaneResource,
    KafkaResource,
    MonitorResource,
    NotifierResource,
)

# A run that starts the stream waits up to 300 s for the query (common.start_stream): while one this
# recent is active, a stream that is not running yet is being started, not dead.
START_GRACE_S = 600.0


def _lag_observations(
    translator: CdcTranslator, pipeline: PipelineConfig, snapshot: LagSnapshot
) -> list[AssetObservation]:
    by_topic = snapshot.by_topic()
    events = [
        AssetObservation(
            asset_key=translator.stream_key(),
            metadata={
                "total_lag": snapshot.total,
                "lag_by_partition": MetadataValue.json(
                    {f"{p.topic}[{p.partition}]": p.lag for p in snapshot.partitions}
                ),
            },
        )
    ]
    for table in pipeline.tables:
        topic = pipeline.topic_for(table)
        ends = [p.end_offset for p in snapshot.partitions if p.topic == topic]
        events.append(
            AssetObservation(
                asset_key=translator.topic_key(table),
                metadata={"consumer_lag": by_topic.get(topic, 0), "end_offset": sum(ends), "partitions": len(ends)},
            )
        )
    return events


def build_lag_sensor(translator: CdcTranslator) -> SensorDefinition:
    """consumer_lag: Burrow's rules over a window of lag snapshots (`lag_rule`); Kafka unreachable is an
    incident of its own."""

    @sensor(
        name=translator.name("consumer_lag"),
        minimum_interval_seconds=30,
        default_status=DefaultSensorStatus.RUNNING,
        description="Lag of the stream's consumer group per topic-partition; alerts when it stays above the "
        "threshold, keeps growing or stops moving over the window, and when it recovers.",
    )
    @translator.with_resource_keys
    def consumer_lag(
        context: SensorEvaluationContext,
        control_plane: ControlPlaneResource,
        kafka: KafkaResource,
        notifier: NotifierResource,
        monitor: MonitorResource,
    ) -> SensorResult:
        pipeline = control_plane.load()
        cursor = LagCursor.parse(context.cursor)
        incidents = Incidents(cursor.incidents)
        try:
            snapshot = stream_lag(kafka, pipeline)
        except Exception as exc:  # an unreachable Kafka is an incident, not a silent sensor error
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}" if str(exc) else type(exc).__name__
            deliver(context, incidents, notifier, kafka_update(pipeline, kafka.bootstrap_servers, error))
            return SensorResult(cursor=LagCursor(cursor.window, incidents.state).serialize())
        deliver(context, incidents, notifier, kafka_update(pipeline, kafka.bootstrap_servers, None))
        verdict, window = lag_rule(cursor.window, snapshot, monitor.lag_threshold, monitor.lag_window)
        deliver(context, incidents, notifier, lag_update(pipeline, snapshot, verdict, monitor.lag_threshold))
        return SensorResult(
            asset_events=_lag_observations(translator, pipeline, snapshot),
            cursor=LagCursor(window, incidents.state).serialize(),
        )

    return consumer_lag


def build_checkpoint_sensor(translator: CdcTranslator, restart_stream_job: JobDefinition) -> SensorDefinition:
    """checkpoint_health: the stream's liveness and progress (`stream_health`); requests `restart_stream_job`
    runs with backoff when enabled."""

    @sensor(
        name=translator.name("checkpoint_health"),
        minimum_interval_seconds=60,
        default_status=DefaultSensorStatus.RUNNING,
        job=restart_stream_job,
        description="The stream is alive, commits batches while there is lag, no batch hangs uncommitted and the "
        "checkpoint is readable; alerts otherwise and, if enabled, restarts the stream with backoff.",
    )
    @translator.with_resource_keys
    def checkpoint_health(
        context: SensorEvaluationContext,
        control_plane: ControlPlaneResource,
        kafka: KafkaResource,
        notifier: NotifierResource,
        monitor: MonitorResource,
    ) -> SensorResult:
        pipeline = control_plane.load()
        cursor = CheckpointCursor.parse(context.cursor)
        status = control_plane.controller(pipeline).status()
        location = control_plane.checkpoint(pipeline)
        now = time.time()
        try:
            checkpoint = inspect_checkpoint(location)
        except UnsupportedCheckpoint as exc:
            checkpoint = None
            context.log.debug(str(exc))
        starting = any(
            active_runs(context, job, START_GRACE_S)
            for job in (translator.name("start_stream"), restart_stream_job.name)
        )
        try:
            lag = stream_lag(kafka, pipeline)
        except Exception as exc:  # the lag sensor alerts on Kafka itself; the other rules still apply
            context.log.warning(f"no lag reading: {exc}")
            lag = None
        committed = lag.committed_total if lag is not None else None
        observation = StreamObservation(
            now=now, desired=status.desired, running=status.running, pid=status.pid,
            started_at=started_at_epoch(status.started_at), starting=starting, location=location,
            checkpoint=checkpoint, lag_total=lag.total if lag is not None else None, committed=committed,
        )  # fmt: skip
        health = stream_health(observation, cursor.committed, monitor.stall_after_s, monitor.restart_stream)
        problems = health.problems
        incidents = Incidents(cursor.incidents)
        backoff = RestartBackoff(cursor.restart)
        place = StreamPlace(
            location=location, pid=status.pid, log_path=status.log_path,
            last_committed_batch=checkpoint.last_committed_batch if checkpoint else "?",
            lag=lag.total if lag is not None else "unknown",
        )  # fmt: skip
        # While a start/restart run brings the stream up, the incident and the backoff stay as they are.
        if not health.settling:
            deliver(context, incidents, notifier, checkpoint_update(pipeline, problems, place, monitor.restart_stream))
        wanted = health.restart and backoff.due(now)
        queued = wanted and active_runs(context, restart_stream_job.name)
        if queued:
            context.log.info("a restart_stream run is already queued or running; not requesting another")
        step = stream_restart_step(health, wanted and not queued)
        run_requests = []
        if step == "restart":
            delay = backoff.record_attempt(now, monitor.restart_backoff_s, monitor.restart_backoff_max_s)
            context.log.warning(
                f"restarting the stream (attempt {backoff.attempts}); next attempt no sooner than {delay:.0f} s"
            )
            run_requests.append(
                RunRequest(
                    run_key=f"restart-{pipeline.name}-{int(now)}",
                    tags={"cdc/reason": ",".join(problems), AUTOMATIC_TAG: "true"},
                )
            )
        elif step == "wait":
            backoff.failing()
        elif step == "healthy":
            backoff.healthy(now, monitor.restart_backoff_reset_s)
        metadata = {"running": status.running, "desired": status.desired, "problems": MetadataValue.json(problems)}
        if checkpoint is not None:
            metadata.update({k: v for k, v in checkpoint.as_metadata().items() if v is not None})
        return SensorResult(
            run_requests=run_requests,
            asset_events=[AssetObservation(asset_key=translator.stream_key(), metadata=metadata)],
            cursor=CheckpointCursor(incidents.state, backoff.state, committed).serialize(),
        )

    return checkpoint_health


def build_stream_metrics_sensor(translator: CdcTranslator) -> SensorDefinition:
    """stream_metrics: the stream's progress rows newer than the cursor, as observations of the stream."""

    @sensor(
        name=translator.name("stream_metrics"),
        minimum_interval_seconds=30,
        default_status=DefaultSensorStatus.RUNNING,
        description="Records each micro-batch's input rate, processing rate, duration and dead letters as "
        "observations of the streaming query (from the stream's progress table in ClickHouse).",
    )
    @translator.with_resource_keys
    def stream_metrics(
        context: SensorEvaluationContext, control_plane: ControlPlaneResource, clickhouse: ClickHouseResource
    ) -> SensorResult | SkipReason:
        pipeline = control_plane.load()
        rows = progress_rows(clickhouse, pipeline, context.cursor or EPOCH)
        if not rows:
            return SkipReason("no new micro-batches")
        key = translator.stream_key()
        events = [
            AssetObservation(
                asset_key=key,
                metadata={
                    "batch_id": row["batch_id"], "num_input_rows": row["num_input_rows"],
                    "input_rows_per_second": float(row["input_rows_per_second"]),
                    "processed_rows_per_second": float(row["processed_rows_per_second"]),
                    "batch_duration_ms": row["batch_duration_ms"], "applied_rows": row["applied_rows"],
                    "deleted_rows": row["deleted_rows"], "dlq_count": row["dlq_count"],
                    "latest_source_ts": str(row["latest_source_ts"] or ""),
                },
            )
            for row in rows
        ]  # fmt: skip
        return SensorResult(asset_events=events, cursor=progress_cursor(rows[-1]["recorded_at"]))

    return stream_metrics

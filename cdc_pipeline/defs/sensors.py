"""Sensors: consumer lag, checkpoint health, connector status, replication (slot retention, paused or
missing connector), run failures, failed ERROR checks and streaming metrics.
Each keeps its state (sliding window, open incidents, restart backoff) in its cursor, so an incident
alerts once when it opens and once when it clears, across daemon restarts."""

import json
import logging
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dagster import (
    AssetCheckKey,
    AssetObservation,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    DefaultSensorStatus,
    JobDefinition,
    MetadataValue,
    RunRequest,
    RunsFilter,
    RunStatusChangeRecordsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from cdc_pipeline.config import PipelineConfig
from cdc_pipeline.connector import connector_name
from cdc_pipeline.control.alerts import Alert, Incidents
from cdc_pipeline.control.backoff import RestartBackoff
from cdc_pipeline.control.checkpoint import UnsupportedCheckpoint, inspect_checkpoint
from cdc_pipeline.control.lag import LagSnapshot
from cdc_pipeline.control.rules import (
    CheckOutcome,
    Verdict,
    connector_failures,
    connector_missing,
    connector_paused,
    failed_error_check,
    slot_retention,
)
from cdc_pipeline.control.source import slot_observation
from cdc_pipeline.control.stream_rules import (
    CheckpointCursor,
    LagCursor,
    StreamObservation,
    lag_rule,
    stream_health,
)
from cdc_pipeline.defs.common import AUTOMATIC_TAG, progress_rows, stream_lag
from cdc_pipeline.defs.translator import CdcTranslator
from cdc_pipeline.resources import (
    ClickHouseResource,
    ControlPlaneResource,
    KafkaConnectResource,
    KafkaResource,
    MonitorResource,
    NotifierResource,
    PostgresResource,
)
from cdc_pipeline.resources.connect import ConnectError

log = logging.getLogger(__name__)


def _cursor(context: SensorEvaluationContext) -> dict[str, Any]:
    try:
        return json.loads(context.cursor) if context.cursor else {}
    except ValueError:
        return {}


def _update(
    context: SensorEvaluationContext,
    incidents: Incidents,
    notifier: NotifierResource,
    incident: str,
    active: bool,
    make,
) -> Alert | None:  # noqa: ANN001
    """Open/close `incident`, delivering the alert; a delivery failure is logged and retried next time."""
    try:
        alert = incidents.update(incident, active, make, notifier.send)
    except Exception as exc:
        context.log.error(f"could not deliver the alert for {incident}: {exc}")
        return None
    if alert:
        context.log.info(f"alert sent: {alert.text().splitlines()[0]}")
    return alert


def redact_url(url: str) -> str:
    """`url` without user and password (they are credentials; alerts and logs must not carry them)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")))


def _kafka_alert(config: PipelineConfig, kafka: KafkaResource, error: str):  # noqa: ANN202
    def make(resolved: bool) -> Alert:
        return Alert(
            incident=f"kafka:{config.name}",
            title=f"Kafka {'is reachable again' if resolved else 'is unreachable'} for pipeline {config.name}",
            where=f"bootstrap servers {kafka.bootstrap_servers}",
            summary="lag can be measured again" if resolved else f"cannot read offsets: {error}",
            action="check the brokers and the network from the Dagster daemon's host; lag is not monitored meanwhile",
            resolved=resolved,
        )

    return make


ACTIVE_RUN_STATUSES = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
]
# Kafka Connect calls from a sensor: the daemon gives an evaluation 60 s in all.
CONNECT_BUDGET_S = 20.0
# A run that starts the stream waits up to 300 s for the query (common.start_stream): while one this
# recent is active, a stream that is not running yet is being started, not dead.
START_GRACE_S = 600.0


def _active_runs(context: SensorEvaluationContext, job_name: str, newer_than_s: float | None = None) -> bool:
    records = context.instance.get_run_records(filters=RunsFilter(job_name=job_name, statuses=ACTIVE_RUN_STATUSES))
    now = time.time()
    return any(newer_than_s is None or now - r.create_timestamp.timestamp() < newer_than_s for r in records)


def _started_at(started_at: str | None) -> float:
    try:
        return datetime.fromisoformat(started_at).timestamp() if started_at else 0.0
    except ValueError:
        return 0.0


def _lag_observations(translator: CdcTranslator, pipeline: PipelineConfig, snapshot: LagSnapshot) -> list:
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


RUN_FAILURE_BATCH = 50
MAX_UNDELIVERED = 100
RUN_ALERT_BUDGET_S = 30.0


def _in_this_location(context: SensorEvaluationContext, run: DagsterRun) -> bool:
    """Whether `run` belongs to the sensor's code location (as Dagster's run-status sensors decide; a
    run executed in-process has no location, nor does a sensor evaluated outside a daemon)."""
    origin = run.remote_job_origin
    run_location = origin.repository_origin.code_location_origin.location_name if origin else None
    location = context.code_location_origin.location_name if context.code_location_origin else None
    return run_location == location


def _step_errors(instance: DagsterInstance, run_id: str, limit: int = 3) -> list[str]:
    """`step: first line of its error` for the run's failed steps."""
    errors = []
    for record in instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_FAILURE).records:
        event = record.event_log_entry.dagster_event
        data = event.step_failure_data if event else None
        if data is None:
            continue
        user = data.user_failure_data.description if data.user_failure_data else None
        message = user or (data.error.message if data.error else "") or "no message"
        errors.append(f"{event.step_key}: {message.strip().splitlines()[0][:400]}")
    return errors[:limit]


def _run_failure_alert(instance: DagsterInstance, run: DagsterRun) -> Alert:
    errors = _step_errors(instance, run.run_id)
    launched_by = run.tags.get("dagster/schedule_name") or run.tags.get("dagster/sensor_name") or "a user"
    return Alert(
        incident=f"run:{run.run_id}",
        title=f"Run of {run.job_name} failed",
        where=f"job {run.job_name}, run {run.run_id}",
        summary="; ".join(errors) or "the run failed before any step ran (see the run's event log)",
        action="open the run in the Dagster UI for the failed step's error and logs, fix, then re-execute",
        severity="warning",
        details={"launched_by": launched_by},
    )


def _connector_gone(config: PipelineConfig, name: str):  # noqa: ANN202
    def make(resolved: bool) -> Alert:
        return Alert(
            incident=f"connector:{config.name}",
            title=f"Debezium connector {name} no longer exists",
            where=f"connector {name}",
            summary="it was deleted; nothing is captured until the provision job creates it again",
            action="run the provision job",
            resolved=resolved,
        )

    return make


def _verdict_alert(incident: str, title: str, recovered: str, where: str, verdict: Verdict, action: str):  # noqa: ANN202
    """`make(resolved)` for Incidents.update from a rule's verdict."""

    def make(resolved: bool) -> Alert:
        return Alert(
            incident=incident,
            title=recovered if resolved else title,
            where=where,
            summary=verdict.summary,
            action=action,
            details={} if resolved else verdict.details,
            resolved=resolved,
        )

    return make


def _latest_check_outcome(instance: DagsterInstance, key: AssetCheckKey) -> CheckOutcome | None:
    """The newest completed (passed or failed) evaluation of `key`, if any."""
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

    records = instance.event_log_storage.get_asset_check_execution_history(
        key,
        limit=1,
        status={AssetCheckExecutionRecordStatus.SUCCEEDED, AssetCheckExecutionRecordStatus.FAILED},
    )
    event = records[0].event.dagster_event if records and records[0].event else None
    evaluation = event.event_specific_data if event else None
    if evaluation is None or not hasattr(evaluation, "passed"):
        return None
    metadata = {
        k: getattr(v, "value", v)
        for k, v in (evaluation.metadata or {}).items()
        if isinstance(getattr(v, "value", v), int | float | str | bool)
    }
    return CheckOutcome(
        asset=key.asset_key.to_user_string(),
        check=key.name,
        passed=evaluation.passed,
        severity=evaluation.severity.value,
        description=evaluation.description or "",
        metadata={**metadata, "run": records[0].run_id},
    )


def build_run_failure_sensor() -> SensorDefinition:
    """alert_on_run_failure: one per code location (it alerts on every failed run of the location, whichever
    pipeline the run belongs to), with the shared `notifier`."""

    @sensor(
        name="alert_on_run_failure",
        minimum_interval_seconds=30,
        default_status=DefaultSensorStatus.RUNNING,
        description="Alerts on every failed run of this code location, with the failed steps' errors; an alert "
        "the webhook did not take is sent again at the next evaluation.",
    )
    def alert_on_run_failure(context: SensorEvaluationContext, notifier: NotifierResource) -> SensorResult:
        state = _cursor(context)
        instance = context.instance
        if "after" not in state and "record_id" in state:  # the cursor of Dagster's run_failure_sensor
            state["after"] = state["record_id"]
        if "after" not in state:  # the first evaluation: failures from now on, not the instance's history
            latest = instance.fetch_run_status_changes(DagsterEventType.RUN_FAILURE, limit=1).records
            after = latest[0].storage_id if latest else 0
            return SensorResult(skip_reason="watching for failed runs", cursor=json.dumps({"after": after}))
        after, pending = state["after"], list(state.get("pending", []))
        records = instance.fetch_run_status_changes(
            RunStatusChangeRecordsFilter(DagsterEventType.RUN_FAILURE, after_storage_id=after),
            limit=RUN_FAILURE_BATCH, ascending=True,
        ).records  # fmt: skip
        for record in records:
            after = record.storage_id
            run = instance.get_run_by_id(record.event_log_entry.run_id)
            if run is not None and _in_this_location(context, run) and run.run_id not in pending:
                pending.append(run.run_id)
        undelivered: list[str] = []
        deadline = time.monotonic() + RUN_ALERT_BUDGET_S
        for index, run_id in enumerate(pending):
            if time.monotonic() > deadline:  # the rest at the next evaluation, inside the daemon's time limit
                undelivered += pending[index:]
                break
            run = instance.get_run_by_id(run_id)
            if run is None:
                continue
            try:
                notifier.send(_run_failure_alert(instance, run))
            except Exception as exc:
                # The webhook is down: keep this and the rest for the next evaluation rather than time out.
                context.log.error(f"could not deliver the alert for the failed run {run_id}: {exc}")
                undelivered += pending[index:]
                break
        if len(undelivered) > MAX_UNDELIVERED:
            context.log.error(f"dropping {len(undelivered) - MAX_UNDELIVERED} undelivered run-failure alerts")
            undelivered = undelivered[-MAX_UNDELIVERED:]
        return SensorResult(cursor=json.dumps({"after": after, "pending": undelivered}))

    return alert_on_run_failure


def build_sensors(translator: CdcTranslator, restart_stream_job: JobDefinition) -> list[SensorDefinition]:
    """The sensors of one pipeline (alert_on_run_failure is the location's: `build_run_failure_sensor`); their
    observations and alerts name `translator`'s asset keys, their names and resource keys are its own."""

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
        config = control_plane.load()
        cursor = LagCursor.parse(context.cursor)
        incidents = Incidents(cursor.incidents)
        try:
            snapshot = stream_lag(kafka, config)
        except Exception as exc:  # an unreachable Kafka is an incident, not a silent sensor error
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}" if str(exc) else type(exc).__name__
            _update(context, incidents, notifier, f"kafka:{config.name}", True, _kafka_alert(config, kafka, error))
            return SensorResult(cursor=LagCursor(cursor.window, incidents.state).serialize())
        _update(context, incidents, notifier, f"kafka:{config.name}", False, _kafka_alert(config, kafka, ""))
        verdict, window = lag_rule(cursor.window, snapshot, monitor.lag_threshold, monitor.lag_window)
        worst = sorted(snapshot.partitions, key=lambda p: -p.lag)[:3]

        def make(resolved: bool) -> Alert:
            return Alert(
                incident=f"lag:{config.name}",
                title=f"Consumer lag of pipeline {config.name}",
                where=f"consumer group {config.consumer_group}, query {config.query_name}",
                summary=(
                    f"lag is back to {snapshot.total} messages" if resolved
                    else f"{snapshot.total} messages not applied to ClickHouse: "
                    + "; ".join(verdict.reasons(monitor.lag_threshold))
                ),
                action=(
                    "run the stream_status job; if the stream is down, start_stream (or restart_stream); if it runs "
                    "but cannot keep up, raise stream.max_offsets_per_trigger or give Spark more cores"
                ),
                severity="critical" if verdict.stalled else "warning",
                details={
                    "total_lag": snapshot.total, "worst": ", ".join(f"{p.topic}[{p.partition}]={p.lag}" for p in worst)
                },
                resolved=resolved,
            )  # fmt: skip

        _update(context, incidents, notifier, f"lag:{config.name}", not verdict.ok, make)
        return SensorResult(
            asset_events=_lag_observations(translator, config, snapshot),
            cursor=LagCursor(window, incidents.state).serialize(),
        )

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
        config = control_plane.load()
        cursor = CheckpointCursor.parse(context.cursor)
        status = control_plane.controller(config).status()
        location = control_plane.checkpoint(config)
        now = time.time()
        try:
            checkpoint = inspect_checkpoint(location)
        except UnsupportedCheckpoint as exc:
            checkpoint = None
            context.log.debug(str(exc))
        starting = any(
            _active_runs(context, job, START_GRACE_S)
            for job in (translator.name("start_stream"), restart_stream_job.name)
        )
        try:
            lag = stream_lag(kafka, config)
        except Exception as exc:  # the lag sensor alerts on Kafka itself; the other rules still apply
            context.log.warning(f"no lag reading: {exc}")
            lag = None
        committed = lag.committed_total if lag is not None else None
        observation = StreamObservation(
            now=now, desired=status.desired, running=status.running, pid=status.pid,
            started_at=_started_at(status.started_at), starting=starting, location=location,
            checkpoint=checkpoint, lag_total=lag.total if lag is not None else None, committed=committed,
        )  # fmt: skip
        health = stream_health(observation, cursor.committed, monitor.stall_after_s, monitor.restart_stream)
        problems, settling = health.problems, health.settling
        incidents = Incidents(cursor.incidents)
        backoff = RestartBackoff(cursor.restart)
        will_restart = health.restart and backoff.due(now)

        def make(resolved: bool) -> Alert:
            summary = "the stream runs and commits batches again" if resolved else "; ".join(problems.values())
            if "unreadable" in problems:
                action = (
                    "restore the checkpoint from a backup, or move it aside and start the stream again: it resumes "
                    "from stream.starting_offsets and the versioned sink keeps the result exact (README: recovery)"
                )
            else:
                action = "look at the stream log (stream_status job) and run restart_stream" + (
                    " (automatic restart is on, with backoff)" if monitor.restart_stream else ""
                )
            return Alert(
                incident=f"checkpoint:{config.name}",
                title=f"Streaming query {config.query_name} is unhealthy" if not resolved
                else f"Streaming query {config.query_name} is healthy again",
                where=f"checkpoint {location}, pid {status.pid or '-'}, log {status.log_path}",
                summary=summary, action=action, severity="critical",
                details={
                    "last_committed_batch": checkpoint.last_committed_batch if checkpoint else "?",
                    "lag": lag.total if lag is not None else "unknown",
                },
                resolved=resolved,
            )  # fmt: skip

        # While a start/restart run brings the stream up, the incident and the backoff stay as they are.
        if not settling:
            _update(context, incidents, notifier, f"checkpoint:{config.name}", bool(problems), make)
        run_requests = []
        if will_restart and _active_runs(context, restart_stream_job.name):
            context.log.info("a restart_stream run is already queued or running; not requesting another")
            will_restart = False
        if will_restart:
            delay = backoff.record_attempt(now, monitor.restart_backoff_s, monitor.restart_backoff_max_s)
            context.log.warning(
                f"restarting the stream (attempt {backoff.attempts}); next attempt no sooner than {delay:.0f} s"
            )
            run_requests.append(
                RunRequest(
                    run_key=f"restart-{config.name}-{int(now)}",
                    tags={"cdc/reason": ",".join(problems), AUTOMATIC_TAG: "true"},
                )
            )
        elif problems:
            backoff.failing()
        elif not settling:
            backoff.healthy(now, monitor.restart_backoff_reset_s)
        metadata = {"running": status.running, "desired": status.desired, "problems": MetadataValue.json(problems)}
        if checkpoint is not None:
            metadata.update({k: v for k, v in checkpoint.as_metadata().items() if v is not None})
        return SensorResult(
            run_requests=run_requests,
            asset_events=[AssetObservation(asset_key=translator.stream_key(), metadata=metadata)],
            cursor=CheckpointCursor(incidents.state, backoff.state, committed).serialize(),
        )

    @sensor(
        name=translator.name("connector_status"),
        minimum_interval_seconds=60,
        default_status=DefaultSensorStatus.RUNNING,
        description="Alerts when the Debezium connector or one of its tasks FAILED (with the error), optionally "
        "restarts failed tasks, and reports recovery.",
    )
    @translator.with_resource_keys
    def connector_status(
        context: SensorEvaluationContext,
        control_plane: ControlPlaneResource,
        kafka_connect: KafkaConnectResource,
        notifier: NotifierResource,
        monitor: MonitorResource,
    ) -> SensorResult | SkipReason:
        config = control_plane.load()
        name = connector_name(config)
        state = _cursor(context)
        incidents = Incidents(state.get("incidents"))
        problem = ""
        restarted = False
        try:
            status = kafka_connect.connector_status(name, budget_s=CONNECT_BUDGET_S)
        except ConnectError as exc:
            if str(exc).startswith("404 "):
                # Deleted on purpose (or never provisioned): nothing is failing any more.
                _update(context, incidents, notifier, f"connector:{config.name}", False, _connector_gone(config, name))
                return SensorResult(
                    skip_reason=f"connector {name} is not provisioned (run the provision job)",
                    cursor=json.dumps({"incidents": incidents.state}),
                )
            status, problem = None, f"Kafka Connect refused the status request: {exc}"
        except Exception as exc:  # unreachable Connect is an incident too
            status, problem = (
                None,
                f"Kafka Connect at {redact_url(kafka_connect.url)} is unreachable: {type(exc).__name__}",
            )
        failed: list[dict[str, Any]] = []
        if status is not None:
            failed, summary = connector_failures(status)
            problem = summary
        backoff = RestartBackoff(state.get("restart"))
        now = time.time()
        if failed and monitor.restart_connector_tasks and backoff.due(now):
            try:
                kafka_connect.restart(name, include_tasks=True, only_failed=True, budget_s=CONNECT_BUDGET_S)
                restarted = True
                delay = backoff.record_attempt(now, monitor.restart_backoff_s, monitor.restart_backoff_max_s)
                context.log.warning(
                    f"restarted the failed parts of connector {name} (attempt {backoff.attempts}); "
                    f"if they fail again, the next restart waits {delay:.0f} s"
                )
            except Exception as exc:
                context.log.error(f"could not restart connector {name}: {exc}")
        elif failed and monitor.restart_connector_tasks:
            backoff.failing()
            context.log.info(f"connector {name} still failed; next automatic restart after the backoff")
        elif not problem:
            backoff.healthy(now, monitor.restart_backoff_reset_s)

        def make(resolved: bool) -> Alert:
            return Alert(
                incident=f"connector:{config.name}",
                title=f"Debezium connector {name} " + ("is running again" if resolved else "failed"),
                where=f"Kafka Connect {redact_url(kafka_connect.url)}, connector {name}",
                summary="every task is RUNNING" if resolved else problem,
                action=(
                    "read the trace (GET /connectors/{name}/status); fix the cause (credentials, slot, "
                    "publication, schema) and restart the failed task: POST /connectors/{name}/restart?onlyFailed=true"
                ).replace("{name}", name),
                details={"restarted": restarted} if not resolved else {},
                resolved=resolved,
            )

        _update(context, incidents, notifier, f"connector:{config.name}", bool(problem), make)
        states = {"connector": status["connector"]["state"]} if status else {}
        if status:
            states.update({f"task {t['id']}": t["state"] for t in status.get("tasks", [])})
        return SensorResult(
            asset_events=[
                AssetObservation(
                    asset_key=translator.connector_key(),
                    metadata={**states, "problem": problem or "none", "restarted_failed_tasks": restarted},
                )
            ],
            cursor=json.dumps({"incidents": incidents.state, "restart": backoff.state}),
        )

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
        config = control_plane.load()
        after = context.cursor or "1970-01-01T00:00:00"
        rows = progress_rows(clickhouse, config, after)
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
        newest = rows[-1]["recorded_at"]
        if isinstance(newest, datetime):
            # DateTime64(3, 'UTC') may come back naive: it is UTC, not the daemon host's local time.
            cursor = (newest.replace(tzinfo=UTC) if newest.tzinfo is None else newest.astimezone(UTC)).isoformat()
        else:
            cursor = str(newest)
        return SensorResult(asset_events=events, cursor=cursor)

    @sensor(
        name=translator.name("replication_health"),
        minimum_interval_seconds=60,
        default_status=DefaultSensorStatus.RUNNING,
        description="Alerts when the replication slot retains WAL above the limit (bytes) or has not advanced for "
        "too long, when the connector has been PAUSED too long, and when the configured connector is missing; "
        "and once when each clears.",
    )
    @translator.with_resource_keys
    def replication_health(
        context: SensorEvaluationContext,
        control_plane: ControlPlaneResource,
        postgres: PostgresResource,
        kafka_connect: KafkaConnectResource,
        notifier: NotifierResource,
        monitor: MonitorResource,
    ) -> SensorResult:
        config = control_plane.load()
        name = connector_name(config)
        state = _cursor(context)
        incidents = Incidents(state.get("incidents"))
        now = time.time()
        new_state: dict[str, Any] = {}
        metadata: dict[str, Any] = {}

        # The slot (PostgreSQL): retained bytes, and how long it has not advanced.
        try:
            with postgres.connect(autocommit=True) as conn:
                slot = slot_observation(conn, config)
        except Exception as exc:  # the source is unreachable: say so in the log, keep the incidents as they are
            context.log.error(f"cannot read replication slot {config.slot_name}: {type(exc).__name__}: {exc}")
            slot = None
            new_state["slot"] = state.get("slot")
        if slot is not None:
            by_bytes, by_age, new_state["slot"] = slot_retention(
                slot, state.get("slot"), now, monitor.slot_max_retained_bytes, monitor.slot_max_retention_age_s
            )
            where = f"PostgreSQL slot {config.slot_name}, connector {name}"
            action = (
                "make sure the connector runs (connector_status, resume_connector, provision) so the slot advances; "
                f"if the pipeline is abandoned, drop the slot: SELECT pg_drop_replication_slot('{config.slot_name}')"
            )
            for incident, verdict, title, recovered in (
                (f"slot_retention_bytes:{config.name}", by_bytes,
                 f"Replication slot {config.slot_name} retains too much WAL",
                 f"Replication slot {config.slot_name} retains WAL within the limit again"),
                (f"slot_retention_age:{config.name}", by_age,
                 f"Replication slot {config.slot_name} has stopped advancing",
                 f"Replication slot {config.slot_name} advances again"),
            ):  # fmt: skip
                make = _verdict_alert(incident, title, recovered, where, verdict, action)
                _update(context, incidents, notifier, incident, verdict.active, make)
            metadata.update({"slot_retained_wal_bytes": slot.retained_bytes or 0, "slot_active": slot.active})

        # The connector (Kafka Connect): PAUSED for too long, or missing.
        exists: bool | None
        try:
            status = kafka_connect.connector_status(name, budget_s=CONNECT_BUDGET_S)
            exists, connector_state = True, status["connector"]["state"]
        except ConnectError as exc:
            exists, connector_state = (False, None) if str(exc).startswith("404 ") else (None, None)
        except Exception:  # unreachable: the connector_status sensor alerts on that
            exists, connector_state = None, None
        if exists is None:
            new_state.update({k: state.get(k) for k in ("paused_since", "missing_since")})
        else:
            where = f"Kafka Connect {redact_url(kafka_connect.url)}, connector {name}"
            paused, new_state["paused_since"] = connector_paused(
                connector_state, state.get("paused_since"), now, monitor.connector_max_paused_s
            )
            make = _verdict_alert(
                f"connector_paused:{config.name}", f"Debezium connector {name} has been paused too long",
                f"Debezium connector {name} is no longer paused", where, paused,
                f"resume it (resume_connector job, or PUT /connectors/{name}/resume), or delete it and drop its slot "
                "if the pipeline is retired",
            )  # fmt: skip
            _update(context, incidents, notifier, f"connector_paused:{config.name}", paused.active, make)
            missing, new_state["missing_since"] = connector_missing(
                exists, state.get("missing_since"), now, monitor.connector_missing_grace_s
            )
            make = _verdict_alert(
                f"connector_missing:{config.name}", f"Debezium connector {name} is missing",
                f"Debezium connector {name} exists again", where, missing,
                "run the provision job (it re-creates the connector, which resumes from its stored offsets and slot); "
                "if the pipeline is retired, remove it from pipeline.yaml and drop its slot",
            )  # fmt: skip
            _update(context, incidents, notifier, f"connector_missing:{config.name}", missing.active, make)
            metadata["connector_state"] = connector_state or "missing"
        return SensorResult(
            asset_events=[AssetObservation(asset_key=translator.connector_key(), metadata=metadata)]
            if metadata
            else [],
            cursor=json.dumps({"incidents": incidents.state, **new_state}),
        )

    @sensor(
        name=translator.name("alert_on_check_failure"),
        minimum_interval_seconds=30,
        default_status=DefaultSensorStatus.RUNNING,
        description="Alerts when the newest evaluation of an ERROR-severity replica check failed (once per "
        "failing check), and once when it passes again.",
    )
    @translator.with_resource_keys
    def alert_on_check_failure(
        context: SensorEvaluationContext, control_plane: ControlPlaneResource, notifier: NotifierResource
    ) -> SensorResult:
        from cdc_pipeline.defs.assets import CHECKS  # assets imports much of the control plane

        config = control_plane.load()
        state = _cursor(context)
        incidents = Incidents(state.get("incidents"))
        for table in config.tables:
            for check, replica_key in ((c, k) for c in CHECKS for k in translator.replica_keys(table)):
                key = AssetCheckKey(replica_key, check)
                verdict = failed_error_check(_latest_check_outcome(context.instance, key))
                if verdict is None:
                    continue
                incident = f"check:{key.asset_key.to_user_string()}:{check}"
                make = _verdict_alert(
                    incident, f"Check {check} failed on {key.asset_key.to_user_string()}",
                    f"Check {check} passes again on {key.asset_key.to_user_string()}",
                    f"asset {key.asset_key.to_user_string()}, table {table.name}", verdict,
                    "open the check's metadata in the Dagster UI; for differing rows run reconcile_tables "
                    "(backfill_differences repairs them) or backfill_table; the checks run again on their own",
                )  # fmt: skip
                _update(context, incidents, notifier, incident, verdict.active, make)
        return SensorResult(cursor=json.dumps({"incidents": incidents.state}))

    return [
        consumer_lag, checkpoint_health, connector_status, replication_health, stream_metrics, alert_on_check_failure,
    ]  # fmt: skip

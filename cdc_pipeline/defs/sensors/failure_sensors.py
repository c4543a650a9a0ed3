"""The failure sensors: a failed ERROR-severity replica check (one per pipeline) and a failed run (one per
code location), each alerted once. Their alerts are in control/sensor_alerts.py, their cursors in
control/cursors.py."""

import time

from dagster import (
    AssetCheckKey,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DefaultSensorStatus,
    RunStatusChangeRecordsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from cdc_pipeline.control.alerts import Alert, Incidents
from cdc_pipeline.control.cursors import IncidentsCursor, RunFailureCursor
from cdc_pipeline.control.rules import CheckOutcome
from cdc_pipeline.control.sensor_alerts import check_failure_update, run_failure_alert
from cdc_pipeline.defs.sensors.shell import deliver
from cdc_pipeline.defs.translator import CdcTranslator
from cdc_pipeline.resources import ControlPlaneResource, NotifierResource

RUN_FAILURE_BATCH = 50
MAX_UNDELIVERED = 100
RUN_ALERT_BUDGET_S = 30.0


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


def build_check_failure_sensor(translator: CdcTranslator) -> SensorDefinition:
    """alert_on_check_failure: the newest evaluation of each replica check of the pipeline's tables
    (`failed_error_check`)."""

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

        pipeline = control_plane.load()
        incidents = Incidents(IncidentsCursor.parse(context.cursor).incidents)
        for table in pipeline.tables:
            for check, replica_key in ((c, k) for c in CHECKS for k in translator.replica_keys(table)):
                key = AssetCheckKey(replica_key, check)
                outcome = _latest_check_outcome(context.instance, key)
                update = check_failure_update(key.asset_key.to_user_string(), check, table.name, outcome)
                if update is not None:
                    deliver(context, incidents, notifier, update)
        return SensorResult(cursor=IncidentsCursor(incidents.state).serialize())

    return alert_on_check_failure


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
    return run_failure_alert(run.run_id, run.job_name, run.tags, _step_errors(instance, run.run_id))


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
        cursor = RunFailureCursor.parse(context.cursor)
        instance = context.instance
        if cursor.after is None:  # the first evaluation: failures from now on, not the instance's history
            latest = instance.fetch_run_status_changes(DagsterEventType.RUN_FAILURE, limit=1).records
            first = RunFailureCursor(latest[0].storage_id if latest else 0)
            return SensorResult(skip_reason="watching for failed runs", cursor=first.serialize())
        after, pending = cursor.after, list(cursor.pending)
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
        return SensorResult(cursor=RunFailureCursor(after, undelivered).serialize())

    return alert_on_run_failure

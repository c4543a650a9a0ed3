"""What every sensor shell shares: delivering an incident's alert (a delivery failure is logged and retried
at the next evaluation), whether a job has active runs, and the time budgets of an evaluation."""

import time

from dagster import DagsterRunStatus, RunsFilter, SensorEvaluationContext

from cdc_pipeline.control.alerts import Alert, Incidents
from cdc_pipeline.control.sensor_alerts import IncidentUpdate
from cdc_pipeline.resources import NotifierResource

ACTIVE_RUN_STATUSES = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
]
# Kafka Connect calls from a sensor: the daemon gives an evaluation 60 s in all.
CONNECT_BUDGET_S = 20.0


def deliver(
    context: SensorEvaluationContext, incidents: Incidents, notifier: NotifierResource, update: IncidentUpdate
) -> Alert | None:
    """Open/close `update.incident`, delivering the alert; a delivery failure is logged and retried next time."""
    try:
        alert = incidents.update(update.incident, update.active, update.make, notifier.send)
    except Exception as exc:
        context.log.error(f"could not deliver the alert for {update.incident}: {exc}")
        return None
    if alert:
        context.log.info(f"alert sent: {alert.text().splitlines()[0]}")
    return alert


def active_runs(context: SensorEvaluationContext, job_name: str, newer_than_s: float | None = None) -> bool:
    """Whether `job_name` has a queued or running run (created within `newer_than_s`, if given)."""
    records = context.instance.get_run_records(filters=RunsFilter(job_name=job_name, statuses=ACTIVE_RUN_STATUSES))
    now = time.time()
    return any(newer_than_s is None or now - r.create_timestamp.timestamp() < newer_than_s for r in records)

"""The capture side's sensors: connector status (FAILED connector or tasks, with optional restart of the
failed parts under backoff) and replication health (slot retention, connector paused too long or missing).
Their rules are in control/rules.py, their alerts in control/sensor_alerts.py."""

import time
from dataclasses import replace

from dagster import (
    AssetObservation,
    DefaultSensorStatus,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from cdc_pipeline.connector import connector_name
from cdc_pipeline.control.alerts import Incidents
from cdc_pipeline.control.backoff import RestartBackoff
from cdc_pipeline.control.cursors import ConnectorCursor, ReplicationCursor
from cdc_pipeline.control.rules import (
    ConnectorReading,
    ReplicationLimits,
    SlotObservation,
    connector_health,
    replication_health,
)
from cdc_pipeline.control.sensor_alerts import (
    connector_failed_update,
    connector_gone_update,
    redact_url,
    replication_updates,
)
from cdc_pipeline.control.source import slot_observation
from cdc_pipeline.defs.sensors.shell import CONNECT_BUDGET_S, deliver
from cdc_pipeline.defs.translator import CdcTranslator
from cdc_pipeline.kafka_connect import ConnectError
from cdc_pipeline.resources import (
    ControlPlaneResource,
    KafkaConnectResource,
    MonitorResource,
    NotifierResource,
    PostgresResource,
)


def read_connector(kafka_connect: KafkaConnectResource, name: str) -> ConnectorReading:
    """The connector's status from Kafka Connect: missing on 404; otherwise why it could not be read."""
    try:
        return ConnectorReading(status=kafka_connect.connector_status(name, budget_s=CONNECT_BUDGET_S))
    except ConnectError as exc:
        if exc.not_found:
            return ConnectorReading(missing=True)
        return ConnectorReading(error=f"Kafka Connect refused the status request: {exc}")
    except Exception as exc:  # unreachable Connect is an incident too
        return ConnectorReading(
            error=f"Kafka Connect at {redact_url(kafka_connect.url)} is unreachable: {type(exc).__name__}"
        )


def build_connector_status_sensor(translator: CdcTranslator) -> SensorDefinition:
    """connector_status: FAILED parts of the connector (`connector_health`), restarted under backoff if
    enabled; a deleted connector clears the incident."""

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
        pipeline = control_plane.load()
        name = connector_name(pipeline)
        cursor = ConnectorCursor.parse(context.cursor)
        incidents = Incidents(cursor.incidents)
        reading = read_connector(kafka_connect, name)
        if reading.missing:
            # Deleted on purpose (or never provisioned): nothing is failing any more.
            deliver(context, incidents, notifier, connector_gone_update(pipeline, name))
            return SensorResult(
                skip_reason=f"connector {name} is not provisioned (run the provision job)",
                cursor=ConnectorCursor(incidents.state).serialize(),
            )
        backoff = RestartBackoff(cursor.restart)
        now = time.time()
        health = connector_health(reading, monitor.restart_connector_tasks, backoff.due(now))
        restarted = False
        if health.step == "restart":
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
        elif health.step == "wait":
            backoff.failing()
            context.log.info(f"connector {name} still failed; next automatic restart after the backoff")
        elif health.step == "healthy":
            backoff.healthy(now, monitor.restart_backoff_reset_s)
        update = connector_failed_update(pipeline, name, kafka_connect.url, health.problem, restarted)
        deliver(context, incidents, notifier, update)
        status = reading.status
        states = {"connector": status["connector"]["state"]} if status else {}
        if status:
            states.update({f"task {t['id']}": t["state"] for t in status.get("tasks", [])})
        return SensorResult(
            asset_events=[
                AssetObservation(
                    asset_key=translator.connector_key(),
                    metadata={**states, "problem": health.problem or "none", "restarted_failed_tasks": restarted},
                )
            ],
            cursor=ConnectorCursor(incidents.state, backoff.state).serialize(),
        )

    return connector_status


def build_replication_sensor(translator: CdcTranslator) -> SensorDefinition:
    """replication_health: the slot's retention and the connector's presence (`replication_health`)."""

    @sensor(
        name=translator.name("replication_health"),
        minimum_interval_seconds=60,
        default_status=DefaultSensorStatus.RUNNING,
        description="Alerts when the replication slot retains WAL above the limit (bytes) or has not advanced for "
        "too long, when the connector has been PAUSED too long, and when the configured connector is missing; "
        "and once when each clears.",
    )
    @translator.with_resource_keys
    def replication_health_sensor(
        context: SensorEvaluationContext,
        control_plane: ControlPlaneResource,
        postgres: PostgresResource,
        kafka_connect: KafkaConnectResource,
        notifier: NotifierResource,
        monitor: MonitorResource,
    ) -> SensorResult:
        pipeline = control_plane.load()
        name = connector_name(pipeline)
        cursor = ReplicationCursor.parse(context.cursor)
        incidents = Incidents(cursor.incidents)
        slot: SlotObservation | None
        try:
            with postgres.connect(autocommit=True) as conn:
                slot = slot_observation(conn, pipeline)
        except Exception as exc:  # the source is unreachable: say so in the log, keep the incidents as they are
            context.log.error(f"cannot read replication slot {pipeline.slot_name}: {type(exc).__name__}: {exc}")
            slot = None
        # An unreachable Connect leaves the paused/missing rules as they are: connector_status alerts on it.
        connector = read_connector(kafka_connect, name)
        limits = ReplicationLimits(
            monitor.slot_max_retained_bytes, monitor.slot_max_retention_age_s,
            monitor.connector_max_paused_s, monitor.connector_missing_grace_s,
        )  # fmt: skip
        verdict = replication_health(slot, connector, cursor, time.time(), limits)
        for update in replication_updates(pipeline, name, kafka_connect.url, verdict):
            deliver(context, incidents, notifier, update)
        metadata: dict[str, object] = {}
        if slot is not None:
            metadata.update({"slot_retained_wal_bytes": slot.retained_bytes or 0, "slot_active": slot.active})
        if connector.exists is not None:
            metadata["connector_state"] = connector.state or "missing"
        return SensorResult(
            asset_events=[AssetObservation(asset_key=translator.connector_key(), metadata=metadata)]
            if metadata
            else [],
            cursor=replace(verdict.cursor, incidents=incidents.state).serialize(),
        )

    return replication_health_sensor

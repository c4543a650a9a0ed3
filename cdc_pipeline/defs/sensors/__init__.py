"""Sensors: consumer lag, checkpoint health, connector status, replication (slot retention, paused or
missing connector), run failures, failed ERROR checks and streaming metrics.

One builder per sensor, each a thin shell: it gathers observations, calls its rule in control/
(stream_rules.py, rules.py), delivers the verdict's alerts (control/sensor_alerts.py) and emits its
observations and run requests. Each keeps its state (sliding window, open incidents, restart backoff) in a
typed cursor (control/stream_rules.py, control/cursors.py), so an incident alerts once when it opens and
once when it clears, across daemon restarts.

- stream_sensors.py: consumer_lag, checkpoint_health, stream_metrics;
- connector_sensors.py: connector_status, replication_health;
- failure_sensors.py: alert_on_check_failure, alert_on_run_failure (the code location's);
- shell.py: alert delivery and active-run lookups the builders share.
"""

from dagster import JobDefinition, SensorDefinition

from cdc_pipeline.control.sensor_alerts import redact_url
from cdc_pipeline.defs.sensors.connector_sensors import build_connector_status_sensor, build_replication_sensor
from cdc_pipeline.defs.sensors.failure_sensors import build_check_failure_sensor, build_run_failure_sensor
from cdc_pipeline.defs.sensors.stream_sensors import (
    build_checkpoint_sensor,
    build_lag_sensor,
    build_stream_metrics_sensor,
)
from cdc_pipeline.defs.translator import CdcTranslator

__all__ = [
    "build_check_failure_sensor",
    "build_checkpoint_sensor",
    "build_connector_status_sensor",
    "build_lag_sensor",
    "build_replication_sensor",
    "build_run_failure_sensor",
    "build_sensors",
    "build_stream_metrics_sensor",
    "redact_url",
]


def build_sensors(translator: CdcTranslator, restart_stream_job: JobDefinition) -> list[SensorDefinition]:
    """The sensors of one pipeline (alert_on_run_failure is the location's: `build_run_failure_sensor`); their
    observations and alerts name `translator`'s asset keys, their names and resource keys are its own."""
    return [
        build_lag_sensor(translator),
        build_checkpoint_sensor(translator, restart_stream_job),
        build_connector_status_sensor(translator),
        build_replication_sensor(translator),
        build_stream_metrics_sensor(translator),
        build_check_failure_sensor(translator),
    ]

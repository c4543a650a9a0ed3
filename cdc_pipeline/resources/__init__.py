"""Dagster resources, one per external system, each with a `health()` probe, and `build_resources`: the code
location's resources wired to the CDC_* environment variables."""

from cdc_pipeline.resources.build import build_resources
from cdc_pipeline.resources.clickhouse import ClickHouseResource
from cdc_pipeline.resources.connect import KafkaConnectResource
from cdc_pipeline.resources.control_plane import ControlPlaneResource, MonitorResource
from cdc_pipeline.resources.kafka import KafkaResource
from cdc_pipeline.resources.notifier import NotifierResource
from cdc_pipeline.resources.postgres import PostgresResource
from cdc_pipeline.resources.spark import SparkResource

__all__ = [
    "build_resources",
    "ClickHouseResource",
    "KafkaConnectResource",
    "KafkaResource",
    "MonitorResource",
    "NotifierResource",
    "ControlPlaneResource",
    "PostgresResource",
    "SparkResource",
]

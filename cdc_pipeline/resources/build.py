"""The resources of the code location, wired to the CDC_* environment variables (see .env.example).

A variable that is set is passed as an `EnvVar`, so Dagster resolves it at launch and shows only its
name in the UI; an unset one falls back to the local-stack default from `Settings`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from dagster import EnvVar

from cdc_pipeline.config import default_config_path
from cdc_pipeline.resources.clickhouse import ClickHouseResource
from cdc_pipeline.resources.connect import KafkaConnectResource
from cdc_pipeline.resources.control_plane import ControlPlaneResource, MonitorResource
from cdc_pipeline.resources.kafka import KafkaResource
from cdc_pipeline.resources.notifier import NotifierResource
from cdc_pipeline.resources.postgres import PostgresResource
from cdc_pipeline.resources.spark import SparkResource
from cdc_pipeline.settings import ENV_PREFIX, Settings

# The settings a pipeline may read from variables of its own (`build_resources(env=...)`): the connections.
RENAMABLE = tuple(
    ENV_PREFIX + field.upper()
    for field in (
        "postgres_dsn", "postgres_password", "warehouse_dsn", "warehouse_password", "kafka_bootstrap_servers",
        "connect_url", "spark_master", "clickhouse_url", "clickhouse_user", "clickhouse_password",
        "clickhouse_database", "stack_dir", "control_dir",
    )
)  # fmt: skip


def build_resources(
    settings: Settings | None = None, config_path: str | None = None, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The resources by their plain keys (`postgres`, `kafka`, ...). `env` renames variables: with
    `{"CDC_POSTGRES_DSN": "CRM_POSTGRES_DSN"}` the DSN is read from CRM_POSTGRES_DSN (a second pipeline's
    source database in the same code location)."""
    renamed = dict(env or {})
    unknown = sorted(set(renamed) - set(RENAMABLE))
    if unknown:
        raise ValueError(f"env: {unknown} cannot be read from another variable; these can: {', '.join(RENAMABLE)}")
    defaults = settings or Settings(_env_file=None)  # defaults only; live values come via EnvVar
    # Thresholds and switches are not secret: read once (environment and .env) and shown in the UI.
    tuning = settings or Settings()

    def _value(field: str, default: Any) -> Any:
        name = ENV_PREFIX + field.upper()
        if name in renamed:  # always from the named variable: a run names it if it is unset
            return EnvVar(renamed[name])
        return EnvVar(name) if os.environ.get(name) else default

    return {
        "control_plane": ControlPlaneResource(
            config_path=config_path or str(default_config_path()),
            stack_dir=_value("stack_dir", str(defaults.stack_dir)),
            control_dir=_value("control_dir", None),
        ),
        "notifier": NotifierResource(webhook_url=_value("alert_webhook_url", None)),
        "monitor": MonitorResource(
            lag_threshold=tuning.lag_threshold,
            restart_stream=tuning.auto_restart_stream,
            restart_connector_tasks=tuning.auto_restart_connector,
            slot_max_retained_bytes=tuning.slot_max_retained_bytes,
            slot_max_retention_age_s=tuning.slot_max_retention_age_s,
            connector_max_paused_s=tuning.connector_max_paused_s,
        ),
        "postgres": PostgresResource(
            dsn=_value("postgres_dsn", defaults.postgres_dsn), password=_value("postgres_password", None)
        ),
        # The PostgreSQL warehouse (second sink); empty DSN: none configured (only tables with
        # `sinks: [..., warehouse]` use it, and say so if it is missing).
        "warehouse": PostgresResource(
            dsn=_value("warehouse_dsn", defaults.warehouse_dsn or ""), password=_value("warehouse_password", None)
        ),
        "kafka": KafkaResource(bootstrap_servers=_value("kafka_bootstrap_servers", defaults.kafka_bootstrap_servers)),
        "kafka_connect": KafkaConnectResource(url=_value("connect_url", defaults.connect_url)),
        "spark": SparkResource(
            master=_value("spark_master", defaults.spark_master),
            jvm_cache_dir=_value("jvm_cache_dir", str(defaults.jvm_cache_dir)),
        ),
        "clickhouse": ClickHouseResource(
            url=_value("clickhouse_url", defaults.clickhouse_endpoint),
            user=_value("clickhouse_user", defaults.clickhouse_user),
            password=_value("clickhouse_password", None),
            database=_value("clickhouse_database", defaults.clickhouse_database),
        ),
    }

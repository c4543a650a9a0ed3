"""Dagster entry point (see `[tool.dagster]` in pyproject.toml and workspace.yaml): the pipeline from
`pipeline.yaml` ($CDC_PIPELINE_CONFIG) as assets, checks, jobs, sensors and schedules."""

import warnings
from pathlib import Path
from typing import Any

from dagster import AssetSelection, BetaWarning, Definitions, define_asset_job

from cdc_pipeline.config import PipelineConfig, default_config_path, load_pipeline_config
from cdc_pipeline.defs.aggregates import build_aggregate_definitions
from cdc_pipeline.defs.assets import build_assets, build_checks
from cdc_pipeline.defs.health import check_services
from cdc_pipeline.defs.jobs import (
    backfill_table,
    pause_connector,
    reconcile_tables,
    replay,
    restart_stream,
    resume_connector,
    start_stream,
    stop_stream,
    stream_status,
)
from cdc_pipeline.defs.resources import build_resources
from cdc_pipeline.defs.schedules import build_schedules
from cdc_pipeline.defs.sensors import build_sensors
from cdc_pipeline.defs.translator import CdcTranslator

warnings.filterwarnings("ignore", category=BetaWarning)  # multi_observable_source_asset


def build_definitions(
    pipeline: PipelineConfig,
    config_path: Path | str,
    resources: dict[str, Any] | None = None,
    translator: CdcTranslator | None = None,
) -> Definitions:
    """Everything Dagster needs for one pipeline; `resources` override the environment-based ones."""
    translator = translator or CdcTranslator(pipeline)
    assets = build_assets(pipeline, translator)
    checks = build_checks(pipeline, translator)
    provision = define_asset_job(
        "provision",
        selection=AssetSelection.assets(translator.connector_key()),
        description="Check the source (wal_level, privileges, slot, publication, replica identity, signal table), "
        "then create or update the Debezium connector (idempotent).",
    )
    observe = define_asset_job(
        "observe_source_tables",
        selection=AssetSelection.assets(*(translator.source_key(t) for t in pipeline.tables)),
        description="Observe the source tables: row estimates, write counters, size, WAL position and slot lag.",
    )
    check_replicas = define_asset_job(
        "check_replicas",
        selection=AssetSelection.checks_for_assets(*(translator.sink_key(t) for t in pipeline.tables)),
        description="Run the asset checks of every ClickHouse replica.",
    )
    definitions = Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=[
            check_services,
            provision,
            observe,
            check_replicas,
            start_stream,
            stop_stream,
            restart_stream,
            stream_status,
            pause_connector,
            resume_connector,
            backfill_table,
            replay,
            reconcile_tables,
        ],  # fmt: skip
        sensors=build_sensors(restart_stream),
        schedules=build_schedules(pipeline, reconcile_tables, backfill_table),
        resources={**build_resources(config_path=str(config_path)), **(resources or {})},
    )
    return Definitions.merge(definitions, build_aggregate_definitions(pipeline, translator))  # aggregates (C10)


def _load() -> Definitions:
    path = default_config_path()
    return build_definitions(load_pipeline_config(path), path)


defs = _load()

"""The code location: one pipeline's Dagster objects (`pipeline_definitions`), and a location of one or
several pipelines (`location_definitions`, used by `definitions.py` and `CdcPipelinesComponent`)."""

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    BetaWarning,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    Definitions,
    ScheduleDefinition,
    define_asset_job,
)
from dagster._utils.schedules import is_valid_cron_string

from cdc_pipeline.config import PipelineConfig
from cdc_pipeline.defs.aggregate_assets import aggregate_key, build_aggregate_definitions
from cdc_pipeline.defs.assets import build_assets, build_checks, checks_automation
from cdc_pipeline.defs.health import build_check_services
from cdc_pipeline.defs.jobs import build_jobs
from cdc_pipeline.defs.schedules import build_schedules
from cdc_pipeline.defs.sensors import build_run_failure_sensor, build_sensors
from cdc_pipeline.defs.translator import SHARED_RESOURCES, CdcTranslator
from cdc_pipeline.resources import build_resources
from cdc_pipeline.settings import Settings


def cron(variable: str, value: str) -> str:
    if not is_valid_cron_string(value):
        raise ValueError(
            f"{variable}={value!r} is not a cron expression: use five fields, minute hour day month weekday "
            "(e.g. '*/15 * * * *'), in UTC"
        )
    return value


def pipeline_definitions(
    translator: CdcTranslator, resources: Mapping[str, Any], checks_cron: str, observe_cron: str
) -> Definitions:
    """Everything Dagster needs for `translator`'s pipeline but the location's own objects (the run-failure
    sensor and the shared resources): assets, checks, jobs, sensors and schedules named by `translator.name`,
    and `resources` (by plain key: `postgres`, ...) bound under `translator.resource_key`."""
    pipeline = translator.pipeline
    checks_cron = cron("CDC_CHECKS_CRON", checks_cron)
    observe_cron = cron("CDC_OBSERVE_CRON", observe_cron)
    assets = build_assets(pipeline, translator)
    checks = build_checks(pipeline, translator, checks_cron)
    provision = define_asset_job(
        translator.name("provision"),
        selection=AssetSelection.assets(translator.connector_key()),
        description="Check the source (wal_level, privileges, slot, publication, replica identity, signal table), "
        "then create or update the Debezium connector (idempotent).",
    )
    observe = define_asset_job(
        translator.name("observe_source_tables"),
        selection=AssetSelection.assets(*(translator.source_key(t) for t in pipeline.tables)),
        description="Observe the source tables: row estimates, write counters, size, WAL position and slot lag.",
    )
    check_replicas = define_asset_job(
        translator.name("check_replicas"),
        selection=AssetSelection.checks_for_assets(*(k for t in pipeline.tables for k in translator.replica_keys(t))),
        description="Run the asset checks of every replica (ClickHouse and warehouse).",
    )
    sink_keys = [k for t in pipeline.tables for k in translator.replica_keys(t)]
    automation = AutomationConditionSensorDefinition(
        translator.name("replica_checks_automation"),
        target=AssetSelection.checks_for_assets(*sink_keys)
        | AssetSelection.checks_for_assets(*(aggregate_key(pipeline, a) for a in pipeline.aggregates)),
        default_status=DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
        description=f"Runs the replica and aggregate checks at every tick of {checks_cron} (UTC; CDC_CHECKS_CRON), "
        "one run at a time; a failed ERROR check is alerted by alert_on_check_failure.",
    )
    observe_schedule = ScheduleDefinition(
        name=translator.name("observe_source_tables_schedule"),
        job=observe,
        cron_schedule=observe_cron,
        execution_timezone="UTC",
        default_status=DefaultScheduleStatus.RUNNING,
        description=f"Observes the source tables (counts, size, WAL position, slot lag) at {observe_cron} (UTC; "
        "CDC_OBSERVE_CRON).",
    )
    # One translator for everything: the jobs and sensors record to the keys of the assets above.
    jobs = build_jobs(translator)
    job = {j.name: j for j in jobs}
    definitions = Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=[build_check_services(translator), provision, observe, check_replicas, *jobs],
        sensors=[*build_sensors(translator, job[translator.name("restart_stream")]), automation],
        schedules=[
            *build_schedules(
                translator, job[translator.name("reconcile_tables")], job[translator.name("backfill_table")]
            ),
            observe_schedule,
        ],
        resources={translator.resource_key(k): v for k, v in resources.items() if k not in SHARED_RESOURCES},
    )
    return Definitions.merge(
        definitions, build_aggregate_definitions(pipeline, translator, checks_automation(checks_cron))
    )  # aggregates


def location_definitions(pipelines: Sequence[Definitions], shared_resources: Mapping[str, Any]) -> Definitions:
    """A code location of the pipelines' definitions (from `pipeline_definitions`), with the run-failure sensor
    and the resources the pipelines share (`notifier`). Validated now: two pipelines naming one job, sensor,
    schedule, op, resource or asset key alike fail here, naming it."""
    definitions = Definitions.merge(
        *pipelines,
        Definitions(
            sensors=[build_run_failure_sensor()],
            resources={k: v for k, v in shared_resources.items() if k in SHARED_RESOURCES},
        ),
    )
    # Resolved now (Dagster caches it), inside one narrow filter: Dagster 1.13 copies a sensor that targets a
    # job (checkpoint_health -> restart_stream) passing `owners=[]`, which warns that the beta `owners`
    # parameter is used although no owners are set. Every other warning stays visible.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"Parameter `owners` of initializer `SensorDefinition.__init__`", category=BetaWarning
        )
        definitions.get_repository_def().get_all_jobs()  # jobs too: an op or graph named twice fails here
    return definitions


def single_pipeline_definitions(
    pipeline: PipelineConfig,
    config_path: Path | str,
    resources: Mapping[str, Any] | None = None,
    translator: CdcTranslator | None = None,
    checks_cron: str | None = None,
    observe_cron: str | None = None,
) -> Definitions:
    """A code location of one pipeline under the plain names (`start_stream`, resource `postgres`, ...) unless
    `translator` has a prefix; `resources` override the environment-based ones. The checks run and the source
    tables are observed by themselves at the ticks of `checks_cron` and `observe_cron` (default:
    CDC_CHECKS_CRON, CDC_OBSERVE_CRON)."""
    if translator is None or checks_cron is None or observe_cron is None:
        settings = Settings()
        translator = translator or CdcTranslator.from_settings(pipeline, settings)
        checks_cron = checks_cron or settings.checks_cron
        observe_cron = observe_cron or settings.observe_cron
    bound = {**build_resources(config_path=str(config_path)), **(resources or {})}
    return location_definitions([pipeline_definitions(translator, bound, checks_cron, observe_cron)], bound)

"""Several pipelines in one code location, as a Dagster Component configured by their pipeline files.

    # defs.yaml (a folder of the dg project's defs module, or loaded with ComponentTree / load_defs)
    type: cdc_pipeline.defs.component.CdcPipelinesComponent
    attributes:
      pipelines:
        - path: shop.yaml                  # relative to this defs.yaml
        - path: crm.yaml
          env:                             # this pipeline's source database, from variables of its own
            CDC_POSTGRES_DSN: CRM_POSTGRES_DSN
            CDC_POSTGRES_PASSWORD: CRM_POSTGRES_PASSWORD

With several pipelines, each pipeline's jobs, ops, sensors, schedules and resource keys are named
`<prefix>_<name>` (prefix: the pipeline's name unless set; `shop_start_stream`, `crm_postgres`); with one, the
plain names of `definitions.py`. Asset keys start with the pipeline name either way. The run-failure sensor
and the `notifier` resource (the alert channel) belong to the location and exist once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from pydantic import Field

from cdc_pipeline.config import PipelineConfig, default_config_path, load_pipeline_config
from cdc_pipeline.defs.location import location_definitions, pipeline_definitions
from cdc_pipeline.defs.translator import CdcTranslator
from cdc_pipeline.resources import build_resources
from cdc_pipeline.settings import ENV_PREFIX, Settings


class PipelineFile(dg.Model, dg.Resolvable):
    """One pipeline of the code location."""

    path: str = Field(description="The pipeline file (pipeline.yaml syntax); relative to the defs.yaml's folder.")
    prefix: str | None = Field(
        default=None,
        description="Prefix of the pipeline's job, op, sensor, schedule and resource names. Default: the pipeline "
        "name when the location has several pipelines, none when it has one; '' keeps the plain names (one "
        "pipeline of the location at most).",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="CDC_* connection settings this pipeline reads from other variables, e.g. "
        "{CDC_POSTGRES_DSN: CRM_POSTGRES_DSN} for a second source database.",
    )


@dataclass
class LoadedPipeline:
    """A pipeline file read and named: what `location` builds from."""

    pipeline: PipelineConfig
    path: Path
    prefix: str
    env: Mapping[str, str]

    def settings(self) -> Settings:
        """The settings with this pipeline's renamed variables (for the translator's connector metadata)."""
        overrides = {
            var.removeprefix(ENV_PREFIX).lower(): os.environ[own]
            for var, own in self.env.items()
            if os.environ.get(own)
        }
        return Settings(**overrides)


def load_pipelines(files: list[PipelineFile], base: Path) -> list[LoadedPipeline]:
    """The pipeline files read, each with its prefix; a clear error for names two pipelines would share."""
    if not files:
        files = [PipelineFile(path=str(default_config_path()))]
        base = Path.cwd()
    several = len(files) > 1
    loaded: list[LoadedPipeline] = []
    for file in files:
        path = Path(file.path) if Path(file.path).is_absolute() else base / file.path
        pipeline = load_pipeline_config(path)
        prefix = file.prefix if file.prefix is not None else (pipeline.name if several else "")
        loaded.append(LoadedPipeline(pipeline, path, prefix, dict(file.env)))
    seen: dict[str, Path] = {}
    for entry in loaded:
        for what, fix in _claims(entry):
            if what in seen:
                raise ValueError(f"{entry.path} and {seen[what]} both use {what}: {fix}")
            seen[what] = entry.path
    return loaded


def _claims(entry: LoadedPipeline) -> list[tuple[str, str]]:
    """What a pipeline must not share with another pipeline of the location, and the fix."""
    pipeline, settings = entry.pipeline, entry.settings()
    database = pipeline.clickhouse_database(settings.clickhouse_database)
    clickhouse = f"in ClickHouse {settings.clickhouse_endpoint}"
    kafka = f"in Kafka {settings.kafka_bootstrap_servers}"
    server = f"in PostgreSQL {settings.postgres_params['host']}:{settings.postgres_params['port']}"
    rename = "give the pipelines different names"
    claims = [
        (f"the pipeline name {pipeline.name!r}", f"{rename} (asset keys, connector and topics derive from it)"),
        (f"the prefix {entry.prefix!r}", "set `prefix` on one of them"),
        (f"the topic prefix {pipeline.topic_prefix!r} {kafka}", f"{rename} or set source.topic_prefix"),
        (f"the consumer group {pipeline.consumer_group!r} {kafka}", f"{rename} or set stream.consumer_group"),
        (f"the replication slot {pipeline.slot_name!r} {server}", f"{rename} or set source.slot_name"),
        (
            f"the signal table {pipeline.source.signal_table} {server}/{settings.postgres_params.get('dbname', '')}",
            "give each pipeline its own source.signal_table (a backfill signals its own connector only)",
        ),
        (f"the query name {pipeline.query_name!r} {clickhouse}.{database}", f"{rename} or set stream.query_name"),
    ]
    tables = [pipeline.sink_table(t) for t in pipeline.tables if "clickhouse" in t.sinks]
    tables += [a.sink_table for a in pipeline.aggregates]
    fix = "replicate them to different ClickHouse databases (sink.clickhouse.database) or tables"
    claims += [(f"the table {database}.{t} {clickhouse}", fix) for t in tables]
    return claims


def location(
    pipelines: list[LoadedPipeline], checks_cron: str | None = None, observe_cron: str | None = None
) -> dg.Definitions:
    """The code location of `pipelines`, each with its resources from the environment (and its `env`)."""
    settings = Settings()
    parts = []
    for entry in pipelines:
        bound = build_resources(config_path=str(entry.path), env=entry.env)
        translator = CdcTranslator.from_settings(entry.pipeline, entry.settings(), prefix=entry.prefix)
        parts.append(
            pipeline_definitions(
                translator, bound, checks_cron or settings.checks_cron, observe_cron or settings.observe_cron
            )
        )
    return location_definitions(parts, build_resources())


class CdcPipelinesComponent(dg.Component, dg.Model, dg.Resolvable):
    """CDC pipelines (PostgreSQL -> Debezium -> Kafka -> Spark -> ClickHouse), one per pipeline file, side by
    side in one code location."""

    pipelines: list[PipelineFile] = Field(
        default_factory=list, description="The pipeline files; empty: $CDC_PIPELINE_CONFIG (./pipeline.yaml)."
    )
    checks_cron: str | None = Field(default=None, description="When the checks run (UTC); CDC_CHECKS_CRON.")
    observe_cron: str | None = Field(default=None, description="When sources are observed (UTC); CDC_OBSERVE_CRON.")

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        base = context.path if context.path.is_dir() else context.path.parent
        return location(load_pipelines(self.pipelines, base), self.checks_cron, self.observe_cron)

"""Dagster entry point (see `[tool.dagster]` in pyproject.toml and workspace.yaml): the pipeline from
`pipeline.yaml` ($CDC_PIPELINE_CONFIG) as assets, checks, jobs, sensors and schedules. Several pipelines in one
code location: `cdc_pipeline.defs.component.CdcPipelinesComponent` (README: Several pipelines)."""

from dagster import Definitions

from cdc_pipeline.config import default_config_path, load_pipeline_config
from cdc_pipeline.defs.location import single_pipeline_definitions as build_definitions

__all__ = ["build_definitions", "defs"]


def _load() -> Definitions:
    path = default_config_path()
    return build_definitions(load_pipeline_config(path), path)


defs = _load()

"""Dagster entry point (see `[tool.dg]` in pyproject.toml and workspace.yaml): the pipeline from `pipeline.yaml`
($CDC_PIPELINE_CONFIG) as assets, checks, jobs, sensors and schedules, built as `CdcPipelinesComponent` builds a
location of one pipeline (plain names). Several pipelines in one code location: that component, configured
with their files in a `defs.yaml` (README: Several pipelines in one code location)."""

from pathlib import Path

from cdc_pipeline.defs.component import load_pipelines, location
from cdc_pipeline.defs.location import single_pipeline_definitions as build_definitions

__all__ = ["build_definitions", "defs"]

defs = location(load_pipelines([], Path.cwd()))

"""Dagster entry point (see `[tool.dagster]` in pyproject.toml and workspace.yaml)."""

from __future__ import annotations

from dagster import Definitions

from cdc_pipeline.defs.health import check_services
from cdc_pipeline.defs.resources import build_resources

defs = Definitions(jobs=[check_services], resources=build_resources())

"""Dagster objects: assets, checks, jobs, sensors, schedules and alerts."""

"""The control plane's logic, without Dagster: stream process tracking, consumer lag, checkpoint
health, source checks, backfill, replay, reconcile and alerts. `cdc_pipeline.defs` wraps these in
Dagster assets, ops, sensors and checks."""

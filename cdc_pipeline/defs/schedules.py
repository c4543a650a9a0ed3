"""Schedules: the nightly reconcile, and an example weekly backfill (off by default)."""

from dagster import (
    DefaultScheduleStatus,
    JobDefinition,
    RunRequest,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    schedule,
)

from cdc_pipeline.defs.translator import CdcTranslator


def build_schedules(
    translator: CdcTranslator, reconcile_job: JobDefinition, backfill_job: JobDefinition
) -> list[ScheduleDefinition]:
    pipeline = translator.pipeline
    nightly_reconcile = ScheduleDefinition(
        name=translator.name("nightly_reconcile"),
        job=reconcile_job,
        cron_schedule="0 3 * * *",
        execution_timezone="UTC",
        default_status=DefaultScheduleStatus.RUNNING,
        description="Every night at 03:00 UTC: diff every replica with its source by key. A difference fails "
        "the run (and the run-failure sensor alerts); set backfill_differences to repair automatically.",
        run_config={
            "ops": {translator.name("reconcile_op"): {"config": {"tables": [], "backfill_differences": False}}}
        },
    )
    example_table = pipeline.tables[0].name

    @schedule(
        name=translator.name("weekly_backfill_example"),
        job=backfill_job,
        cron_schedule="0 4 * * 0",
        execution_timezone="UTC",
        default_status=DefaultScheduleStatus.STOPPED,
        description=f"Example: every Sunday 04:00 UTC, re-snapshot {example_table} through Debezium. Copy and "
        "adapt (table, condition) before turning it on.",
    )
    def weekly_backfill_example(context: ScheduleEvaluationContext) -> RunRequest:
        return RunRequest(
            run_key=f"backfill-{example_table}-{context.scheduled_execution_time:%Y-%m-%d}",
            run_config={"ops": {translator.name("backfill_table_op"): {"config": {"table": example_table}}}},
        )

    return [nightly_reconcile, weekly_backfill_example]

"""Jobs an operator launches from the Dagster UI (or a schedule), one module per family: stream control
(stream_jobs.py), connector pause/resume (connector_jobs.py), backfill (backfill_job.py), replay
(replay_job.py) and reconcile (reconcile_job.py). Their rules live in control/; these modules gather the
resources, call them, log and record observations. Provisioning and checks are asset jobs (definitions.py)."""

from dagster import JobDefinition

from cdc_pipeline.defs.jobs.backfill_job import BackfillConfig, build_backfill_job, run_backfill
from cdc_pipeline.defs.jobs.connector_jobs import build_connector_jobs
from cdc_pipeline.defs.jobs.reconcile_job import ReconcileConfig, build_reconcile_job
from cdc_pipeline.defs.jobs.replay_job import ReplayConfig, build_replay_job
from cdc_pipeline.defs.jobs.stream_jobs import build_stream_jobs
from cdc_pipeline.defs.translator import CdcTranslator

__all__ = [
    "BackfillConfig",
    "ReconcileConfig",
    "ReplayConfig",
    "build_backfill_job",
    "build_connector_jobs",
    "build_jobs",
    "build_reconcile_job",
    "build_replay_job",
    "build_stream_jobs",
    "run_backfill",
]


def build_jobs(translator: CdcTranslator) -> list[JobDefinition]:
    """The operator's jobs of one pipeline; every observation they record goes to `translator`'s keys."""
    return [
        *build_stream_jobs(translator), *build_connector_jobs(translator), build_backfill_job(translator),
        build_replay_job(translator), build_reconcile_job(translator),
    ]  # fmt: skip

"""The alerts the sensors send, built from their rules' verdicts: the words of each (title, where,
summary, what to do) and which incident it opens or clears. No Dagster, no I/O: a sensor gathers its
observations, calls its rule, then hands each `IncidentUpdate` here to `Incidents.update` with the
notifier. URLs in alerts go through `redact_url` (credentials never reach a webhook or a log).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cdc_pipeline.config import PipelineConfig
from cdc_pipeline.control.alerts import Alert
from cdc_pipeline.control.lag import LagSnapshot, LagVerdict
from cdc_pipeline.control.rules import CheckOutcome, ReplicationVerdict, Verdict, failed_error_check
from cdc_pipeline.kafka_connect import redact_url

AlertMaker = Callable[[bool], Alert]  # resolved -> the opening (False) or recovery (True) alert


@dataclass(frozen=True)
class IncidentUpdate:
    """`incident` is (still) active or not; `make` writes its opening or recovery alert."""

    incident: str
    active: bool
    make: AlertMaker


def verdict_alert(incident: str, title: str, recovered: str, where: str, verdict: Verdict, action: str) -> AlertMaker:
    """`make(resolved)` for Incidents.update from a rule's verdict."""

    def make(resolved: bool) -> Alert:
        return Alert(
            incident=incident,
            title=recovered if resolved else title,
            where=where,
            summary=verdict.summary,
            action=action,
            details={} if resolved else verdict.details,
            resolved=resolved,
        )

    return make


def kafka_update(pipeline: PipelineConfig, bootstrap_servers: str, error: str | None) -> IncidentUpdate:
    """Kafka is unreachable (`error`: why) or reachable again (`error` None)."""

    def make(resolved: bool) -> Alert:
        return Alert(
            incident=f"kafka:{pipeline.name}",
            title=f"Kafka {'is reachable again' if resolved else 'is unreachable'} for pipeline {pipeline.name}",
            where=f"bootstrap servers {bootstrap_servers}",
            summary="lag can be measured again" if resolved else f"cannot read offsets: {error or ''}",
            action="check the brokers and the network from the Dagster daemon's host; lag is not monitored meanwhile",
            resolved=resolved,
        )

    return IncidentUpdate(f"kafka:{pipeline.name}", error is not None, make)


def lag_update(pipeline: PipelineConfig, snapshot: LagSnapshot, verdict: LagVerdict, threshold: int) -> IncidentUpdate:
    """The consumer-lag incident from `lag_rule`'s verdict on `snapshot`."""
    worst = sorted(snapshot.partitions, key=lambda p: -p.lag)[:3]

    def make(resolved: bool) -> Alert:
        return Alert(
            incident=f"lag:{pipeline.name}",
            title=f"Consumer lag of pipeline {pipeline.name}",
            where=f"consumer group {pipeline.consumer_group}, query {pipeline.query_name}",
            summary=(
                f"lag is back to {snapshot.total} messages" if resolved
                else f"{snapshot.total} messages not applied to ClickHouse: " + "; ".join(verdict.reasons(threshold))
            ),
            action=(
                "run the stream_status job; if the stream is down, start_stream (or restart_stream); if it runs "
                "but cannot keep up, raise stream.max_offsets_per_trigger or give Spark more cores"
            ),
            severity="critical" if verdict.stalled else "warning",
            details={
                "total_lag": snapshot.total, "worst": ", ".join(f"{p.topic}[{p.partition}]={p.lag}" for p in worst)
            },
            resolved=resolved,
        )  # fmt: skip

    return IncidentUpdate(f"lag:{pipeline.name}", not verdict.ok, make)


@dataclass(frozen=True)
class StreamPlace:
    """Where the stream is, for the checkpoint alert: its checkpoint, process and log."""

    location: str
    pid: int | None
    log_path: str
    last_committed_batch: int | str | None
    lag: int | str


def checkpoint_update(
    pipeline: PipelineConfig, problems: Mapping[str, str], place: StreamPlace, restart_enabled: bool
) -> IncidentUpdate:
    """The checkpoint-health incident from `stream_health`'s problems."""

    def make(resolved: bool) -> Alert:
        summary = "the stream runs and commits batches again" if resolved else "; ".join(problems.values())
        if "unreadable" in problems:
            action = (
                "restore the checkpoint from a backup, or move it aside and start the stream again: it resumes "
                "from stream.starting_offsets and the versioned sink keeps the result exact (README: recovery)"
            )
        else:
            action = "look at the stream log (stream_status job) and run restart_stream" + (
                " (automatic restart is on, with backoff)" if restart_enabled else ""
            )
        return Alert(
            incident=f"checkpoint:{pipeline.name}",
            title=f"Streaming query {pipeline.query_name} is unhealthy" if not resolved
            else f"Streaming query {pipeline.query_name} is healthy again",
            where=f"checkpoint {place.location}, pid {place.pid or '-'}, log {place.log_path}",
            summary=summary, action=action, severity="critical",
            details={"last_committed_batch": place.last_committed_batch, "lag": place.lag},
            resolved=resolved,
        )  # fmt: skip

    return IncidentUpdate(f"checkpoint:{pipeline.name}", bool(problems), make)


def connector_gone_update(pipeline: PipelineConfig, name: str) -> IncidentUpdate:
    """The connector_status incident clears when the connector was deleted (or never provisioned)."""

    def make(resolved: bool) -> Alert:
        return Alert(
            incident=f"connector:{pipeline.name}",
            title=f"Debezium connector {name} no longer exists",
            where=f"connector {name}",
            summary="it was deleted; nothing is captured until the provision job creates it again",
            action="run the provision job",
            resolved=resolved,
        )

    return IncidentUpdate(f"connector:{pipeline.name}", False, make)


def connector_failed_update(
    pipeline: PipelineConfig, name: str, connect_url: str, problem: str, restarted: bool
) -> IncidentUpdate:
    """The connector_status incident: `problem` (a FAILED part, or Connect unreachable), "" when none."""

    def make(resolved: bool) -> Alert:
        return Alert(
            incident=f"connector:{pipeline.name}",
            title=f"Debezium connector {name} " + ("is running again" if resolved else "failed"),
            where=f"Kafka Connect {redact_url(connect_url)}, connector {name}",
            summary="every task is RUNNING" if resolved else problem,
            action=(
                "read the trace (GET /connectors/{name}/status); fix the cause (credentials, slot, "
                "publication, schema) and restart the failed task: POST /connectors/{name}/restart?onlyFailed=true"
            ).replace("{name}", name),
            details={"restarted": restarted} if not resolved else {},
            resolved=resolved,
        )

    return IncidentUpdate(f"connector:{pipeline.name}", bool(problem), make)


def replication_updates(
    pipeline: PipelineConfig, name: str, connect_url: str, verdict: ReplicationVerdict
) -> list[IncidentUpdate]:
    """The replication_health incidents with a verdict (slot by bytes and by age, connector paused and
    missing), in that order."""
    slot = pipeline.slot_name
    updates: list[IncidentUpdate] = []
    if verdict.slot_bytes is not None and verdict.slot_age is not None:
        where = f"PostgreSQL slot {slot}, connector {name}"
        action = (
            "make sure the connector runs (connector_status, resume_connector, provision) so the slot advances; "
            f"if the pipeline is abandoned, drop the slot: SELECT pg_drop_replication_slot('{slot}')"
        )
        for incident, rule, title, recovered in (
            (f"slot_retention_bytes:{pipeline.name}", verdict.slot_bytes,
             f"Replication slot {slot} retains too much WAL",
             f"Replication slot {slot} retains WAL within the limit again"),
            (f"slot_retention_age:{pipeline.name}", verdict.slot_age,
             f"Replication slot {slot} has stopped advancing",
             f"Replication slot {slot} advances again"),
        ):  # fmt: skip
            updates.append(
                IncidentUpdate(incident, rule.active, verdict_alert(incident, title, recovered, where, rule, action))
            )
    where = f"Kafka Connect {redact_url(connect_url)}, connector {name}"
    if verdict.paused is not None:
        incident = f"connector_paused:{pipeline.name}"
        make = verdict_alert(
            incident, f"Debezium connector {name} has been paused too long",
            f"Debezium connector {name} is no longer paused", where, verdict.paused,
            f"resume it (resume_connector job, or PUT /connectors/{name}/resume), or delete it and drop its slot "
            "if the pipeline is retired",
        )  # fmt: skip
        updates.append(IncidentUpdate(incident, verdict.paused.active, make))
    if verdict.missing is not None:
        incident = f"connector_missing:{pipeline.name}"
        make = verdict_alert(
            incident, f"Debezium connector {name} is missing",
            f"Debezium connector {name} exists again", where, verdict.missing,
            "run the provision job (it re-creates the connector, which resumes from its stored offsets and slot); "
            "if the pipeline is retired, remove it from pipeline.yaml and drop its slot",
        )  # fmt: skip
        updates.append(IncidentUpdate(incident, verdict.missing.active, make))
    return updates


def check_failure_update(asset: str, check: str, table: str, outcome: CheckOutcome | None) -> IncidentUpdate | None:
    """The incident of check `check` on asset `asset` (its user string) of table `table`, from the newest
    evaluation (`failed_error_check`); None leaves the incident as it is."""
    verdict = failed_error_check(outcome)
    if verdict is None:
        return None
    incident = f"check:{asset}:{check}"
    make = verdict_alert(
        incident, f"Check {check} failed on {asset}", f"Check {check} passes again on {asset}",
        f"asset {asset}, table {table}", verdict,
        "open the check's metadata in the Dagster UI; for differing rows run reconcile_tables "
        "(backfill_differences repairs them) or backfill_table; the checks run again on their own",
    )  # fmt: skip
    return IncidentUpdate(incident, verdict.active, make)


def run_failure_alert(run_id: str, job_name: str, tags: Mapping[str, str], errors: Sequence[str]) -> Alert:
    """The alert for a failed run; `errors`: `step: first line of its error` for its failed steps."""
    launched_by = tags.get("dagster/schedule_name") or tags.get("dagster/sensor_name") or "a user"
    details: dict[str, Any] = {"launched_by": launched_by}
    return Alert(
        incident=f"run:{run_id}",
        title=f"Run of {job_name} failed",
        where=f"job {job_name}, run {run_id}",
        summary="; ".join(errors) or "the run failed before any step ran (see the run's event log)",
        action="open the run in the Dagster UI for the failed step's error and logs, fix, then re-execute",
        severity="warning",
        details=details,
    )

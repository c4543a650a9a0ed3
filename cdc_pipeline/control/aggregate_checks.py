"""What Dagster asks of the pipeline's aggregates, without Dagster: the `matches_replica` check (the closed
windows of an aggregate table against a recomputation from its replica, with the late changes the stream
recorded), the rebuild (every window recomputed from the replica), and the metrics the stream recorded
in its aggregate progress and late tables. defs/aggregate_assets.py turns the results into check results,
materializations and observations."""

from __future__ import annotations

import time
from collections.abc import Callable, Container
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client

from cdc_pipeline.clickhouse_client import command_int
from cdc_pipeline.config import AggregateConfig, PipelineConfig
from cdc_pipeline.contract import LIVE_ROWS
from cdc_pipeline.control.checks import CheckOutcome, Json
from cdc_pipeline.streaming.aggregates import (
    LATE_TABLE,
    PROGRESS_TABLE,
    AggregateError,
    compare,
    recompute,
    watermark_of,
)

CHECK = "matches_replica"
CHECK_ATTEMPTS = 3  # a batch may be between its replica write and its recompute: compare again before failing
CHECK_PAUSE_S = 5.0


def late_stats(client: Client, database: str, aggregate: AggregateConfig) -> dict[str, Any]:
    """How many changes reached the aggregate after their window closed, and the worst lateness (s)."""
    if not command_int(client, f"EXISTS TABLE {quote_identifier(database)}.{LATE_TABLE}"):
        return {"late_changes": 0, "max_lateness_s": 0.0}
    count, worst = client.query(
        f"SELECT count(), max(lateness_s) FROM {quote_identifier(database)}.{LATE_TABLE} FINAL "
        "WHERE aggregate = {a:String}",
        parameters={"a": aggregate.name},
    ).result_rows[0]
    return {"late_changes": int(count), "max_lateness_s": float(worst or 0.0)}


def check_aggregate(
    client: Client,
    pipeline: PipelineConfig,
    database: str,
    aggregate: AggregateConfig,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> CheckOutcome:
    """The closed windows of the aggregate table against a recomputation from the replica (compared up to
    `CHECK_ATTEMPTS` times, a batch may be between its replica write and its recompute)."""
    try:
        for attempt in range(CHECK_ATTEMPTS):
            result = compare(client, pipeline, database, aggregate)
            if result.ok:
                break
            if attempt + 1 < CHECK_ATTEMPTS:
                sleep(CHECK_PAUSE_S)
    except AggregateError as exc:
        return CheckOutcome(CHECK, passed=False, severity="ERROR", description=str(exc))
    if not result.replica_exists:
        description = f"the replica of {aggregate.table} does not exist yet: nothing to compare"
    elif result.watermark is None:
        description = "no change has reached the aggregate yet: no window is closed"
    elif result.ok:
        description = f"closed windows: {result.summary()}"
    else:
        description = (
            f"closed windows: {result.summary()}. Materialize the aggregate (rebuild_aggregates job) to recompute "
            "them from the replica"
        )
    return CheckOutcome(
        CHECK, passed=result.ok, severity="ERROR", description=description,
        metadata={
            "compared_rows": result.compared_rows, "missing": len(result.missing), "extra": len(result.extra),
            "different": len(result.different), "watermark": str(result.watermark or ""),
            "examples": Json([*result.missing[:5], *result.extra[:5], *result.different[:5]]),
            **(late_stats(client, database, aggregate) if result.replica_exists else {}),
        },
    )  # fmt: skip


@dataclass(frozen=True)
class Rebuilt:
    """An aggregate after its rebuild: its live (window, group) rows, whether its replica exists, its watermark."""

    rows: int
    replica_exists: bool
    watermark: datetime | None

    def line(self, aggregate: AggregateConfig) -> str:
        return f"{aggregate.name}: {self.rows} (window, group) rows recomputed from the replica"


def rebuild_aggregate(client: Client, pipeline: PipelineConfig, database: str, aggregate: AggregateConfig) -> Rebuilt:
    """Recompute every window of `aggregate` from its replica (`AggregateError` if its definition cannot be)."""
    done = recompute(client, pipeline, database, aggregate)
    table = f"{quote_identifier(database)}.{quote_identifier(aggregate.sink_table)}"
    rows = command_int(client, f"SELECT count() FROM {table} FINAL WHERE {LIVE_ROWS}") if done else 0
    return Rebuilt(rows, bool(done), watermark_of(client, database, aggregate))


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def read_aggregate_metrics(
    client: Client, database: str, after: datetime, names: Container[str]
) -> tuple[list[tuple[str, dict[str, Any]]], datetime | None]:
    """Per aggregate of `names`, what the stream recorded after `after`: changes and their rate, windows
    recomputed, late changes and their worst lateness, the watermark. Returns (aggregate name, metadata) pairs
    and the newest record's time."""
    if not command_int(client, f"EXISTS TABLE {quote_identifier(database)}.{PROGRESS_TABLE}"):
        return [], None
    rows = client.query(
        "SELECT aggregate, count(), sum(changes), sum(windows), sum(late_changes), min(recorded_at), "
        f"max(recorded_at), max(max_event_time), max(watermark) FROM {quote_identifier(database)}.{PROGRESS_TABLE} "
        "WHERE recorded_at > {after:DateTime64(3, 'UTC')} GROUP BY aggregate",
        parameters={"after": after},
        query_tz="UTC",
    ).result_rows
    metrics: list[tuple[str, dict[str, Any]]] = []
    newest: datetime | None = None
    for name, batches, changes, windows, late, first, last, max_event, watermark in rows:
        if name not in names:
            continue
        first, last = _utc(first), _utc(last)
        newest = last if newest is None or last > newest else newest
        span = max((last - (after if after.year > 1970 else first)).total_seconds(), 1.0)
        lateness = client.query(
            f"SELECT max(lateness_s) FROM {quote_identifier(database)}.{LATE_TABLE} "
            "WHERE aggregate = {a:String} AND recorded_at > {after:DateTime64(3, 'UTC')}",
            parameters={"a": name, "after": after},
        ).result_rows[0][0]
        metrics.append(
            (
                name,
                {
                    "batches": int(batches), "changes": int(changes), "changes_per_second": round(changes / span, 3),
                    "windows_recomputed": int(windows), "late_changes": int(late),
                    "max_lateness_s": float(lateness or 0.0),
                    "max_event_time": str(max_event or ""), "watermark": str(watermark or ""),
                    "watermark_age_s": round((last - _utc(watermark)).total_seconds(), 1) if watermark else 0.0,
                },
            )
        )  # fmt: skip
    return metrics, newest

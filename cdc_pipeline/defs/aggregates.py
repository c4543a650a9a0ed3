"""The pipeline's aggregates (`aggregates:` in pipeline.yaml) in Dagster: one asset per aggregate,
downstream of its table's ClickHouse replica; an asset check that recomputes the closed windows from the
replica with SQL and compares; a sensor that records each aggregate's change rate, watermark and late
changes as observations; and the `rebuild_aggregates` / `check_aggregates` jobs.

The stream keeps the aggregate tables current (streaming/aggregates.py). Materializing an aggregate
asset recomputes every window from the replica: the repair after the replica was changed behind the
stream's back (e.g. `reconcile_tables` marking extra rows deleted), or after an aggregate's definition
changed."""

import json
import time
from datetime import UTC, datetime
from typing import Any

from clickhouse_connect.driver.binding import quote_identifier
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetObservation,
    AssetSelection,
    AssetSpec,
    AutomationCondition,
    DefaultSensorStatus,
    Definitions,
    Failure,
    MaterializeResult,
    MetadataValue,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    multi_asset,
    multi_asset_check,
    sensor,
)

from cdc_pipeline.config import AggregateConfig, PipelineConfig
from cdc_pipeline.contract import LIVE_ROWS
from cdc_pipeline.defs.common import database_of
from cdc_pipeline.defs.translator import CdcTranslator
from cdc_pipeline.resources import ClickHouseResource, ControlPlaneResource
from cdc_pipeline.streaming.aggregates import (
    LATE_TABLE,
    PROGRESS_TABLE,
    AggregateError,
    compare,
    recompute,
    results_sql,
    watermark_of,
)

CHECK = "matches_replica"
CHECK_ATTEMPTS = 3  # a batch may be between its replica write and its recompute: compare again before failing
CHECK_PAUSE_S = 5.0


def aggregate_key(pipeline: PipelineConfig, aggregate: AggregateConfig) -> AssetKey:
    return AssetKey([pipeline.name, "aggregates", aggregate.name])


def aggregate_spec(pipeline: PipelineConfig, translator: CdcTranslator, aggregate: AggregateConfig) -> AssetSpec:
    table = pipeline.table(aggregate.table)
    database = pipeline.clickhouse_database(translator.database)
    window = aggregate.window
    kind = f"tumbling {window.size}" if window.slide is None else f"sliding {window.size} every {window.slide}"
    replica = f"{quote_identifier(database)}.{quote_identifier(pipeline.sink_table(table))}"
    return AssetSpec(
        aggregate_key(pipeline, aggregate),
        description=(
            f"Aggregate {aggregate.name}: {kind} windows of {table.name} by {aggregate.event_time}"
            + (f", grouped by {', '.join(aggregate.group_by)}" if aggregate.group_by else "")
            + ". Over the current state of the rows: the stream recomputes every window a change touches. Query "
            "it with FINAL. Materialize to recompute every window from the replica."
        ),
        group_name=f"{pipeline.name}_aggregates",
        kinds={"clickhouse"},
        deps=[translator.sink_key(table)],
        metadata={
            "database": database, "table": aggregate.sink_table, "source_table": table.name,
            "window": kind, "watermark_delay": aggregate.watermark_delay,
            "group_by": MetadataValue.json(aggregate.group_by),
            "measures": MetadataValue.json([m.model_dump(exclude_none=True) for m in aggregate.measures]),
            "filter": aggregate.filter or "",
            "sql": MetadataValue.md(f"```sql\n{results_sql(aggregate, replica)}\n```"),
        },
    )  # fmt: skip


def _late_stats(client: Any, database: str, aggregate: AggregateConfig) -> dict[str, Any]:
    if not int(client.command(f"EXISTS TABLE {quote_identifier(database)}.{LATE_TABLE}")):
        return {"late_changes": 0, "max_lateness_s": 0.0}
    count, worst = client.query(
        f"SELECT count(), max(lateness_s) FROM {quote_identifier(database)}.{LATE_TABLE} FINAL "
        "WHERE aggregate = {a:String}",
        parameters={"a": aggregate.name},
    ).result_rows[0]
    return {"late_changes": int(count), "max_lateness_s": float(worst or 0.0)}


def check_aggregate(
    client: Any, pipeline: PipelineConfig, database: str, aggregate: AggregateConfig, key: AssetKey
) -> AssetCheckResult:
    """The closed windows of the aggregate table against a recomputation from the replica."""
    try:
        for attempt in range(CHECK_ATTEMPTS):
            result = compare(client, pipeline, database, aggregate)
            if result.ok:
                break
            if attempt + 1 < CHECK_ATTEMPTS:
                time.sleep(CHECK_PAUSE_S)
    except AggregateError as exc:
        return AssetCheckResult(
            asset_key=key, check_name=CHECK, passed=False, severity=AssetCheckSeverity.ERROR, description=str(exc)
        )
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
    return AssetCheckResult(
        asset_key=key, check_name=CHECK, passed=result.ok, severity=AssetCheckSeverity.ERROR,
        description=description,
        metadata={
            "compared_rows": result.compared_rows, "missing": len(result.missing), "extra": len(result.extra),
            "different": len(result.different), "watermark": str(result.watermark or ""),
            "examples": MetadataValue.json([*result.missing[:5], *result.extra[:5], *result.different[:5]]),
            **(_late_stats(client, database, aggregate) if result.replica_exists else {}),
        },
    )  # fmt: skip


def _utc(value: Any) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def metric_observations(
    client: Any, pipeline: PipelineConfig, database: str, after: datetime, keys: dict[str, AssetKey]
) -> tuple[list[AssetObservation], datetime | None]:
    """Per aggregate, what the stream recorded after `after`: changes and their rate, windows recomputed, late
    changes and their worst lateness, the watermark. Returns the observations and the newest record's time."""
    if not int(client.command(f"EXISTS TABLE {quote_identifier(database)}.{PROGRESS_TABLE}")):
        return [], None
    rows = client.query(
        "SELECT aggregate, count(), sum(changes), sum(windows), sum(late_changes), min(recorded_at), "
        f"max(recorded_at), max(max_event_time), max(watermark) FROM {quote_identifier(database)}.{PROGRESS_TABLE} "
        "WHERE recorded_at > {after:DateTime64(3, 'UTC')} GROUP BY aggregate",
        parameters={"after": after},
        query_tz="UTC",
    ).result_rows
    events: list[AssetObservation] = []
    newest: datetime | None = None
    for name, batches, changes, windows, late, first, last, max_event, watermark in rows:
        if name not in keys:
            continue
        first, last = _utc(first), _utc(last)
        newest = last if newest is None or last > newest else newest
        span = max((last - (after if after.year > 1970 else first)).total_seconds(), 1.0)
        lateness = client.query(
            f"SELECT max(lateness_s) FROM {quote_identifier(database)}.{LATE_TABLE} "
            "WHERE aggregate = {a:String} AND recorded_at > {after:DateTime64(3, 'UTC')}",
            parameters={"a": name, "after": after},
        ).result_rows[0][0]
        events.append(
            AssetObservation(
                asset_key=keys[name],
                metadata={
                    "batches": int(batches), "changes": int(changes), "changes_per_second": round(changes / span, 3),
                    "windows_recomputed": int(windows), "late_changes": int(late),
                    "max_lateness_s": float(lateness or 0.0),
                    "max_event_time": str(max_event or ""), "watermark": str(watermark or ""),
                    "watermark_age_s": round((last - _utc(watermark)).total_seconds(), 1) if watermark else 0.0,
                },
            )
        )  # fmt: skip
    return events, newest


def build_aggregate_definitions(
    pipeline: PipelineConfig, translator: CdcTranslator, condition: AutomationCondition | None = None
) -> Definitions:
    """Assets, checks, jobs and the metrics sensor of the pipeline's aggregates (empty without any); with
    `condition`, the checks run by themselves like the replica checks."""
    if not pipeline.aggregates:
        return Definitions()
    prefix = pipeline.name
    specs = {a.name: aggregate_spec(pipeline, translator, a) for a in pipeline.aggregates}
    keys = {name: spec.key for name, spec in specs.items()}

    @multi_asset(specs=list(specs.values()), name=f"{prefix}_recompute_aggregates", can_subset=True)
    @translator.with_resource_keys
    def rebuild(context: AssetExecutionContext, control_plane: ControlPlaneResource, clickhouse: ClickHouseResource):  # noqa: ANN202
        """Recompute every window of the selected aggregates from their replicas."""
        config = control_plane.load()
        database = database_of(config, clickhouse)
        client = clickhouse.client()
        try:
            for aggregate in config.aggregates:
                if aggregate.name not in keys or keys[aggregate.name] not in context.selected_asset_keys:
                    continue
                try:
                    done = recompute(client, config, database, aggregate)
                except AggregateError as exc:
                    raise Failure(str(exc)) from None
                table = f"{quote_identifier(database)}.{quote_identifier(aggregate.sink_table)}"
                rows = int(client.command(f"SELECT count() FROM {table} FINAL WHERE {LIVE_ROWS}")) if done else 0
                watermark = watermark_of(client, database, aggregate)
                context.log.info(f"{aggregate.name}: {rows} (window, group) rows recomputed from the replica")
                yield MaterializeResult(
                    asset_key=keys[aggregate.name],
                    metadata={"rows": rows, "replica_exists": bool(done), "watermark": str(watermark or "")},
                )
        finally:
            client.close()

    checks = []
    for aggregate in pipeline.aggregates:

        def make(aggregate: AggregateConfig = aggregate) -> Any:
            key = keys[aggregate.name]

            @multi_asset_check(
                specs=[
                    AssetCheckSpec(
                        CHECK,
                        asset=key,
                        description="closed windows equal a recomputation from the replica",
                        automation_condition=condition,
                    )
                ],
                name=f"{prefix}_{aggregate.name}_aggregate_checks",
            )
            @translator.with_resource_keys
            def check(
                context: AssetCheckExecutionContext, control_plane: ControlPlaneResource, clickhouse: ClickHouseResource
            ):  # noqa: ANN202
                config = control_plane.load()
                current = next((a for a in config.aggregates if a.name == aggregate.name), aggregate)
                client = clickhouse.client()
                try:
                    result = check_aggregate(client, config, database_of(config, clickhouse), current, key)
                finally:
                    client.close()
                context.log.info(f"{CHECK}: {'passed' if result.passed else 'FAILED'}: {result.description}")
                yield result

            return check

        checks.append(make())

    @sensor(
        name=f"{prefix}_aggregate_metrics",
        minimum_interval_seconds=60,
        default_status=DefaultSensorStatus.RUNNING,
        description="Records each aggregate's change rate, windows recomputed, late changes, worst lateness and "
        "watermark as observations (from the stream's _cdc_aggregate_progress and _cdc_aggregate_late tables).",
    )
    @translator.with_resource_keys
    def aggregate_metrics(
        context: SensorEvaluationContext, control_plane: ControlPlaneResource, clickhouse: ClickHouseResource
    ) -> SensorResult | SkipReason:
        config = control_plane.load()
        cursor = json.loads(context.cursor) if context.cursor else {}
        after = datetime.fromisoformat(cursor.get("after", "1970-01-01T00:00:00+00:00"))
        client = clickhouse.client()
        try:
            events, newest = metric_observations(client, config, database_of(config, clickhouse), after, keys)
        finally:
            client.close()
        if not events or newest is None:
            return SkipReason("no aggregate progress since the last evaluation")
        return SensorResult(asset_events=events, cursor=json.dumps({"after": newest.isoformat()}))

    selection = AssetSelection.assets(*keys.values())
    return Definitions(
        assets=[rebuild],
        asset_checks=checks,
        sensors=[aggregate_metrics],
        jobs=[
            define_asset_job(
                translator.name("rebuild_aggregates"),
                selection=selection,
                description="Recompute every window of the aggregates from the replicas (idempotent).",
            ),
            define_asset_job(
                translator.name("check_aggregates"),
                selection=AssetSelection.checks_for_assets(*keys.values()),
                description="Compare the aggregates' closed windows with a recomputation from the replicas.",
            ),
        ],
    )

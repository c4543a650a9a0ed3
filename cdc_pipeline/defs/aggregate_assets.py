"""The pipeline's aggregates (`aggregates:` in pipeline.yaml) in Dagster: one asset per aggregate,
downstream of its table's ClickHouse replica; an asset check that recomputes the closed windows from the
replica with SQL and compares; a sensor that records each aggregate's change rate, watermark and late
changes as observations; and the `rebuild_aggregates` / `check_aggregates` jobs.

The stream keeps the aggregate tables current (streaming/aggregates.py). Materializing an aggregate
asset recomputes every window from the replica: the repair after the replica was changed behind the
stream's back (e.g. `reconcile_tables` marking extra rows deleted), or after an aggregate's definition
changed."""

import json
from datetime import datetime
from typing import Any

from clickhouse_connect.driver.binding import quote_identifier
from dagster import (
    AssetCheckExecutionContext,
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
from cdc_pipeline.control.aggregate_checks import CHECK, check_aggregate, read_aggregate_metrics, rebuild_aggregate
from cdc_pipeline.defs.assets import check_result
from cdc_pipeline.defs.common import database_of
from cdc_pipeline.defs.translator import CdcTranslator
from cdc_pipeline.resources import ClickHouseResource, ControlPlaneResource
from cdc_pipeline.streaming.aggregates import AggregateError, results_sql


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


def metric_observations(
    client: Any, database: str, after: datetime, keys: dict[str, AssetKey]
) -> tuple[list[AssetObservation], datetime | None]:
    """Per aggregate, what the stream recorded after `after` (see `read_aggregate_metrics`), as observations of its
    asset; and the newest record's time."""
    metrics, newest = read_aggregate_metrics(client, database, after, keys)
    return [AssetObservation(asset_key=keys[name], metadata=metadata) for name, metadata in metrics], newest


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
        pipeline = control_plane.load()
        database = database_of(pipeline, clickhouse)
        client = clickhouse.client()
        try:
            for aggregate in pipeline.aggregates:
                if aggregate.name not in keys or keys[aggregate.name] not in context.selected_asset_keys:
                    continue
                try:
                    rebuilt = rebuild_aggregate(client, pipeline, database, aggregate)
                except AggregateError as exc:
                    raise Failure(str(exc)) from None
                context.log.info(rebuilt.line(aggregate))
                yield MaterializeResult(
                    asset_key=keys[aggregate.name],
                    metadata={
                        "rows": rebuilt.rows,
                        "replica_exists": rebuilt.replica_exists,
                        "watermark": str(rebuilt.watermark or ""),
                    },
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
                pipeline = control_plane.load()
                current = next((a for a in pipeline.aggregates if a.name == aggregate.name), aggregate)
                client = clickhouse.client()
                try:
                    result = check_result(
                        check_aggregate(client, pipeline, database_of(pipeline, clickhouse), current), key
                    )
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
        pipeline = control_plane.load()
        cursor = json.loads(context.cursor) if context.cursor else {}
        after = datetime.fromisoformat(cursor.get("after", "1970-01-01T00:00:00+00:00"))
        client = clickhouse.client()
        try:
            events, newest = metric_observations(client, database_of(pipeline, clickhouse), after, keys)
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

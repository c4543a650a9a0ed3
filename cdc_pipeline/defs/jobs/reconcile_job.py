"""reconcile_tables: diff each replica with its source by primary key (control/reconcile.py) and,
on request, repair what differs (control/repair.py, through the backfill job's `run_backfill`)."""

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from dagster import (
    AssetKey,
    AssetObservation,
    Config,
    Failure,
    JobDefinition,
    MetadataValue,
    OpExecutionContext,
    Output,
    job,
    op,
)
from pydantic import Field

from cdc_pipeline.config import PipelineConfig, TableConfig
from cdc_pipeline.control import reconcile, repair
from cdc_pipeline.control.replicas import ClickHouseReplica, Replica, WarehouseReplica
from cdc_pipeline.defs.common import database_of, stream_lag
from cdc_pipeline.defs.jobs.backfill_job import run_backfill
from cdc_pipeline.defs.translator import CdcTranslator
from cdc_pipeline.resources import (
    ClickHouseResource,
    ControlPlaneResource,
    KafkaConnectResource,
    KafkaResource,
    PostgresResource,
)

REPAIR_TIMEOUT_S = 3600  # the repair's backfill: its snapshot, then the stream applying it


class ReconcileConfig(Config):
    tables: list[str] = Field(default_factory=list, description="Tables to reconcile; empty: every table.")
    backfill_differences: bool = Field(
        default=False, description="Backfill missing and different rows (incremental snapshot of their keys)."
    )
    settle_s: float = Field(default=120, description="Wait for the stream's lag to reach zero before comparing.")
    max_filter_keys: int = Field(default=500, description="More differing keys than this: backfill the whole table.")


@contextmanager
def _replicas(
    translator: CdcTranslator,
    pipeline: PipelineConfig,
    table: TableConfig,
    clickhouse: ClickHouseResource,
    warehouse: PostgresResource,
) -> Iterator[list[tuple[Replica, AssetKey]]]:
    """The replicas of `table` (ClickHouse, the warehouse or both, per its `sinks`) with their asset keys."""
    sink, database = pipeline.sink_table(table), database_of(pipeline, clickhouse)
    with ExitStack() as stack:
        replicas: list[tuple[Replica, AssetKey]] = []
        if "clickhouse" in table.sinks:
            client = clickhouse.client()
            stack.callback(client.close)
            replicas.append((ClickHouseReplica(client, database, sink), translator.sink_key(table)))
        if "warehouse" in table.sinks:
            conn = stack.enter_context(warehouse.connect(autocommit=True))
            replicas.append((WarehouseReplica(conn, database, sink), translator.warehouse_key(table)))
        yield replicas


def build_reconcile_job(translator: CdcTranslator) -> JobDefinition:
    @op(
        name=translator.name("reconcile_op"),
        description="Row-level diff by primary key between each source table and its replicas.",
    )
    @translator.with_resource_keys
    def reconcile_op(
        context: OpExecutionContext,
        config: ReconcileConfig,
        control_plane: ControlPlaneResource,
        postgres: PostgresResource,
        kafka: KafkaResource,
        clickhouse: ClickHouseResource,
        warehouse: PostgresResource,
        kafka_connect: KafkaConnectResource,
    ) -> Output[dict]:
        pipeline = control_plane.load()
        try:
            tables = [pipeline.table(name) for name in config.tables] or pipeline.tables
        except KeyError as exc:
            raise Failure(exc.args[0]) from None

        def connect() -> Any:
            return postgres.connect(autocommit=True)

        def settled(table: TableConfig, replica: Replica) -> reconcile.Differences:
            return reconcile.reconcile_settled(
                connect, lambda: stream_lag(kafka, pipeline).total, replica, table, config.settle_s,
                context.log.warning,
            )  # fmt: skip

        report: dict[str, Any] = {}
        unresolved: list[str] = []
        for table in tables:
            with _replicas(translator, pipeline, table, clickhouse, warehouse) as replicas:
                for replica, asset_key in replicas:
                    name = reconcile.replica_label(table, replica)
                    diff = settled(table, replica)
                    summary = reconcile.summary(diff, replica.kind)
                    context.log.info(
                        f"{name}: {diff.source_rows} source rows, {diff.replica_rows} replica rows; "
                        f"missing {len(diff.missing)}, extra {len(diff.extra)}, different {len(diff.different)}"
                    )
                    if diff.total and config.backfill_differences:
                        summary["backfill"] = repair.repair(
                            connect, table, diff, replica, config.max_filter_keys,
                            lambda condition, table=table: run_backfill(
                                context, pipeline, table, condition, postgres, kafka, kafka_connect,
                                REPAIR_TIMEOUT_S, True,
                            ),
                            context.log.info,
                        )  # fmt: skip
                        diff = settled(table, replica)
                        summary["after_backfill"] = reconcile.counts(diff)
                    if diff.total:
                        unresolved.append(name)
                    report[name] = summary
                    context.log_event(
                        AssetObservation(
                            asset_key=asset_key,
                            metadata={"reconcile": MetadataValue.json(summary),
                                      "differences": MetadataValue.md(reconcile.differences_md(diff))},
                        )
                    )  # fmt: skip
        if unresolved:
            raise Failure(
                description=f"replicas differ from their source: {unresolved} (run with backfill_differences: true)",
                metadata={"report": MetadataValue.json(report)},
            )
        return Output(report, metadata={"report": MetadataValue.json(report)})

    @job(
        name=translator.name("reconcile_tables"),
        description="Diff each replica with its source by primary key; optionally backfill what differs.",
    )
    def reconcile_tables() -> None:
        reconcile_op()

    return reconcile_tables

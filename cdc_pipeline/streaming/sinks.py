"""Routing one micro-batch's writes to the sinks each table goes to (`tables[].sinks` in pipeline.yaml):
the ClickHouse replica, the PostgreSQL warehouse, or both.

`RoutingSink` has the methods of `ClickHouseSink` that the apply path uses, so the apply path writes
through it unchanged: every write goes to each of the table's sinks in turn (ClickHouse first), reads
(`current_rows`, `existing_key`) come from the first. A write is idempotent in every sink (the stored
version decides), so when a sink fails after another succeeded, the apply path's retry rewrites both.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from cdc_pipeline.config import PipelineConfig, TableConfig
from cdc_pipeline.settings import Settings
from cdc_pipeline.streaming.evolution import SchemaEvolution
from cdc_pipeline.streaming.sink import ClickHouseSink, ReplicaTable
from cdc_pipeline.streaming.types import ColumnSpec
from cdc_pipeline.streaming.warehouse import WarehouseSink


class RoutingSink:
    def __init__(self, pipeline: PipelineConfig, clickhouse: ClickHouseSink, warehouse: WarehouseSink | None) -> None:
        self.pipeline = pipeline
        self.clickhouse = clickhouse
        self.warehouse = warehouse
        self.evolution = clickhouse.evolution
        self.client = clickhouse.client  # the ClickHouse client (schema-change log, progress)

    def _table_config(self, table: ReplicaTable) -> TableConfig | None:
        if table.source is not None:
            try:
                return self.pipeline.table(table.source)
            except KeyError:
                return None
        return next((t for t in self.pipeline.tables if self.pipeline.sink_table(t) == table.name), None)

    def _sinks(self, table: ReplicaTable) -> list[Any]:
        config = self._table_config(table)
        wanted = config.sinks if config is not None else ["clickhouse"]
        sinks: list[Any] = []
        if "clickhouse" in wanted:
            sinks.append(self.clickhouse)
        if "warehouse" in wanted:
            if self.warehouse is None:
                raise RuntimeError(
                    f"table {table.source or table.name} goes to the warehouse sink, but no warehouse is configured: "
                    "set CDC_WAREHOUSE_DSN and CDC_WAREHOUSE_PASSWORD in the stream's environment"
                )
            sinks.append(self.warehouse)
        return sinks

    def forget(self, table: ReplicaTable) -> None:
        for sink in self._sinks(table):
            sink.forget(table)

    def existing_key(self, database: str, name: str) -> tuple[str, ...]:
        return self._sinks(ReplicaTable(database, name, ()))[0].existing_key(database, name)

    def ensure_table(
        self, table: ReplicaTable, columns: Sequence[ColumnSpec], partial: Collection[str] = ()
    ) -> list[str]:
        ran: list[str] = []
        for sink in self._sinks(table):
            ran += sink.ensure_table(table, columns, partial)
        return ran

    def current_rows(
        self, table: ReplicaTable, keys: Sequence[Sequence[Any]], columns: Sequence[str]
    ) -> dict[tuple[Any, ...], dict[str, Any]]:
        return self._sinks(table)[0].current_rows(table, keys, columns)

    def upsert(self, table: ReplicaTable, column_names: Sequence[str], rows: Sequence[Sequence[Any]]) -> int:
        return max(sink.upsert(table, column_names, rows) for sink in self._sinks(table))

    def delete(self, table: ReplicaTable, key_rows: Sequence[Sequence[Any]]) -> int:
        return max(sink.delete(table, key_rows) for sink in self._sinks(table))

    def truncate(self, table: ReplicaTable, row_version: int, source_ts: Any) -> bool:
        return any([sink.truncate(table, row_version, source_ts) for sink in self._sinks(table)])


def build_sink(
    pipeline: PipelineConfig, settings: Settings, clickhouse: ClickHouseSink, evolution: SchemaEvolution | None
) -> ClickHouseSink | RoutingSink:
    """The sink the apply path writes through: ClickHouse alone unless some table also (or only) goes to
    the warehouse. Fails at start, naming the fix, when a table wants a warehouse that is not configured."""
    wanted = [t.name for t in pipeline.tables if "warehouse" in t.sinks]
    if not wanted:
        return clickhouse
    if settings.warehouse_dsn is None:
        raise SystemExit(
            f"tables {wanted} go to the warehouse sink (pipeline.yaml `sinks`), but no warehouse is configured: "
            "set CDC_WAREHOUSE_DSN and CDC_WAREHOUSE_PASSWORD"
        )
    return RoutingSink(pipeline, clickhouse, WarehouseSink(settings.warehouse_conninfo, evolution))

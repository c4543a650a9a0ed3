"""The foreachBatch writer: one micro-batch of Debezium records -> ClickHouse replica tables + DLQ.

Idempotent for a given batch: rows carry versions from the source position, so if Spark replays a
batch after a crash (written to ClickHouse but not yet committed to the checkpoint) the final state
is the same. Dead letters are at-least-once: a replayed batch may send a bad record twice.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from clickhouse_connect.driver.exceptions import OperationalError
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from cdc_pipeline.config import PipelineConfig
from cdc_pipeline.streaming.dlq import DeadLetters
from cdc_pipeline.streaming.envelope import ROW_OPS, decode_envelope, latest_changes, truncate_positions, version
from cdc_pipeline.streaming.evolution import partial_columns
from cdc_pipeline.streaming.sink import ClickHouseSink, ReplicaTable
from cdc_pipeline.streaming.types import ColumnSpec, ValueConversionError, columns_from_schema

log = logging.getLogger(__name__)


@dataclass
class BatchStats:
    batch_id: int
    applied_rows: int = 0
    deleted_rows: int = 0
    truncates: int = 0
    dlq_count: int = 0
    latest_source_ts_ms: int | None = None
    tables: dict[str, int] = field(default_factory=dict)

    def saw_source_ts(self, ts_ms: int | None) -> None:
        if ts_ms is not None and (self.latest_source_ts_ms is None or ts_ms > self.latest_source_ts_ms):
            self.latest_source_ts_ms = ts_ms


def _ts(ts_ms: int | None) -> datetime:
    return datetime.fromtimestamp((ts_ms or 0) / 1000, tz=UTC)


def _merge_columns(schemas: list[dict[str, Any]]) -> list[ColumnSpec]:
    """Union of the columns of every schema version seen, in first-seen order (new columns append)."""
    merged: dict[str, ColumnSpec] = {}
    for schema in schemas:
        for spec in columns_from_schema(schema):
            merged.setdefault(spec.name, spec)
    return list(merged.values())


class ChangeApplier:
    """Callable for `writeStream.foreachBatch`."""

    def __init__(
        self,
        pipeline: PipelineConfig,
        database: str,
        sink: ClickHouseSink,
        dead_letters: DeadLetters,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.database = database
        self.sink = sink
        self.dead_letters = dead_letters
        self.on_batch = on_batch

    def __call__(self, batch: DataFrame, batch_id: int) -> None:
        stats = BatchStats(batch_id)
        batch.persist()
        try:
            decoded = decode_envelope(batch).persist()
            self._dead_letter_invalid(decoded, stats)
            self._apply(decoded, stats)
            # Dead letters must be durable before Spark commits the batch.
            self.dead_letters.flush()
            decoded.unpersist()
        finally:
            batch.unpersist()
        if self.on_batch:
            self.on_batch(stats)

    def _dead_letter_invalid(self, decoded: DataFrame, stats: BatchStats) -> None:
        bad = decoded.filter(F.col("error").isNotNull()).select("topic", "partition", "offset", "key", "value", "error")
        for row in bad.toLocalIterator():
            self._dead_letter(row, row.error, stats)

    def _apply(self, decoded: DataFrame, stats: BatchStats) -> None:
        valid = decoded.filter(F.col("error").isNull() & F.col("op").isin(*ROW_OPS))
        schemas: dict[str, list[dict[str, Any]]] = defaultdict(list)
        key_schemas: dict[str, dict[str, Any]] = {}
        shapes = valid.select(
            "topic",
            F.get_json_object(F.col("value").cast("string"), "$.schema").alias("value_schema"),
            F.get_json_object(F.col("key").cast("string"), "$.schema").alias("key_schema"),
        ).distinct()
        for row in shapes.collect():
            if row.value_schema:
                schemas[row.topic].append(json.loads(row.value_schema))
            if row.key_schema and row.topic not in key_schemas:
                key_schemas[row.topic] = json.loads(row.key_schema)

        truncates = {
            row.topic: version(row.trunc_commit_lsn, row.trunc_change_lsn)
            for row in truncate_positions(decoded).collect()
        }
        changes: dict[str, list[Any]] = defaultdict(list)
        for row in latest_changes(decoded).toLocalIterator():
            changes[row.topic].append(row)

        for topic in sorted(set(changes) | set(truncates)):
            table_config = self.pipeline.table_for_topic(topic)
            if table_config is None:
                log.warning("ignoring records of unconfigured topic %s", topic)
                continue
            key_schema = key_schemas.get(topic, {})
            # A key schema is a struct like `after`: wrapping it lets the same mapping convert key values,
            # which delete-only batches (no `after` image at all) need.
            key_columns = columns_from_schema({"fields": [{**key_schema, "field": "after"}]}) if key_schema else []
            columns = _merge_columns(schemas.get(topic, []))
            names = {c.name for c in columns}
            columns += [c for c in key_columns if c.name not in names]
            keys = tuple(c.name for c in key_columns) or tuple(table_config.primary_key or ())
            sink_name = self.pipeline.sink_table(table_config)
            table = ReplicaTable(self.database, sink_name, keys, table_config.partition_by, table_config.name)
            if columns:
                self.sink.ensure_table(table, columns, partial_columns(schemas.get(topic, [])))
            if topic in truncates and self.sink.truncate(table, truncates[topic], _ts(None)):
                stats.truncates += 1
            self._write_rows(table, {c.name: c for c in columns}, changes.get(topic, []), stats)

    def _write_rows(
        self, table: ReplicaTable, specs: dict[str, ColumnSpec], rows: list[Any], stats: BatchStats
    ) -> None:
        upserts: dict[tuple[str, ...], list[tuple[Any, list[Any]]]] = defaultdict(list)
        deletes: list[tuple[Any, list[Any]]] = []
        for row in rows:
            meta = [version(row.commit_lsn, row.change_lsn), 1 if row.op == "d" else 0, _ts(row.source_ts_ms)]
            try:
                if row.op == "d":
                    key = json.loads(row.key_json)
                    deletes.append(
                        (row, [self._convert(specs, name, key.get(name)) for name in table.key_columns] + meta)
                    )
                else:
                    after = json.loads(row.after_json)
                    names = tuple(after)
                    upserts[names].append((row, [self._convert(specs, name, after[name]) for name in names] + meta))
            except (ValueConversionError, KeyError, ValueError, TypeError) as exc:
                self._dead_letter(row, f"conversion failed: {exc}", stats)
                continue
            stats.saw_source_ts(row.source_ts_ms)
        for names, group in upserts.items():
            stats.applied_rows += self._insert(lambda values, n=names: self.sink.upsert(table, n, values), group, stats)
        stats.deleted_rows += self._insert(lambda values: self.sink.delete(table, values), deletes, stats)
        stats.tables[table.name] = stats.tables.get(table.name, 0) + len(rows)

    def _insert(
        self, write: Callable[[list[list[Any]]], int], group: list[tuple[Any, list[Any]]], stats: BatchStats
    ) -> int:
        """Columnar insert of the group; if ClickHouse rejects the data, isolate the bad rows (halving)
        and dead-letter them. Connection errors propagate: the batch fails and Spark retries it."""
        if not group:
            return 0
        try:
            return write([values for _, values in group])
        except OperationalError:
            raise
        except Exception as exc:
            if len(group) == 1:
                self._dead_letter(group[0][0], f"ClickHouse rejected the row: {str(exc).splitlines()[0][:500]}", stats)
                return 0
            middle = len(group) // 2
            return self._insert(write, group[:middle], stats) + self._insert(write, group[middle:], stats)

    def _dead_letter(self, row: Any, reason: str, stats: BatchStats) -> None:
        self.dead_letters.send(row.key, row.value, reason, row.topic, row.partition, row.offset)
        stats.dlq_count += 1

    @staticmethod
    def _convert(specs: dict[str, ColumnSpec], name: str, value: Any) -> Any:
        spec = specs.get(name)
        if spec is None:
            raise KeyError(f"column {name!r} has no schema in this batch")
        return spec.convert(value)

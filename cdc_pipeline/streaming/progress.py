"""After each committed micro-batch: commit the processed offsets to a Kafka consumer group (so
`kafka-consumer-groups`, Burrow and the lag sensor see the stream's lag) and record the batch's
progress in ClickHouse, where the control plane reads it without reaching the Spark driver."""

from __future__ import annotations

import json
import logging
import threading
from datetime import UTC, datetime

from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client
from confluent_kafka import Consumer, TopicPartition
from pyspark.sql.streaming import StreamingQueryListener

from cdc_pipeline.contract import (
    PROGRESS_ADDED_COLUMNS,
    PROGRESS_COLUMN_TYPES,
    PROGRESS_COLUMNS,
    PROGRESS_ORDER_BY,
    PROGRESS_TABLE,
)
from cdc_pipeline.streaming.apply import BatchStats

log = logging.getLogger(__name__)

_TYPES = dict(PROGRESS_COLUMN_TYPES)


def progress_table_sql(database: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {quote_identifier(database)}.{PROGRESS_TABLE} (\n  "
        + ",\n  ".join(f"{name} {kind}" for name, kind in PROGRESS_COLUMN_TYPES)
        + f"\n) ENGINE = ReplacingMergeTree ORDER BY ({', '.join(PROGRESS_ORDER_BY)})"
    )


def progress_table_migrations(database: str) -> list[str]:
    """Statements that bring a progress table created by an older release up to PROGRESS_COLUMNS."""
    table = f"{quote_identifier(database)}.{PROGRESS_TABLE}"
    return [f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} {_TYPES[name]}" for name in PROGRESS_ADDED_COLUMNS]


def offsets_to_commit(end_offset_json: str) -> list[TopicPartition]:
    """Spark's source endOffset ({"topic": {"0": 42}}) as Kafka commit positions (next offset to read)."""
    offsets = json.loads(end_offset_json or "{}")
    return [
        TopicPartition(topic, int(partition), int(offset))
        for topic, partitions in offsets.items()
        for partition, offset in partitions.items()
        if int(offset) >= 0
    ]


class ProgressRecorder(StreamingQueryListener):
    """A StreamingQueryListener: Spark calls onQueryProgress after each batch is committed."""

    def __init__(self, query_name: str, database: str, client: Client, kafka_config: dict[str, str]) -> None:
        self.query_name = query_name
        self.database = database
        self.client = client
        self._consumer = Consumer({**kafka_config, "enable.auto.commit": False})
        self._stats: dict[int, BatchStats] = {}
        self._lock = threading.Lock()

    def batch_applied(self, stats: BatchStats) -> None:
        with self._lock:
            self._stats[stats.batch_id] = stats

    def onQueryStarted(self, event) -> None:  # noqa: ANN001, N802 - Spark's listener API
        pass

    def onQueryIdle(self, event) -> None:  # noqa: ANN001, N802
        pass

    def onQueryTerminated(self, event) -> None:  # noqa: ANN001, N802
        pass

    def onQueryProgress(self, event) -> None:  # noqa: ANN001, N802
        progress = event.progress
        if progress.name != self.query_name:
            return
        with self._lock:
            stats = self._stats.pop(progress.batchId, None)
            for old in [b for b in self._stats if b < progress.batchId]:
                self._stats.pop(old)
        end_offsets = progress.sources[0].endOffset if progress.sources else "{}"
        try:
            positions = offsets_to_commit(end_offsets)
            if positions:
                self._consumer.commit(offsets=positions, asynchronous=False)
        except Exception:  # lag visibility must never stop the stream; the checkpoint is the truth
            log.exception("could not commit processed offsets to Kafka for batch %s", progress.batchId)
        try:
            latest = stats.latest_source_ts_ms if stats else None
            row = [
                self.query_name, progress.batchId, datetime.now(UTC), progress.numInputRows,
                float(progress.inputRowsPerSecond or 0.0), float(progress.processedRowsPerSecond or 0.0),
                int(progress.durationMs.get("triggerExecution", 0)), end_offsets,
                stats.applied_rows if stats else 0, stats.deleted_rows if stats else 0, stats.dlq_count if stats else 0,
                datetime.fromtimestamp(latest / 1000, tz=UTC) if latest else None,
                stats.clamped_values if stats else 0, stats.toast_merged if stats else 0,
                stats.sink_retries if stats else 0,
            ]  # fmt: skip
            self.client.insert(
                f"{quote_identifier(self.database)}.{PROGRESS_TABLE}", [row], column_names=PROGRESS_COLUMNS
            )
        except Exception:
            log.exception("could not record progress of batch %s", progress.batchId)

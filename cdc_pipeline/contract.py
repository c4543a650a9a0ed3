"""The replica table contract: what the stream writes and the control plane reads, defined once.

Every replica table (ClickHouse or the PostgreSQL warehouse) has the source's captured columns plus
three bookkeeping columns:

- `_version`: the change's source position (see `streaming/envelope.version`); a row state replaces
  another only with a higher version, so re-applying any batch in any order never brings back an
  older row;
- `_is_deleted`: 1 for a delete (a tombstone carrying the delete's version), 0 for a live row;
- `_source_ts`: when the change was committed in the source.

The live rows are those with `_is_deleted = 0` (in ClickHouse read with `FINAL`, which keeps only
the highest version of each key). The stream records each micro-batch in the progress table, where
the control plane reads it. Nothing here imports Spark or Dagster.
"""

from __future__ import annotations

# Bookkeeping columns, after the source's own columns, in this order.
VERSION = "_version"
IS_DELETED = "_is_deleted"
SOURCE_TS = "_source_ts"
META_NAMES = (VERSION, IS_DELETED, SOURCE_TS)
DELETED, LIVE = 1, 0

CLICKHOUSE_META_COLUMNS = (
    (VERSION, "UInt128"),
    (IS_DELETED, "UInt8"),
    (SOURCE_TS, "DateTime64(3, 'UTC')"),
)
# Replacing by version; a row whose newest state is a delete disappears from FINAL reads.
CLICKHOUSE_ENGINE = f"ReplacingMergeTree({VERSION}, {IS_DELETED})"

WAREHOUSE_META_COLUMNS = (
    (VERSION, "numeric(39,0) NOT NULL"),
    (IS_DELETED, "smallint NOT NULL DEFAULT 0"),
    (SOURCE_TS, "timestamptz"),
)

# The live-row filter (a SQL condition, the same in ClickHouse and PostgreSQL). In ClickHouse it
# follows `FINAL`: `SELECT ... FROM t FINAL WHERE <LIVE_ROWS>`.
LIVE_ROWS = f"{IS_DELETED} = {LIVE}"

# The stream's progress table (one per replica database): one row per micro-batch, replaced by
# (query_name, batch_id).
PROGRESS_TABLE = "_cdc_stream_progress"
PROGRESS_COLUMN_TYPES = (
    ("query_name", "String"),
    ("batch_id", "Int64"),
    ("recorded_at", "DateTime64(3, 'UTC')"),
    ("num_input_rows", "Int64"),
    ("input_rows_per_second", "Float64"),
    ("processed_rows_per_second", "Float64"),
    ("batch_duration_ms", "Int64"),
    ("end_offsets", "String"),
    ("applied_rows", "Int64"),
    ("deleted_rows", "Int64"),
    ("dlq_count", "Int64"),
    ("latest_source_ts", "Nullable(DateTime64(3, 'UTC'))"),
    ("clamped_values", "Int64"),  # out-of-range dates/timestamps stored clamped (sink.clickhouse.out_of_range)
    ("toast_merged", "Int64"),  # updates whose unchanged TOASTed values were filled in
    ("sink_retries", "Int64"),  # ClickHouse writes retried after a transient error
)
PROGRESS_COLUMNS = tuple(name for name, _ in PROGRESS_COLUMN_TYPES)
# Columns added after the first release: tables created before get them with ADD COLUMN IF NOT EXISTS.
PROGRESS_ADDED_COLUMNS = ("clamped_values", "toast_merged", "sink_retries")
PROGRESS_ORDER_BY = ("query_name", "batch_id")

"""Decode, order and deduplicate Debezium change events: pure DataFrame -> DataFrame functions.

Input rows are Kafka records (key, value, topic, partition, offset) whose values are Debezium
envelopes written by Connect's JsonConverter with schemas: {"schema": ..., "payload": {"op", "before",
"after", "source", ...}}. Ordering uses the source position only, never arrival order.

The position of a change is (commit_lsn, change_lsn), from Debezium's `source.sequence`
["<end LSN of the previously streamed commit>", "<this change's LSN>"]. Debezium streams whole
transactions in commit order, so the first element grows with commit order and is constant within a
transaction, where the second grows. Special cases:
- snapshot rows (`op: r` of an initial, repeated or blocking snapshot; `source.snapshot` not
  "incremental") get (snapshot LSN, 0): the snapshot reads the table as of its LSN, so its rows are
  newer than every change committed before that point (a re-snapshot repairs a stale replica row)
  and older than every change streamed after it (those have a commit position at or past the
  snapshot LSN and a change LSN above 0);
- the first transaction after the connector starts has no previous commit (null first element, an
  "unanchored" change): it uses its change LSN, which is past the commit of any earlier streamed
  change to the same row (row locks make a later change to a row start after the earlier one
  committed). That LSN can be older than a snapshot the connector took just before: a transaction
  that wrote before the snapshot point and committed after it is invisible to the snapshot yet
  streamed after it. Every streamed transaction committed after the snapshots that precede it in
  its topic, so an unanchored change's commit part is raised to the newest snapshot LSN before it
  in the topic (`anchor_positions`, with the snapshot points the stream records in ClickHouse, see
  streaming/snapshots.py); without that, the snapshot row would win and the update be lost.
Incremental-snapshot rows carry the connector's current position, so they are newer than anything
streamed before them (Debezium drops snapshot rows changed inside the snapshot window).
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

ROW_OPS = ("c", "r", "u", "d")
TRUNCATE = "t"


def _json(column: Column, path: str) -> Column:
    return F.get_json_object(column, path)


def decode_envelope(raw: DataFrame) -> DataFrame:
    """One row per Kafka record: op, source position, key/after JSON, and `error` (null when valid).

    Tombstones (null value, emitted after a delete for log compaction) get op null and no error:
    they carry nothing to apply.
    """
    value = F.col("value").cast("string")
    key = F.col("key").cast("string")
    op = _json(value, "$.payload.op")
    # source.sequence is a JSON array in a string: ["<previous commit end LSN>", "<change LSN>"].
    sequence = F.from_json(_json(value, "$.payload.source.sequence"), T.ArrayType(T.StringType()))
    lsn = _json(value, "$.payload.source.lsn").cast("long")
    snapshot = _json(value, "$.payload.source.snapshot")
    snapshot_row = (op == "r") & snapshot.isNotNull() & ~snapshot.isin("false", "incremental")
    commit_lsn = F.when(snapshot_row, lsn).otherwise(F.coalesce(sequence.getItem(0).cast("long"), lsn))
    change_lsn = F.when(snapshot_row, F.lit(0).cast("long")).otherwise(
        F.coalesce(sequence.getItem(1).cast("long"), lsn)
    )
    key_json = _json(key, "$.payload")
    after_json = _json(value, "$.payload.after")
    payload = _json(value, "$.payload")
    value_schema = _json(value, "$.schema")
    key_schema = _json(key, "$.schema")

    error = (
        F.when(F.col("value").isNull(), F.lit(None))
        .when(payload.isNull(), F.lit("malformed message: not a JSON Debezium envelope with a payload"))
        .when(
            op.isNull() | ~op.isin(*ROW_OPS, TRUNCATE), F.concat(F.lit("unknown op: "), F.coalesce(op, F.lit("null")))
        )
        .when(lsn.isNull() & sequence.isNull(), F.lit("missing source position (payload.source.lsn)"))
        .when(
            commit_lsn.isNull() | change_lsn.isNull() | (commit_lsn < 0) | (change_lsn < 0),
            F.lit("invalid source position (payload.source.lsn / payload.source.sequence)"),
        )
        .when(op.isin(*ROW_OPS) & value_schema.isNull(), F.lit("missing schema: the record has no value schema"))
        .when(op.isin(*ROW_OPS) & key_json.isNull(), F.lit("missing key: the record has no primary-key payload"))
        .when(op.isin("c", "r", "u") & after_json.isNull(), F.lit("missing after image for a create/read/update"))
    )
    return raw.select(
        "topic",
        "partition",
        "offset",
        "key",
        "value",
        F.when(F.col("value").isNotNull(), op).alias("op"),
        commit_lsn.alias("commit_lsn"),
        change_lsn.alias("change_lsn"),
        key_json.alias("key_json"),
        after_json.alias("after_json"),
        _json(value, "$.payload.before").alias("before_json"),
        # Schemas repeat in every record: the batch parses each distinct one once (see schema_texts).
        F.xxhash64(value_schema).alias("value_schema_id"),
        F.xxhash64(key_schema).alias("key_schema_id"),
        _json(value, "$.payload.source.ts_ms").cast("long").alias("source_ts_ms"),
        F.when(snapshot_row, lsn).alias("snapshot_lsn"),
        (~snapshot_row & sequence.getItem(0).isNull()).alias("unanchored"),
        error.alias("error"),
    )


def valid_changes(decoded: DataFrame) -> DataFrame:
    return decoded.filter(F.col("error").isNull() & F.col("op").isNotNull())


def truncate_positions(decoded: DataFrame) -> DataFrame:
    """Per topic, the position of the last truncate in this batch (topic, trunc_commit_lsn, trunc_change_lsn)."""
    last = F.max(F.struct("commit_lsn", "change_lsn"))
    return (
        valid_changes(decoded)
        .filter(F.col("op") == TRUNCATE)
        .groupBy("topic")
        .agg(last.alias("t"))
        .select(
            "topic", F.col("t.commit_lsn").alias("trunc_commit_lsn"), F.col("t.change_lsn").alias("trunc_change_lsn")
        )
    )


def batch_summary(decoded: DataFrame) -> DataFrame:
    """One small aggregate of the batch's valid changes, grouped by (topic, partition, snapshot_lsn):
    `first_offset` (where a snapshot's rows start; snapshot_lsn null for streamed changes), `unanchored`
    (the group holds a change without a previous commit position) and `last_truncate` (the newest
    truncate's (commit_lsn, change_lsn) struct, or null)."""
    truncate = F.when(F.col("op") == TRUNCATE, F.struct("commit_lsn", "change_lsn"))
    return (
        valid_changes(decoded)
        .groupBy("topic", "partition", "snapshot_lsn")
        .agg(
            F.min("offset").alias("first_offset"),
            F.max(F.col("unanchored").cast("int")).alias("unanchored"),
            F.max(truncate).alias("last_truncate"),
        )
    )


SnapshotPoints = dict[tuple[str, int], list[tuple[int, int]]]


def anchor_positions(decoded: DataFrame, points: SnapshotPoints) -> DataFrame:
    """Raise each unanchored change's commit part to the newest snapshot LSN that precedes it in its
    topic partition. `points`: (topic, partition) -> [(first offset of a snapshot's rows, its LSN)]."""
    floor = F.lit(None).cast("long")
    for (topic, partition), found in sorted(points.items()):
        newest = 0
        for first_offset, lsn in sorted(found):
            newest = max(newest, lsn)
            here = (F.col("topic") == topic) & (F.col("partition") == partition) & (F.col("offset") > first_offset)
            floor = F.when(here, F.lit(newest).cast("long")).otherwise(floor)
    anchored = F.when(F.col("unanchored") & floor.isNotNull(), F.greatest(F.col("commit_lsn"), floor))
    return decoded.withColumn("commit_lsn", anchored.otherwise(F.col("commit_lsn")))


def schema_texts(decoded: DataFrame) -> DataFrame:
    """Per topic, each distinct (value schema, key schema) of the batch's row changes, with its JSON
    text and the first offset it appears at: (topic, value_schema_id, key_schema_id, value_schema,
    key_schema, first_offset)."""
    rows = valid_changes(decoded).filter(F.col("op").isin(*ROW_OPS))
    return rows.groupBy("topic", "value_schema_id", "key_schema_id").agg(
        F.first(_json(F.col("value").cast("string"), "$.schema")).alias("value_schema"),
        F.first(_json(F.col("key").cast("string"), "$.schema")).alias("key_schema"),
        F.min("offset").alias("first_offset"),
    )


def row_changes(decoded: DataFrame) -> DataFrame:
    """Every valid row change (c/r/u/d), without those that a later truncate in the same batch wipes out."""
    rows = valid_changes(decoded).filter(F.col("op").isin(*ROW_OPS))
    truncates = truncate_positions(decoded)
    after_truncate = (F.col("trunc_commit_lsn").isNull()) | (
        F.struct("commit_lsn", "change_lsn") > F.struct("trunc_commit_lsn", "trunc_change_lsn")
    )
    return rows.join(truncates, "topic", "left").filter(after_truncate).drop("trunc_commit_lsn", "trunc_change_lsn")


def newest_first() -> list[Column]:
    """Sort order of changes, newest first. Source position decides; partition/offset only break exact
    ties (the same event delivered twice)."""
    return [F.col(name).desc() for name in ("commit_lsn", "change_lsn", "partition", "offset")]


def latest_changes(decoded: DataFrame) -> DataFrame:
    """The last row change per (topic, primary key) by source position, dropping changes that a later
    truncate in the same batch wipes out anyway."""
    window = Window.partitionBy("topic", "key_json").orderBy(*newest_first())
    rows = row_changes(decoded)
    return rows.withColumn("_rank", F.row_number().over(window)).filter(F.col("_rank") == 1).drop("_rank")


def version(commit_lsn: int, change_lsn: int) -> int:
    """The sink row version (a UInt128): the position's commit part in the high 64 bits, the change
    LSN in the low, so versions order exactly like positions (see the module docstring)."""
    return (commit_lsn << 64) | change_lsn

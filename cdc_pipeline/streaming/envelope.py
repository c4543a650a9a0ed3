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
  in the topic (`batch.anchor_positions`, with the snapshot points the stream records in ClickHouse,
  see streaming/snapshots.py); without that, the snapshot row would win and the update be lost.
Incremental-snapshot rows carry the connector's current position, so they are newer than anything
streamed before them (Debezium drops snapshot rows changed inside the snapshot window).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

ROW_OPS = ("c", "r", "u", "d")
TRUNCATE = "t"


def _json(column: Column, path: str) -> Column:
    return F.get_json_object(column, path)


# The parts of the envelope the stream reads, parsed in one pass per record. A field declared `string`
# keeps the JSON text of whatever value it holds (object, array, number), as `get_json_object` would.
_SOURCE_TYPE = "struct<lsn:string,sequence:string,snapshot:string,ts_ms:string>"
VALUE_TYPE = f"struct<payload:struct<op:string,before:string,after:string,source:{_SOURCE_TYPE}>>"
KEY_TYPE = "struct<schema:string,payload:string>"
# JsonConverter writes `{"schema":{...},"payload":{...}}`: schema first, no spaces. The schema's id is the
# hash of the text before the first `,"payload":`. That text is the whole schema unless the schema itself
# holds an object key "payload" (no Connect schema does): the writer checks it once per schema id
# (`schema_from_prefix`) and dead-letters the records of a schema that fails, so one id never stands for
# two schemas. The JSON parser then reads `{"payload":...}` only, the bytes after that prefix: the schema
# is most of a record (~6 of 7 KB for a 9-column table); tokenizing it for every record, even to skip
# it, cost about a sixth of the decode. Any other layout is parsed whole and hashes the `$.schema` text.
SCHEMA_PREFIX = '{"schema":'
_PAYLOAD_MARK = ',"payload":'


def _canonical(value: Column) -> Column:
    return value.startswith(SCHEMA_PREFIX + "{") & value.contains(_PAYLOAD_MARK)


def value_schema_text(value: Column) -> Column:
    """The JSON text of a record value's `schema` (null when absent): read once per distinct schema id."""
    return _json(value, "$.schema")


def schema_from_prefix(prefix: str) -> object:
    """The schema of a JsonConverter-layout value from its text before the first `,"payload":`; ValueError
    when that text is not exactly `{"schema":` and one JSON value (then the payload that follows it is not
    the envelope's own)."""
    if not prefix.startswith(SCHEMA_PREFIX):
        raise ValueError("the value does not start with its schema")
    return json.loads(prefix[len(SCHEMA_PREFIX) :])


def _schema_prefix(value: Column) -> Column:
    """The text before the first `,"payload":` of a JsonConverter-layout value (see SCHEMA_PREFIX), else null."""
    # Byte-wise string functions only: instr/length/substr on strings count characters.
    return F.when(_canonical(value), F.substring_index(value, _PAYLOAD_MARK, 1))


def _value_schema_id(text: Column, prefix: Column) -> tuple[Column, Column]:
    """(schema id, has a schema) of a record value, given its `_schema_prefix` (see SCHEMA_PREFIX)."""
    schema = value_schema_text(text)
    schema_id = F.when(prefix.isNotNull(), F.xxhash64(prefix)).otherwise(F.xxhash64(schema))
    return schema_id, prefix.isNotNull() | schema.isNotNull()


def _payload(value: Column, text: Column, prefix: Column) -> Column:
    """The envelope's payload struct. JsonConverter's layout: parsed from `{"payload":` and the bytes after
    the schema prefix (cut from the binary value by byte position). Any other layout, or a value whose cut
    holds no payload (a schema with a "payload" key, see SCHEMA_PREFIX; a broken value): parsed whole."""
    after_prefix = value.substr(F.octet_length(prefix) + 2, F.octet_length(value)).cast("string")
    cut = F.when(prefix.isNotNull(), F.from_json(F.concat(F.lit("{"), after_prefix), VALUE_TYPE).getField("payload"))
    return F.coalesce(cut, F.from_json(text, VALUE_TYPE).getField("payload"))


def decode_envelope(raw: DataFrame, *, keep_raw: bool = False) -> DataFrame:
    """One row per Kafka record: op, source position, key/after/before JSON, schema ids and `error`
    (null when valid). The value is parsed once (`from_json`), not once per field; in JsonConverter's
    layout, only its bytes after the schema (see SCHEMA_PREFIX). With `keep_raw`, the raw `key` and `value`
    columns follow (the streaming query decodes in its own plan, and the batch writer reads the raw bytes of
    the few dead letters and new schemas from the same rows, see `records_at`).

    Tombstones (null value, emitted after a delete for log compaction) get op null and no error:
    they carry nothing to apply.
    """
    raw_columns = ["key", "value"] if keep_raw else []
    # Each stage is its own projection: every parse runs once per record and later stages refer to its
    # result (Spark keeps a projection apart when inlining it would repeat an expensive expression).
    text = F.col("value").cast("string")
    split = raw.select(
        "topic", "partition", "offset", "key", "value", text.alias("_text"), _schema_prefix(text).alias("_prefix")
    )
    text, prefix = F.col("_text"), F.col("_prefix")
    value_schema_id, has_value_schema = _value_schema_id(text, prefix)
    parsed = split.select(
        "topic",
        "partition",
        "offset",
        *raw_columns,
        F.col("value").isNull().alias("_tombstone"),
        _payload(F.col("value"), text, prefix).alias("_p"),
        F.from_json(F.col("key").cast("string"), KEY_TYPE).alias("_k"),
        value_schema_id.alias("value_schema_id"),
        has_value_schema.alias("_has_schema"),
    )
    payload, source = F.col("_p"), F.col("_p.source")
    fields = parsed.select(
        "topic",
        "partition",
        "offset",
        *raw_columns,
        "_tombstone",
        "_has_schema",
        "value_schema_id",
        payload.isNull().alias("_no_payload"),
        payload.getField("op").alias("_op"),
        payload.getField("after").alias("after_json"),
        payload.getField("before").alias("before_json"),
        F.col("_k.payload").alias("key_json"),
        F.xxhash64(F.col("_k.schema")).alias("key_schema_id"),
        source.getField("lsn").try_cast("long").alias("_lsn"),
        source.getField("snapshot").alias("_snapshot"),
        # source.sequence is a JSON array in a string: ["<previous commit end LSN>", "<change LSN>"].
        F.from_json(source.getField("sequence"), T.ArrayType(T.StringType())).alias("_seq"),
        source.getField("ts_ms").try_cast("long").alias("source_ts_ms"),
    )
    op, lsn, sequence, snapshot = F.col("_op"), F.col("_lsn"), F.col("_seq"), F.col("_snapshot")
    snapshot_row = (op == "r") & snapshot.isNotNull() & ~snapshot.isin("false", "incremental")
    positioned = fields.select(
        "*",
        F.when(snapshot_row, lsn).otherwise(F.coalesce(sequence.getItem(0).try_cast("long"), lsn)).alias("commit_lsn"),
        F.when(snapshot_row, F.lit(0).cast("long"))
        .otherwise(F.coalesce(sequence.getItem(1).try_cast("long"), lsn))
        .alias("change_lsn"),
    )
    commit_lsn, change_lsn, key_json = F.col("commit_lsn"), F.col("change_lsn"), F.col("key_json")
    error = (
        F.when(F.col("_tombstone"), F.lit(None))
        .when(F.col("_no_payload"), F.lit("malformed message: not a JSON Debezium envelope with a payload"))
        .when(
            op.isNull() | ~op.isin(*ROW_OPS, TRUNCATE), F.concat(F.lit("unknown op: "), F.coalesce(op, F.lit("null")))
        )
        .when(lsn.isNull() & sequence.isNull(), F.lit("missing source position (payload.source.lsn)"))
        .when(
            commit_lsn.isNull() | change_lsn.isNull() | (commit_lsn < 0) | (change_lsn < 0),
            F.lit("invalid source position (payload.source.lsn / payload.source.sequence)"),
        )
        .when(op.isin(*ROW_OPS) & ~F.col("_has_schema"), F.lit("missing schema: the record has no value schema"))
        .when(op.isin(*ROW_OPS) & key_json.isNull(), F.lit("missing key: the record has no primary-key payload"))
        .when(
            op.isin("c", "r", "u") & F.col("after_json").isNull(),
            F.lit("missing after image for a create/read/update"),
        )
    )
    return positioned.select(
        "topic",
        "partition",
        "offset",
        F.when(~F.col("_tombstone"), op).alias("op"),
        "commit_lsn",
        "change_lsn",
        "key_json",
        "after_json",
        "before_json",
        # Schemas repeat in every record: the writer parses each distinct one once, ever (see records_at).
        "value_schema_id",
        "key_schema_id",
        "source_ts_ms",
        # A snapshot row's LSN (where a snapshot starts in its topic, see streaming/snapshots.py), and whether
        # a streamed change has no previous commit position (the first transaction after a connector start).
        F.when(snapshot_row, lsn).alias("snapshot_lsn"),
        (~snapshot_row & sequence.getItem(0).isNull()).alias("unanchored"),
        # The last row of a table in a snapshot (Debezium marks it `last_in_data_collection`, or `last` for
        # the snapshot's very last row): the table's snapshot is complete (see batch.snapshot_ends).
        (snapshot_row & snapshot.isin("last", "last_in_data_collection")).alias("snapshot_end"),
        # A snapshot taken when the connector started without offsets (its rows have no previous commit
        # position; a blocking snapshot's do): Debezium streams only what follows it (see
        # batch.snapshot_ends).
        (snapshot_row & sequence.getItem(0).isNull()).alias("snapshot_initial"),
        error.alias("error"),
        *raw_columns,
    )


def is_decoded(records: DataFrame) -> bool:
    """Whether `records` come from `decode_envelope(..., keep_raw=True)` (the streaming query's own plan)
    rather than straight from Kafka."""
    return {"after_json", "error", "key", "value"} <= set(records.columns)


def offset_ranges(
    positions: Sequence[tuple[str, int, int]],
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """The Kafka `startingOffsets` and `endingOffsets` (exclusive) that hold these (topic, partition, offset)
    positions: per partition, its first to its last wanted offset."""
    starting: dict[str, dict[str, int]] = {}
    ending: dict[str, dict[str, int]] = {}
    for topic, partition, offset in positions:
        first = starting.setdefault(topic, {}).get(str(partition), offset)
        last = ending.setdefault(topic, {}).get(str(partition), offset + 1)
        starting[topic][str(partition)] = min(first, offset)
        ending[topic][str(partition)] = max(last, offset + 1)
    return starting, ending


def records_at(raw: DataFrame, positions: Sequence[tuple[str, int, int]]) -> DataFrame:
    """The raw records at these (topic, partition, offset) positions (dead letters, the first record of a
    schema not seen before), of Kafka records or of decoded ones that kept them (`keep_raw`), with their value
    schema (JsonConverter's layout: `value_prefix`, see `schema_from_prefix`; else the JSON text
    `value_schema`) and the JSON text of their key schema."""
    by_partition: dict[tuple[str, int], list[int]] = defaultdict(list)
    for topic, partition, offset in positions:
        by_partition[(topic, partition)].append(offset)
    wanted = F.lit(False)
    for (topic, partition), offsets in sorted(by_partition.items()):
        wanted = wanted | (
            (F.col("topic") == topic) & (F.col("partition") == partition) & F.col("offset").isin(sorted(offsets))
        )
    text = F.col("value").cast("string")
    return raw.filter(wanted).select(
        "topic",
        "partition",
        "offset",
        "key",
        "value",
        # JsonConverter's layout: the schema is read from the prefix its id was hashed from (see
        # schema_from_prefix); any other layout: from the parsed value.
        _schema_prefix(text).alias("value_prefix"),
        F.when(~_canonical(text), value_schema_text(text)).alias("value_schema"),
        _json(F.col("key").cast("string"), "$.schema").alias("key_schema"),
    )


def version(commit_lsn: int, change_lsn: int) -> int:
    """The sink row version (a UInt128): the position's commit part in the high 64 bits, the change
    LSN in the low, so versions order exactly like positions (see the module docstring)."""
    return (commit_lsn << 64) | change_lsn

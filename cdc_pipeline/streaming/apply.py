"""The foreachBatch writer: one micro-batch of Debezium records -> ClickHouse replica tables + DLQ.

Idempotent for a given batch: rows carry versions from the source position, so if Spark replays a
batch after a crash (written to ClickHouse but not yet committed to the checkpoint) the final state
is the same. Dead letters are at-least-once: a replayed batch may send a bad record twice.

Every record either applies or goes to the dead-letter topic with a reason, whatever its bytes:
a record that is not a Debezium envelope, whose schema or key is malformed or has an unsupported
type, or whose values do not fit their columns. Only ClickHouse errors about a row's own content
dead-letter rows; every other error (connection, timeout, authentication, memory, too many parts,
read-only, a missing table) is retried inside the batch with backoff and, if it persists, fails the
batch without committing it, so no row is skipped.

Unchanged TOASTed columns: PostgreSQL does not log a large value that an UPDATE left alone, and
Debezium sends a placeholder instead. The placeholder never reaches a replica: the value comes from
the change's `before` image (REPLICA IDENTITY FULL), an earlier change to the row in the same batch,
or the replica's current row, in that order; a row whose value is nowhere is dead-lettered.
"""

from __future__ import annotations

import base64
import json
import logging
import struct
import time
from collections import defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
from clickhouse_connect.driver.exceptions import ClickHouseError, DatabaseError, DataError, OperationalError
from pyspark.sql import DataFrame
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_exponential

from cdc_pipeline.config import PipelineConfig, TableConfig
from cdc_pipeline.streaming import columnar
from cdc_pipeline.streaming.aggregates import StreamAggregates
from cdc_pipeline.streaming.batch import (
    ANCHOR_COLUMNS,
    DECODED_COLUMNS,
    Change,
    DecodedBatch,
    SchemaUse,
    anchor_positions,
    changes,
    initial_snapshot_ends,
    interrupted_before,
    positions,
    snapshot_ends,
    snapshot_points,
    unanchored_topics,
)
from cdc_pipeline.streaming.columnar import UNAVAILABLE, Block
from cdc_pipeline.streaming.dlq import DeadLetters
from cdc_pipeline.streaming.envelope import decode_envelope, is_decoded, records_at, schema_from_prefix, version
from cdc_pipeline.streaming.evolution import TypeConversionError
from cdc_pipeline.streaming.sink import ClickHouseSink, ReplicaTable, ReplicaTableMissingError, normalize_key
from cdc_pipeline.streaming.snapshots import SnapshotPointLog
from cdc_pipeline.streaming.types import ColumnSpec, OutOfRange, UnsupportedTypeError, columns_from_schema

if TYPE_CHECKING:
    from cdc_pipeline.streaming.sinks import RoutingSink

log = logging.getLogger(__name__)

# Debezium's `unavailable.value.placeholder` (its default) as it arrives for each kind of column.
_UNAVAILABLE_FORMS: tuple[Any, ...] = (
    UNAVAILABLE,
    base64.b64encode(UNAVAILABLE.encode()).decode(),  # bytea
    [UNAVAILABLE],  # text-like arrays
    [base64.b64encode(UNAVAILABLE.encode()).decode()],
    list(UNAVAILABLE.encode()),  # integer arrays: the placeholder's bytes as numbers
)

# ClickHouse error codes that mean "this data cannot go into this column": the rows are dead-lettered.
# Everything else (including codes not listed) is about the server, the network or the table, and is retried.
CONTENT_ERROR_CODES = frozenset(
    {
        6,  # CANNOT_PARSE_TEXT
        26,  # CANNOT_PARSE_QUOTED_STRING
        27,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
        38,  # CANNOT_PARSE_DATE
        41,  # CANNOT_PARSE_DATETIME
        53,  # TYPE_MISMATCH
        69,  # ARGUMENT_OUT_OF_BOUND
        70,  # CANNOT_CONVERT_TYPE
        72,  # CANNOT_PARSE_NUMBER
        117,  # INCORRECT_DATA
        131,  # TOO_LARGE_STRING_SIZE
        190,  # SIZES_OF_ARRAYS_DONT_MATCH
        321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
        349,  # CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
        407,  # DECIMAL_OVERFLOW
    }
)
# Distinct parsed schemas the writer keeps across batches before it starts over (mutated records can each
# carry a schema of their own).
SCHEMA_CACHE_LIMIT = 10_000
# The replica table (or its database) is gone: forget what is cached about it before trying again.
MISSING_TABLE_CODES = frozenset({60, 81})


def is_content_error(exc: BaseException) -> bool:
    """Whether a failed write was rejected for the data itself (dead-letter it) rather than failing for
    a reason that a retry can outlast (connection, timeout, memory, parts, auth, read-only, missing table)."""
    if isinstance(exc, OperationalError):
        return False
    if isinstance(exc, DataError):
        return True
    if isinstance(exc, DatabaseError):
        return getattr(exc, "code", None) in CONTENT_ERROR_CODES
    if isinstance(exc, ClickHouseError | ReplicaTableMissingError | ConnectionError | TimeoutError | OSError):
        return False
    # clickhouse-connect serializes the columns client-side: a value it cannot encode raises these.
    return isinstance(exc, TypeError | ValueError | OverflowError | struct.error | UnicodeError)


class RowError(ValueError):
    """This change cannot be applied; the message is the dead-letter reason."""


@dataclass
class BatchStats:
    batch_id: int
    applied_rows: int = 0
    deleted_rows: int = 0
    truncates: int = 0
    dlq_count: int = 0
    clamped_values: int = 0
    toast_merged: int = 0
    columnar_rows: int = 0  # rows converted column-wise (streaming/columnar.py); the rest went row by row
    sink_retries: int = 0
    snapshot_repairs: int = 0  # tables swept after an interrupted snapshot (see _after_snapshot_ends)
    latest_source_ts_ms: int | None = None
    tables: dict[str, int] = field(default_factory=dict)
    # Where the batch's time went, in seconds: decode (the Spark job and the Arrow transfer), positions
    # (snapshot points, anchoring), schemas,
    # convert (Python), sink (ClickHouse writes, retries included), dead_letters.
    seconds: dict[str, float] = field(default_factory=dict)

    def timed(self, phase: str, started: float) -> float:
        """Add the time since `started` to `phase`; returns now."""
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - started
        return now

    def saw_source_ts(self, ts_ms: int | None) -> None:
        # A source timestamp is epoch milliseconds; anything else (a mangled record) is not a timestamp.
        if ts_ms is None or not 0 < ts_ms < 253_402_300_800_000:
            return
        if self.latest_source_ts_ms is None or ts_ms > self.latest_source_ts_ms:
            self.latest_source_ts_ms = ts_ms


def _ts(ts_ms: int | None) -> datetime:
    if ts_ms is None or not 0 <= ts_ms < 253_402_300_800_000:
        return datetime.fromtimestamp(0, tz=UTC)
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC)


_UNAVAILABLE_TEXTS = frozenset(form for form in _UNAVAILABLE_FORMS if isinstance(form, str))
_UNAVAILABLE_LISTS = tuple(form for form in _UNAVAILABLE_FORMS if isinstance(form, list))


def _is_unavailable(value: Any) -> bool:
    if isinstance(value, str):
        return value in _UNAVAILABLE_TEXTS
    return value in _UNAVAILABLE_LISTS if isinstance(value, list) else False


@dataclass
class _Schemas:
    """The batch's schemas of one topic: columns per value schema id, key columns per key schema id,
    and for each id the reason it cannot be used (None when it can)."""

    values: dict[int, dict[str, ColumnSpec]] = field(default_factory=dict)
    keys: dict[int, dict[str, ColumnSpec] | None] = field(default_factory=dict)  # None: the key has no schema
    bad: dict[tuple[str, int | None], str] = field(default_factory=dict)
    # Union of the good value schemas' columns: in first-seen order (new columns append), each with the
    # newest schema's spec (a type changed within the batch converts the replica column before the insert).
    columns: list[ColumnSpec] = field(default_factory=list)
    key_columns: list[ColumnSpec] = field(default_factory=list)

    def merge(self, specs: list[ColumnSpec]) -> None:
        position = {c.name: i for i, c in enumerate(self.columns)}
        for spec in specs:
            if spec.name in position:
                self.columns[position[spec.name]] = spec
            else:
                position[spec.name] = len(self.columns)
                self.columns.append(spec)

    def phases(self) -> list[tuple[set[int], dict[str, ColumnSpec]]]:
        """The good value schemas in first-seen order, grouped so that no two schemas of a group give a
        column different ClickHouse types: (schema ids, their columns). A row is written in its own
        schema's types only: the replica's columns take each group's types in turn before its rows are
        written (one group, and no extra DDL, unless a column's type changed within the batch)."""
        groups: list[tuple[set[int], dict[str, ColumnSpec]]] = []
        for vid, specs in self.values.items():
            if groups and all(
                groups[-1][1].get(name, spec).clickhouse_type == spec.clickhouse_type for name, spec in specs.items()
            ):
                groups[-1][0].add(vid)
                groups[-1][1].update(specs)
            else:
                groups.append(({vid}, dict(specs)))
        return groups

    def partial_columns(self) -> set[str]:
        """Columns that some of the batch's schemas lack: rows written from those get the column's
        ClickHouse DEFAULT, which matters when the table is created (see streaming/evolution.py)."""
        names = [set(specs) for specs in self.values.values()]
        return set[str]().union(*names) - names[0].intersection(*names[1:]) if names else set()


@dataclass
class _Converted:
    row: Any
    names: tuple[str, ...]
    values: list[Any]
    key_values: list[Any]
    missing: list[str]  # unchanged TOASTed columns still to be filled

    @property
    def key(self) -> tuple[Any, ...]:
        """The normalized key (see sink.normalize_key): computed only for the rows that need it."""
        return normalize_key(self.key_values)


class ChangeApplier:
    """Callable for `writeStream.foreachBatch`."""

    def __init__(
        self,
        pipeline: PipelineConfig,
        database: str,
        sink: ClickHouseSink | RoutingSink,
        dead_letters: DeadLetters,
        on_batch: Callable[[BatchStats], None] | None = None,
        retry_seconds: float | None = None,
        read_records: Callable[[list[tuple[str, int, int]]], DataFrame] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.database = database
        self.sink = sink
        self.dead_letters = dead_letters
        self.on_batch = on_batch
        self.retry_seconds = pipeline.stream.sink_retry_seconds if retry_seconds is None else retry_seconds
        # Kafka records at these positions, read from Kafka itself (`app.py`): a decoded batch computes its
        # whole decode again for any read, while the records of a new schema or a dead letter are a few.
        self.read_records = read_records
        self._stats = BatchStats(-1)
        self._clamp_context: tuple[ReplicaTable | None, str | None] = (None, None)  # the row being converted
        # Parsed schemas by (topic, schema id), kept across batches: a schema's JSON is read and parsed
        # once, when a record first carries it. A value: columns by name, or the reason it is unusable; a
        # key: its columns, None (a key without a schema) or the reason.
        self._value_schemas: dict[tuple[str, int], dict[str, ColumnSpec] | str] = {}
        self._key_schemas: dict[tuple[str, int], dict[str, ColumnSpec] | str | None] = {}
        self._dead: list[tuple[Change, str]] = []
        # Column types the replica could not convert to in this batch (table, columns) -> the reason.
        self._refused: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        # Aggregates hook (streaming/aggregates.py): no cost for tables without aggregates.
        self.aggregates = StreamAggregates(pipeline, database, sink.client, self._retrying)
        self.snapshot_points = SnapshotPointLog(sink.client, database)
        # topic -> (partition, offset, lsn, taken at a connector start without offsets)
        self._snapshot_ends: dict[str, list[tuple[int, int, int, bool]]] = {}

    def __call__(self, batch: DataFrame, batch_id: int) -> None:
        """Apply one micro-batch: Kafka records, or the streaming query's decoded ones (`decode_envelope` with
        `keep_raw`: the decode is planned once, when the query starts, not for every batch). Spark runs one
        job over it in the usual case: decode every record in one pass and ship a few columns per record (no
        raw bytes) to the driver as Arrow. The batch is read again only for the first record of a schema not
        seen before and for dead letters' raw bytes."""
        stats = self._stats = BatchStats(batch_id)
        self._dead = []
        self._refused = {}
        started = now = time.perf_counter()
        if not is_decoded(batch):  # a replay, or a test: raw Kafka records
            batch = decode_envelope(batch, keep_raw=True)
        table = batch.select(*DECODED_COLUMNS, *ANCHOR_COLUMNS).toArrow()
        # Tombstones carry nothing. Filtered here, not in Spark: a filter would be pushed below the decode and
        # parse every record twice.
        table = table.filter(pc.or_(pc.is_valid(table.column("op")), pc.is_valid(table.column("error"))))
        now = stats.timed("decode", now)
        found = DecodedBatch.of(self._positions(table))
        now = stats.timed("positions", now)
        for record in found.errors:
            self._dead_letter(record, record.error or "invalid record", stats)
        self._apply(batch, found, stats)
        now = time.perf_counter()
        self._send_dead_letters(batch)
        # Dead letters must be durable before Spark commits the batch.
        self.dead_letters.flush()
        stats.timed("dead_letters", now)
        log.info(
            "batch %s: %s record(s), %s applied (%s converted column-wise), %s deleted, %s dead-lettered in %.3fs (%s)",
            batch_id,
            found.records,
            stats.applied_rows,
            stats.columnar_rows,
            stats.deleted_rows,
            stats.dlq_count,
            time.perf_counter() - started,
            ", ".join(f"{phase} {seconds:.3f}s" for phase, seconds in stats.seconds.items()),
        )
        if stats.clamped_values:
            log.warning("batch %s: %s out-of-range value(s) clamped", batch_id, stats.clamped_values)
        if self.on_batch:
            self.on_batch(stats)

    # -- retries -------------------------------------------------------------------------------------------

    def _retrying(self, action: Callable[[], Any], what: str, table: ReplicaTable | None = None) -> Any:
        """Run a ClickHouse action, retrying every error but a content error with backoff for up to
        `retry_seconds`; then the error propagates and the batch fails (Spark does not commit it)."""

        def before_sleep(state: RetryCallState) -> None:
            self._stats.sink_retries += 1
            exc = state.outcome.exception() if state.outcome else None
            if table is not None and (
                isinstance(exc, ReplicaTableMissingError) or getattr(exc, "code", None) in MISSING_TABLE_CODES
            ):
                self.sink.forget(table)
            log.warning(
                "%s failed (attempt %s, retrying for up to %ss): %s",
                what,
                state.attempt_number,
                self.retry_seconds,
                str(exc).splitlines()[0][:300] if exc else "?",
            )

        retrying = Retrying(
            # A conversion ClickHouse cannot do fails the same way every time: its rows are refused at once.
            retry=retry_if_exception(
                lambda exc: not is_content_error(exc) and not isinstance(exc, TypeConversionError)
            ),
            wait=wait_exponential(multiplier=0.5, max=15),
            stop=stop_after_delay(self.retry_seconds),
            before_sleep=before_sleep,
            reraise=True,
        )
        return retrying(action)

    # -- the batch -----------------------------------------------------------------------------------------

    def _positions(self, table: pa.Table) -> pa.Table:
        """Record the batch's snapshot points and anchor its unanchored changes (see envelope.py): the
        batch with final positions, before truncates, ordering and last change per key are decided. The
        recorded points are read back only when the batch holds an unanchored change."""
        snapshots = snapshot_points(table)
        if snapshots:
            self._retrying(lambda: self.snapshot_points.record(snapshots), "recording snapshot points")
        # Ends are recorded before any is acted on: a snapshot that completed earlier in this same batch is
        # not taken for interrupted by the next one.
        ends = snapshot_ends(table)
        if ends:
            self._retrying(lambda: self.snapshot_points.record_ends(ends), "recording snapshot ends")
        self._snapshot_ends = {}
        initial = initial_snapshot_ends(table)
        for topic, partition, offset, lsn in ends:
            taken_at_start = (topic, partition, lsn) in initial
            self._snapshot_ends.setdefault(topic, []).append((partition, offset, lsn, taken_at_start))
        unanchored = unanchored_topics(table)
        if unanchored:
            points = self._retrying(lambda: self.snapshot_points.read(unanchored), "reading snapshot points")
            if points:
                log.info("anchoring the first transaction after a connector start in %s to %s", unanchored, points)
                table = anchor_positions(table, points)
        return table

    def _send_dead_letters(self, batch: DataFrame) -> None:
        """Produce the batch's dead letters with their original key and value, read back from the batch by
        position (one Spark job, only when there are any)."""
        if not self._dead:
            return
        raw = {
            (row.topic, row.partition, row.offset): (row.key, row.value)
            for row in self._records_at(batch, positions(record for record, _ in self._dead))
        }
        for record, reason in self._dead:
            key, value = raw.get((record.topic, record.partition, record.offset), (None, None))
            self.dead_letters.send(key, value, reason, record.topic, record.partition, record.offset)
        self._dead = []

    def _records_at(self, batch: DataFrame, wanted: list[tuple[str, int, int]]) -> list[Any]:
        """The raw records of the (decoded) batch at these positions (see `envelope.records_at`)."""
        source = self.read_records(wanted) if self.read_records is not None else batch
        return records_at(source, wanted).collect()

    def _schemas(self, batch: DataFrame, found: DecodedBatch) -> dict[str, _Schemas]:
        uses = [u for u in found.schema_uses if self.pipeline.table_for_topic(u.topic) is not None]

        def unknown(use: SchemaUse) -> bool:
            value_known = (use.topic, use.value_schema_id) in self._value_schemas
            return not value_known or (use.topic, use.key_schema_id) not in self._key_schemas

        texts: dict[tuple[str, int, int], Any] = {}
        if any(unknown(u) for u in uses):
            if len(self._value_schemas) + len(self._key_schemas) > SCHEMA_CACHE_LIMIT:
                self._value_schemas.clear()
                self._key_schemas.clear()
            for row in self._records_at(batch, positions(u for u in uses if unknown(u))):
                texts[(row.topic, row.partition, row.offset)] = row
        by_topic: dict[str, _Schemas] = defaultdict(_Schemas)
        for use in uses:
            table_config = self.pipeline.table_for_topic(use.topic)
            assert table_config is not None
            schemas = by_topic[use.topic]
            vid, kid = use.value_schema_id, use.key_schema_id
            if unknown(use):
                raw = texts.get((use.topic, use.partition, use.offset))
                if raw is None:  # cannot happen: the record is in the batch. Not cached: the next batch retries.
                    schemas.bad[("value", vid)] = "the record's schema could not be read back from the batch"
                    continue
                self._value_schemas.setdefault((use.topic, vid), self._value_specs(raw, table_config))
                self._key_schemas.setdefault((use.topic, kid), _key_specs(raw.key_schema))
            if vid not in schemas.values and ("value", vid) not in schemas.bad:
                value_specs = self._value_schemas[(use.topic, vid)]
                if isinstance(value_specs, str):
                    schemas.bad[("value", vid)] = value_specs
                else:
                    schemas.values[vid] = value_specs
                    schemas.merge(list(value_specs.values()))
            if kid not in schemas.keys and ("key", kid) not in schemas.bad:
                key_specs = self._key_schemas[(use.topic, kid)]
                if isinstance(key_specs, str):
                    schemas.bad[("key", kid)] = key_specs
                else:
                    # None: a key without a schema. Its columns convert with the value schema's (the after
                    # struct has every column), and the replica's key comes from other records or primary_key.
                    schemas.keys[kid] = key_specs
                    if key_specs and not schemas.key_columns:
                        schemas.key_columns = list(key_specs.values())
        return by_topic

    def _value_specs(self, raw: Any, table_config: TableConfig) -> dict[str, ColumnSpec] | str:
        """A value schema's columns by name, or the reason it cannot be used, from the first record that
        carries it (a row of `records_at`)."""
        try:
            if raw is not None and raw.value_prefix is not None:
                try:
                    schema = schema_from_prefix(raw.value_prefix)
                except ValueError:
                    raise RowError(
                        'the value is not laid out as Kafka Connect\'s JsonConverter writes it ({"schema":...,'
                        '"payload":...} with no "payload" key inside the schema)'
                    ) from None
                if not isinstance(schema, dict):
                    raise RowError(f"the value schema is not a JSON object but {type(schema).__name__}")
            else:
                schema = _json_object(raw.value_schema if raw is not None else None, "value schema")
            specs = columns_from_schema(schema, self._policy(table_config), self._on_clamp)
        except (UnsupportedTypeError, RowError) as exc:
            return f"unusable value schema: {exc}"
        return {spec.name: spec for spec in specs}

    def _policy(self, table: TableConfig) -> Callable[[str], OutOfRange]:
        default = self.pipeline.sink.clickhouse.out_of_range
        overrides = table.out_of_range or {}
        return lambda column: overrides.get(column, default)

    def _on_clamp(self, column: str, value: Any) -> None:
        self._stats.clamped_values += 1
        if self._stats.clamped_values <= 20:
            table, key_json = self._clamp_context
            log.warning(
                "clamped out-of-range value %r of column %r (%s key %s)",
                value,
                column,
                table.qualified if table else "?",
                str(key_json)[:200],
            )

    def _apply(self, batch: DataFrame, found: DecodedBatch, stats: BatchStats) -> None:
        now = time.perf_counter()
        schemas = self._schemas(batch, found)
        stats.timed("schemas", now)
        truncates = {topic: version(*position) for topic, position in found.truncates.items()}
        latest = found.latest_tables()

        for topic in sorted(set(latest) | set(truncates)):
            table_config = self.pipeline.table_for_topic(topic)
            if table_config is None:
                log.warning("ignoring records of unconfigured topic %s", topic)
                continue
            topic_schemas = schemas[topic]
            columns = list(topic_schemas.columns)
            names = {c.name for c in columns}
            columns += [c for c in topic_schemas.key_columns if c.name not in names]
            keys = tuple(c.name for c in topic_schemas.key_columns) or tuple(table_config.primary_key or ())
            sink_name = self.pipeline.sink_table(table_config)
            if not keys:
                # Only schema-less keys in this batch (e.g. records produced by hand): the replica's own key.
                keys = self._retrying(
                    lambda n=sink_name: self.sink.existing_key(self.database, n),
                    f"reading the key of {self.database}.{sink_name}",
                    ReplicaTable(self.database, sink_name, ()),
                )
            table = ReplicaTable(self.database, sink_name, keys, table_config.partition_by, table_config.name)
            if columns and keys:
                # The columns of the first schema group with rows to write (see _Schemas.phases): a batch
                # holding a type change converts the replica once, after the older schema's rows.
                rows = latest.get(topic)
                written = set() if rows is None else set(_written_schemas(rows))
                phases = [specs for vids, specs in topic_schemas.phases() if vids & written]
                first = _phase_columns(columns, phases[0]) if phases else columns
                self._ensure_columns(table, first, topic_schemas.partial_columns())  # refused: see _write_rows
            if topic in truncates:
                self.aggregates.before_truncate(table)  # aggregates hook
                done = self._retrying(
                    lambda t=table, v=truncates[topic]: self.sink.truncate(t, v, _ts(None)),
                    f"truncating {table.qualified}",
                    table,
                )
                stats.truncates += 1 if done else 0
            self._write_rows(found, topic, table, columns, topic_schemas, latest.get(topic), stats)
            self._after_snapshot_ends(topic, table, stats)

    def _after_snapshot_ends(self, topic: str, table: ReplicaTable, stats: BatchStats) -> None:
        """A table snapshot completed in this batch after an earlier snapshot of the topic, and rows the source
        deleted between the two may be in no record (see streaming/snapshots.py): the earlier snapshot was
        interrupted (Kafka Connect killed mid-snapshot), or this one is an initial snapshot (the connector
        started without offsets, e.g. killed before it flushed them, and streams only what follows this
        snapshot). Every replica row older than this snapshot (it rewrote every row it read) is marked
        deleted as of it. A blocking snapshot after a complete one removes nothing (it may carry a filter,
        and streaming went on around it)."""
        for partition, offset, lsn, initial in self._snapshot_ends.get(topic, []):
            starts, ended = self._retrying(
                lambda p=partition: self.snapshot_points.history(topic, p), "reading snapshot history"
            )
            first = min((start for start, start_lsn in starts if start_lsn == lsn), default=offset)
            previous = interrupted_before(starts, ended, first, initial=initial)
            if previous is None:
                continue
            why = (
                f"the snapshot at LSN {previous} before it was interrupted"
                if previous not in ended
                else "the connector took it when it started without offsets"
            )
            log.warning(
                "%s: snapshot at LSN %s completed and %s; marking deleted every row of %s older than it (rows "
                "deleted in the source between the two snapshots)",
                topic, lsn, why, table.qualified,
            )  # fmt: skip
            self.aggregates.before_truncate(table)  # aggregates hook: every window is recomputed
            row_version = version(lsn, 0)
            done = self._retrying(
                lambda v=row_version: self.sink.truncate(table, v, _ts(None)),
                f"removing rows older than the snapshot at LSN {lsn} from {table.qualified}",
                table,
            )
            self.aggregates.after_write(table)
            stats.snapshot_repairs += 1 if done else 0

    # -- rows ----------------------------------------------------------------------------------------------

    def _write_rows(
        self,
        found: DecodedBatch,
        topic: str,
        table: ReplicaTable,
        columns: list[ColumnSpec],
        schemas: _Schemas,
        latest: pa.Table | None,
        stats: BatchStats,
    ) -> None:
        """Write the topic's last change per key: column-wise where streaming/columnar.py can convert them
        exactly, row by row (below) for the rest."""
        started = time.perf_counter()
        blocks, left = self._columnar(table, schemas, latest, stats) if latest is not None else ([], None)
        rows: list[Any] = changes(left) if left is not None else []
        converted: list[_Converted] = []
        retry_keys: dict[str, set[int]] = {}  # key_json -> offsets already dead-lettered
        for row in rows:
            try:
                converted.append(self._convert(row, table, schemas))
            except RowError as exc:
                self._dead_letter(row, str(exc), stats)
                retry_keys[row.key_json] = {row.offset}
        stats.timed("convert", started)

        pending = [c for c in converted if c.missing]
        history: dict[str, list[Any]] = {}
        if retry_keys or pending:
            history = found.history(topic, {*retry_keys, *(c.row.key_json for c in pending)})

        # A dead-lettered change falls back to the newest older change of its row in this batch that applies.
        for key_json, dead in retry_keys.items():
            for older in history.get(key_json, []):
                if older.offset in dead:
                    continue
                try:
                    attempt = self._convert(older, table, schemas)
                except RowError as exc:
                    self._dead_letter(older, str(exc), stats)
                    dead.add(older.offset)
                    continue
                converted.append(attempt)
                if attempt.missing:
                    pending.append(attempt)
                break

        self._fill_unavailable(table, schemas, pending, history, stats)
        phases = schemas.phases()
        phase_of = {vid: index for index, (vids, _) in enumerate(phases) for vid in vids}
        # Per schema group (in order), per column list: the rows to upsert.
        upserts: list[dict[tuple[str, ...], list[tuple[Any, list[Any]]]]] = [defaultdict(list) for _ in phases]
        deletes: list[tuple[Any, list[Any]]] = []
        fast: list[list[Block]] = [[] for _ in phases]
        for block in blocks:
            fast[phase_of[block.value_schema_id]].append(block)
        for change in converted:
            if change.missing:
                continue  # dead-lettered by _fill_unavailable
            if change.row.op == "d":
                deletes.append((change.row, change.values))
            else:
                upserts[phase_of[change.row.value_schema_id]][change.names].append((change.row, change.values))
        # Aggregates hook: the windows these rows are in before the write (see streaming/aggregates.py).
        self.aggregates.before_write(table, [c.key for c in converted if not c.missing])
        known = {c.name for c in columns}
        for (_, specs), groups, phase_blocks in zip(phases, upserts, fast, strict=True):
            if not groups and not phase_blocks:
                continue
            phase_columns = _phase_columns(columns, specs)
            # Each row in its own schema's types: the replica's columns take this group's types first (a
            # no-op unless a type changed within the batch; then ClickHouse converts the rows before).
            if refused := self._ensure_columns(table, phase_columns):
                for group in groups.values():
                    for row, _ in group:
                        self._dead_letter(row, f"schema change refused: {refused}", stats)
                for block in phase_blocks:
                    for row in changes(block.rows):
                        self._dead_letter(row, f"schema change refused: {refused}", stats)
                continue
            for block in phase_blocks:
                stats.applied_rows += self._insert_block(table, phase_columns, schemas, block, stats)
            for names, group in groups.items():
                if set(names) - known:  # cannot happen: every converted row's schema is in `columns`
                    raise RuntimeError(
                        f"{table.qualified}: columns {sorted(set(names) - known)} have no replica column"
                    )
                stats.applied_rows += self._insert(
                    table, phase_columns, lambda values, n=names: self.sink.upsert(table, n, values), group, stats
                )
                for row, _ in group:
                    stats.saw_source_ts(row.source_ts_ms)
        # Deletion markers hold the key only: the other columns stay as the last group left them.
        key_columns = [c for c in columns if c.name in table.key_columns]
        if deletes and (refused := self._ensure_columns(table, key_columns)):
            for row, _ in deletes:
                self._dead_letter(row, f"schema change refused: {refused}", stats)
            deletes = []
        stats.deleted_rows += self._insert(
            table, key_columns, lambda values: self.sink.delete(table, values), deletes, stats
        )
        for row, _ in deletes:
            stats.saw_source_ts(row.source_ts_ms)
        self.aggregates.after_write(table)  # aggregates hook: recompute the windows the rows were and are in
        stats.tables[table.name] = stats.tables.get(table.name, 0) + len(rows) + sum(len(b) for b in blocks)

    def _columnar(
        self, table: ReplicaTable, schemas: _Schemas, rows: pa.Table, stats: BatchStats
    ) -> tuple[list[Block], pa.Table]:
        """Convert what streaming/columnar.py can of the rows (row changes of schemas the row path would
        accept as they are), one block per (value schema, key schema); the rows left for the row path."""
        if not table.key_columns or self.aggregates.covers(table) or rows.num_rows == 0:
            return [], rows  # aggregates need every row's key (before_write); the row path gives them
        candidate = pc.is_in(rows.column("op"), pa.array(["c", "r", "u"]))
        pairs = rows.filter(candidate).group_by(["value_schema_id", "key_schema_id"]).aggregate([])
        blocks: list[Block] = []
        left = [rows.filter(pc.invert(candidate))]
        for vid, kid in zip(
            pairs.column("value_schema_id").to_pylist(), pairs.column("key_schema_id").to_pylist(), strict=True
        ):
            mask = pc.and_(
                candidate,
                pc.and_(pc.equal(rows.column("value_schema_id"), vid), pc.equal(rows.column("key_schema_id"), kid)),
            )
            group = rows.filter(pc.fill_null(mask, False))
            value_specs, key_specs = schemas.values.get(vid), schemas.keys.get(kid)
            usable = (
                ("value", vid) not in schemas.bad
                and ("key", kid) not in schemas.bad
                and value_specs is not None
                and key_specs is not None
                and set(key_specs) == set(table.key_columns)
                and columnar.supports(value_specs)
                and columnar.supports(key_specs)
            )
            if not usable:
                left.append(group)
                continue
            # clickhouse-connect's own forms only for ClickHouse alone: the warehouse (RoutingSink) writes
            # date, datetime and UUID objects.
            native = isinstance(self.sink, ClickHouseSink)
            block, rest = columnar.convert(group, value_specs, key_specs, native=native)  # type: ignore[arg-type]
            if block is not None:
                blocks.append(block)
                stats.columnar_rows += len(block)
            left.append(rest)
        # Rows with a null schema id (none is valid) are in no pair: keep them for the row path too.
        nulls = rows.filter(
            pc.and_(
                candidate, pc.or_(pc.is_null(rows.column("value_schema_id")), pc.is_null(rows.column("key_schema_id")))
            )
        )
        return blocks, pa.concat_tables([*left, nulls])

    def _insert_block(
        self, table: ReplicaTable, columns: list[ColumnSpec], schemas: _Schemas, block: Block, stats: BatchStats
    ) -> int:
        """Insert a block converted column-wise. When ClickHouse refuses a value (a content error), the
        block's rows are converted and inserted by the row path, which isolates and dead-letters them."""
        values = block.values()

        def attempt() -> int:
            started = time.perf_counter()
            try:
                self.sink.ensure_table(table, columns)  # cached: no round trip unless the table changed or vanished
                return self.sink.upsert(table, block.names, values)
            finally:
                stats.timed("sink", started)

        try:
            written = self._retrying(attempt, f"writing {len(values)} row(s) to {table.qualified}", table)
        except Exception as exc:
            if not is_content_error(exc):
                raise
            log.warning(
                "%s: ClickHouse refused a value of a %s-row block; inserting its rows one group at a time to find it",
                table.qualified, len(values),
            )  # fmt: skip
            groups: dict[tuple[str, ...], list[tuple[Any, list[Any]]]] = defaultdict(list)
            for row in changes(block.rows):
                try:
                    change = self._convert(row, table, schemas)
                except RowError as error:
                    self._dead_letter(row, str(error), stats)
                    continue
                groups[change.names].append((change.row, change.values))
            written = sum(
                self._insert(table, columns, lambda v, n=names: self.sink.upsert(table, n, v), group, stats)
                for names, group in groups.items()
            )
        stats.saw_source_ts(block.latest_source_ts_ms)
        return int(written)

    def _ensure_columns(
        self, table: ReplicaTable, columns: list[ColumnSpec], partial: Collection[str] = ()
    ) -> str | None:
        """Make the replica's columns these (create, add, convert); the reason when ClickHouse cannot convert
        a column's values to its new type (the column keeps its type; asked once per batch)."""
        wanted = (table.qualified, tuple((c.name, c.clickhouse_type) for c in columns))
        if wanted in self._refused:
            return self._refused[wanted]
        try:
            self._retrying(
                lambda: self.sink.ensure_table(table, columns, partial),
                f"changing the columns of {table.qualified}",
                table,
            )
        except TypeConversionError as exc:
            log.error("%s", exc)
            self._refused[wanted] = str(exc)
            return str(exc)
        return None

    def _convert(self, row: Any, table: ReplicaTable, schemas: _Schemas) -> _Converted:
        """The row's values for the replica (with META_COLUMNS), or RowError with the dead-letter reason."""
        if reason := schemas.bad.get(("value", row.value_schema_id)) or schemas.bad.get(("key", row.key_schema_id)):
            raise RowError(reason)
        value_specs = schemas.values.get(row.value_schema_id)
        if value_specs is None or row.key_schema_id not in schemas.keys:
            raise RowError("the record's schema could not be read")
        if not table.key_columns:
            raise RowError("the table has no key: neither the record key nor primary_key in pipeline.yaml names one")
        key_specs = schemas.keys[row.key_schema_id]
        if key_specs is None:
            if not set(table.key_columns) <= set(value_specs):
                raise RowError(f"the key has no schema and the value schema lacks key columns {table.key_columns}")
            key_specs = {name: value_specs[name] for name in table.key_columns}
        self._clamp_context = (table, row.key_json)
        meta = [version(row.commit_lsn, row.change_lsn), 1 if row.op == "d" else 0, _ts(row.source_ts_ms)]
        key_payload = _json_object(row.key_json, "key payload")
        if set(key_payload) != set(key_specs):
            raise RowError(
                f"the key payload's fields {sorted(key_payload)} do not match its schema {sorted(key_specs)}"
            )
        if set(key_specs) != set(table.key_columns):
            raise RowError(f"the key columns {sorted(key_specs)} are not the replica's key {list(table.key_columns)}")
        key = [_convert_value(key_specs, name, key_payload[name]) for name in table.key_columns]
        if row.op == "d":
            return _Converted(row, table.key_columns, key + meta, key, [])
        after = _json_object(row.after_json, "after image")
        if after.keys() != value_specs.keys():
            missing, extra = sorted(set(value_specs) - set(after)), sorted(set(after) - set(value_specs))
            raise RowError(f"the after image does not match its schema (missing {missing}, not in schema {extra})")
        names = tuple(after)
        values: list[Any] = []
        missing_columns: list[str] = []
        update = row.op == "u"
        before: dict[str, Any] | None = None
        for name, value in after.items():
            if update and _is_unavailable(value):
                if before is None:  # parsed only for a row with a placeholder
                    before = _json_object(row.before_json, "before image") if row.before_json else {}
                if name in before and not _is_unavailable(before[name]):
                    value = before[name]  # REPLICA IDENTITY FULL: the old image holds the unchanged value
                else:
                    missing_columns.append(name)
                    values.append(None)
                    continue
            try:
                values.append(value_specs[name].convert(value))
            except Exception as exc:  # any value, whatever its JSON type, either converts or dead-letters its row
                raise RowError(f"conversion failed: column {name!r}: {exc}") from None
        return _Converted(row, names, values + meta, key, missing_columns)

    def _fill_unavailable(
        self,
        table: ReplicaTable,
        schemas: _Schemas,
        pending: list[_Converted],
        history: dict[str, list[Any]],
        stats: BatchStats,
    ) -> None:
        """Fill unchanged TOASTed columns from earlier changes in the batch, then from the replica."""
        from_replica: list[_Converted] = []
        for change in pending:
            for older in history.get(change.row.key_json, []):
                if not change.missing:
                    break
                if _position(older) >= _position(change.row):
                    continue
                if older.op == "d":
                    break  # the row did not exist before this point of the batch
                try:
                    image = _json_object(older.after_json, "after image")
                    specs = schemas.values.get(older.value_schema_id) or {}
                    own = schemas.values.get(change.row.value_schema_id) or {}
                    for name in list(change.missing):
                        same_type = (
                            name in specs and name in own and specs[name].clickhouse_type == own[name].clickhouse_type
                        )
                        if name in image and same_type and not _is_unavailable(image[name]):
                            change.values[change.names.index(name)] = _convert_value(specs, name, image[name])
                            change.missing.remove(name)
                except RowError:
                    continue  # an unusable older change: look further back, then in the replica
            if change.missing:
                from_replica.append(change)
            else:
                stats.toast_merged += 1
        if not from_replica:
            return
        columns = sorted({name for change in from_replica for name in change.missing})
        current = self._retrying(
            lambda: self.sink.current_rows(table, [list(c.key) for c in from_replica], columns),
            f"reading unchanged TOASTed values of {table.qualified}",
            table,
        )
        for change in from_replica:
            live = current.get(change.key)
            if live is None:
                self._dead_letter(
                    change.row,
                    f"unchanged TOASTed column(s) {change.missing}: Debezium sent no value and the replica has no "
                    "live row to take it from (the row is missing from the replica); backfill the table to repair it, "
                    "or set REPLICA IDENTITY FULL on the source table so updates carry every value",
                    stats,
                )
                continue
            for name in change.missing:
                spec = (schemas.values.get(change.row.value_schema_id) or {}).get(name)
                change.values[change.names.index(name)] = _from_replica(live[name], spec)
            change.missing = []
            stats.toast_merged += 1

    def _insert(
        self,
        table: ReplicaTable,
        columns: list[ColumnSpec],
        write: Callable[[list[list[Any]]], int],
        group: list[tuple[Any, list[Any]]],
        stats: BatchStats,
    ) -> int:
        """Columnar insert of the group. Errors about the data isolate the bad rows (halving) and
        dead-letter them; every other error is retried, then fails the batch."""
        if not group:
            return 0

        def attempt() -> int:
            started = time.perf_counter()
            try:
                self.sink.ensure_table(table, columns)  # cached: no round trip unless the table changed or vanished
                return write([values for _, values in group])
            finally:
                stats.timed("sink", started)

        try:
            return self._retrying(attempt, f"writing {len(group)} row(s) to {table.qualified}", table)
        except Exception as exc:
            if not is_content_error(exc):
                raise
            if len(group) == 1:
                self._dead_letter(group[0][0], f"ClickHouse rejected the row: {str(exc).splitlines()[0][:500]}", stats)
                return 0
            middle = len(group) // 2
            return self._insert(table, columns, write, group[:middle], stats) + self._insert(
                table, columns, write, group[middle:], stats
            )

    def _dead_letter(self, record: Change, reason: str, stats: BatchStats) -> None:
        """Dead-letter the record: sent with its raw bytes at the end of the batch (see _send_dead_letters)."""
        self._dead.append((record, reason))
        stats.dlq_count += 1


def _written_schemas(rows: pa.Table) -> list[int]:
    """The value schema ids of the rows that write values (every op but d)."""
    written = rows.filter(pc.fill_null(pc.not_equal(rows.column("op"), "d"), True))
    return [v for v in pc.unique(written.column("value_schema_id")).to_pylist() if v is not None]


def _key_specs(text: str | None) -> dict[str, ColumnSpec] | str | None:
    """A key schema's columns by name, None for a key without a schema, or the reason it cannot be used."""
    if text is None:
        return None
    try:
        key_schema = _json_object(text, "key schema")
        if key_schema.get("type") != "struct":
            raise RowError(f"the key schema is a {key_schema.get('type')!r}, not a struct")
        # A key schema is a struct like `after`: wrapping it lets the same mapping convert key values.
        specs = columns_from_schema({"fields": [{**key_schema, "field": "after"}]})
        if not specs:
            raise RowError("the key schema has no fields")
    except (UnsupportedTypeError, RowError) as exc:
        return f"unusable key schema: {exc}"
    return {spec.name: spec for spec in specs}


def _phase_columns(columns: list[ColumnSpec], specs: dict[str, ColumnSpec]) -> list[ColumnSpec]:
    """The batch's columns with the types of one schema group (see _Schemas.phases)."""
    return [specs.get(c.name, c) for c in columns]


def _position(row: Any) -> tuple[int, int, int, int]:
    return (row.commit_lsn, row.change_lsn, row.partition, row.offset)


def _json_object(text: str | None, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text is not None else None
    except (TypeError, ValueError) as exc:
        raise RowError(f"the {what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise RowError(f"the {what} is not a JSON object but {type(value).__name__}")
    return value


def _convert_value(specs: dict[str, ColumnSpec], name: str, value: Any) -> Any:
    spec = specs.get(name)
    if spec is None:
        raise RowError(f"column {name!r} has no schema in this record")
    try:
        return spec.convert(value)
    except Exception as exc:  # any value, whatever its JSON type, either converts or dead-letters its row
        raise RowError(f"conversion failed: column {name!r}: {exc}") from None


def _from_replica(value: Any, spec: ColumnSpec | None) -> Any:
    """A value read back from the replica (strings as bytes) in the form the column's converter gives:
    bytes for bytea, str for every other String column (PostgreSQL text is valid UTF-8)."""
    if spec is not None and spec.binary:
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, list):
        return [_from_replica(v, spec) for v in value]
    return value

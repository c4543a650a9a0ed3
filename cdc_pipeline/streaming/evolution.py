"""Schema evolution of the replica tables: what the sink does when a table's change events carry a
column the replica lacks, or a column whose type changed, so that the replica never silently differs
from rows that PostgreSQL changed without a change event.

PostgreSQL changes existing rows without writing change events in these cases:
- `ADD COLUMN c ... DEFAULT <non-volatile expression>`: existing rows read the value the default had
  when the column was added (stored once as the column's "missing value", `pg_attribute.attmissingval`);
  for a constant that is the default itself, for `now()` it is the time of the ALTER;
- `ADD COLUMN` with a volatile default (`clock_timestamp()`, `gen_random_uuid()`) or a STORED generated
  column: the table is rewritten and every row gets its own value;
- `ALTER COLUMN ... TYPE` (with or without `USING`): every row is rewritten in the new type.
The stream learns about such a change from the first change event of the table whose schema shows it.
For a column new to the replica, PostgreSQL's catalog decides (`plan_new_column`):
- the rows' missing value equals the default in Debezium's schema (a constant default): the ClickHouse
  column gets that value as its DEFAULT, which ClickHouse serves for every row written before; exact at
  once, nothing re-read;
- no default and not generated: existing rows are NULL in PostgreSQL too; nothing more to do;
- anything else: the column is added and the table is re-read through a Debezium incremental snapshot
  (the same signal the backfill job sends), whose rows are newer than everything streamed before.
For a column whose ClickHouse type changed (`plan_type_change`), the column is converted in place
(`MODIFY COLUMN`, synchronously) and the table is re-read, since a `USING` expression may have changed
values. If ClickHouse cannot convert the data the column keeps its type (`TypeConversionError`) and the
stream dead-letters the rows that need the new type, with a reason naming the fix; it never writes them
in the old type.

Every decision is recorded in `<database>._cdc_schema_changes`; a re-snapshot is requested once per
change (a replayed batch finds it there), before the DDL, so a crash in between cannot lose it.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any

from clickhouse_connect.driver.binding import format_query_value, quote_identifier
from clickhouse_connect.driver.client import Client

from cdc_pipeline.config import PipelineConfig, TableConfig
from cdc_pipeline.streaming.types import ColumnSpec

log = logging.getLogger(__name__)

SCHEMA_CHANGES_TABLE = "_cdc_schema_changes"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class SchemaChangeError(RuntimeError):
    """A source schema change the replica cannot follow by itself; the message names the table,
    the column and the fix."""


class TypeConversionError(SchemaChangeError):
    """ClickHouse cannot convert a replica column's values to a column type the change events now give
    (the column was put back as it was). Deterministic: retrying cannot help, and the stream refuses the
    rows that need the new type (dead letters naming the fix) instead of writing them in the old one."""


# --- pure decision logic -------------------------------------------------------------------------


class Action(StrEnum):
    DEFAULT = "default"  # ADD COLUMN ... DEFAULT <the rows' value>
    PLAIN = "plain"  # ADD COLUMN; existing rows are NULL (or the type's default) in the source too
    RESNAPSHOT = "resnapshot"  # ADD COLUMN, then re-read the table
    MODIFY = "modify"  # MODIFY COLUMN to the new type (re-read the table if the values may have changed)


@dataclass(frozen=True)
class SourceColumn:
    """What PostgreSQL's catalog says about a column now."""

    exists: bool
    type_sql: str = ""  # format_type(atttypid, atttypmod)
    generated: bool = False  # attgenerated: a STORED generated column
    has_missing: bool = False  # atthasmissing: rows older than the column read `missing_text`
    missing_text: str | None = None  # that value in PostgreSQL's text form
    default_sql: str | None = None  # pg_get_expr of the column default; None: no default
    default_is_null: bool = False  # the default is the NULL constant
    # Whether Debezium's default, converted, is exactly the missing value (None: not compared).
    default_matches_missing: bool | None = None


@dataclass(frozen=True)
class ColumnPlan:
    column: str
    action: Action
    reason: str
    default_sql: str | None = None  # the ClickHouse DEFAULT expression, for Action.DEFAULT


@dataclass(frozen=True)
class TypeChange:
    column: str
    old_type: str
    new_type: str  # what the column becomes
    resnapshot: bool
    reason: str


def plan_new_column(spec: ColumnSpec, source: SourceColumn | None) -> ColumnPlan:
    """How to add a column that the replica lacks, given what PostgreSQL says about it now."""
    name = spec.name
    if source is None:
        return ColumnPlan(
            name, Action.PLAIN, "PostgreSQL's catalog is not available to the stream: rows written before read NULL"
        )
    if not source.exists:
        return ColumnPlan(name, Action.PLAIN, "the column is no longer in PostgreSQL (dropped since)")
    if source.generated:
        return ColumnPlan(
            name, Action.RESNAPSHOT, "a STORED generated column: PostgreSQL computed it for every row, without events"
        )
    if source.has_missing:
        if source.default_matches_missing:
            value = _converted_default(spec)
            if value is None:
                return ColumnPlan(name, Action.PLAIN, "existing rows read NULL in PostgreSQL too")
            try:
                literal = clickhouse_literal(value, spec.clickhouse_type)
            except TypeError as exc:
                return ColumnPlan(
                    name, Action.RESNAPSHOT, f"the default cannot be written as a ClickHouse DEFAULT ({exc})"
                )
            return ColumnPlan(
                name,
                Action.DEFAULT,
                f"constant default {source.default_sql}: existing rows read {source.missing_text!r} in PostgreSQL",
                literal,
            )
        return ColumnPlan(
            name,
            Action.RESNAPSHOT,
            f"existing rows read {source.missing_text!r} (default {source.default_sql} evaluated when the column was "
            f"added), which Debezium's schema does not carry (its default: {spec.default!r})",
        )
    if source.default_sql is None or source.default_is_null:
        return ColumnPlan(name, Action.PLAIN, "no default: existing rows are NULL in PostgreSQL too")
    return ColumnPlan(
        name,
        Action.RESNAPSHOT,
        f"default {source.default_sql} without a stored missing value: a volatile default gave every existing row its "
        "own value (a table rewrite), or the default was set after the column was added",
    )


def _converted_default(spec: ColumnSpec) -> Any:
    return spec.convert(spec.default) if spec.has_default else None


def _strip_wrapper(text: str, wrapper: str) -> str:
    """`text` with every `wrapper(...)` replaced by its argument."""
    opening = wrapper + "("
    while (start := text.find(opening)) >= 0:
        depth, end = 0, start + len(opening) - 1
        for end in range(start + len(opening) - 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        text = text[:start] + text[start + len(opening) : end] + text[end + 1 :]
    return text


def normalize_type(ch_type: str) -> str:
    """A ClickHouse type in one form for comparison: no spaces, no LowCardinality (an encoding)."""
    return _strip_wrapper("".join(ch_type.split()), "LowCardinality")


def split_nullable(ch_type: str) -> tuple[str, bool]:
    """(normalized type without a top-level Nullable, whether it was Nullable)."""
    normal = normalize_type(ch_type)
    if normal.startswith("Nullable(") and normal.endswith(")"):
        return normal[len("Nullable(") : -1], True
    return normal, False


def with_nullable(ch_type: str) -> str:
    """`ch_type` able to hold NULL (arrays cannot be Nullable in ClickHouse; they stay as they are)."""
    if ch_type.startswith(("Nullable(", "Array(")) or ch_type.startswith("LowCardinality(Nullable("):
        return ch_type
    if ch_type.startswith("LowCardinality("):
        return f"LowCardinality(Nullable({ch_type[len('LowCardinality(') : -1]}))"
    return f"Nullable({ch_type})"


def plan_type_change(column: str, replica_type: str, incoming_type: str) -> TypeChange | None:
    """What to do when the change events' type of `column` is `incoming_type` and the replica's is
    `replica_type`; None when nothing changes. Types are compared as ClickHouse types, normalized, so
    different Debezium parameters for one column (unconstrained numeric says length 0 in snapshot events
    and 131089 in streamed ones) are no change. A column that became NOT NULL stays Nullable in the
    replica (deletion markers hold NULL there); one that became nullable becomes Nullable."""
    old_base, old_nullable = split_nullable(replica_type)
    new_base, new_nullable = split_nullable(incoming_type)
    if old_base == new_base:
        if new_nullable and not old_nullable:
            return TypeChange(column, replica_type, incoming_type, False, "the column became nullable")
        return None
    target = incoming_type if new_nullable or not old_nullable else with_nullable(incoming_type)
    return TypeChange(
        column,
        replica_type,
        target,
        True,
        f"the column's type changed from {replica_type} to {incoming_type}: PostgreSQL rewrote every row "
        "(with a USING expression values may differ), without change events",
    )


def clickhouse_literal(value: Any, ch_type: str) -> str:
    """A ClickHouse expression of type `ch_type` for a converted value (what the column's converter
    returns); TypeError for values it cannot render."""
    return f"CAST({_literal(value)}, {format_query_value(ch_type)})"


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format_query_value(repr(value))  # 'nan', 'inf' and exact digits, parsed by the CAST
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise TypeError(f"naive datetime {value!r}")
        return f"fromUnixTimestamp64Micro({(value - _EPOCH) // timedelta(microseconds=1)}, 'UTC')"
    if isinstance(value, date):
        return format_query_value(value.isoformat())
    if isinstance(value, timedelta):
        micros = value // timedelta(microseconds=1)
        if not 0 <= micros <= 86_400_000_000:
            raise TypeError(f"time of day {value!r} out of range")
        seconds, micros = divmod(micros, 1_000_000)
        return format_query_value(f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}.{micros:06d}")
    if isinstance(value, bytes):
        return f"unhex({format_query_value(value.hex())})"
    if isinstance(value, str | Decimal | uuid.UUID):
        return format_query_value(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    raise TypeError(f"no ClickHouse literal for {type(value).__name__}")


def partial_columns(value_schemas: Iterable[dict[str, Any]]) -> set[str]:
    """Columns of the `after` struct that some of these envelope schemas lack: rows written from those
    schemas get the column's ClickHouse DEFAULT, so it matters when a table is created from them."""
    names: list[set[Any]] = []
    for schema in value_schemas:
        after = next((f for f in schema.get("fields", []) if isinstance(f, dict) and f.get("field") == "after"), {})
        names.append({f.get("field") for f in after.get("fields", []) if isinstance(f, dict)})
    if not names:
        return set()
    return set[Any]().union(*names) - names[0].intersection(*names[1:])


# --- PostgreSQL: the catalog and re-snapshot signals ------------------------------------------------

_CATALOG_SQL = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attgenerated <> '', a.atthasmissing,
       (a.attmissingval::text::text[])[1], pg_get_expr(d.adbin, d.adrelid),
       coalesce(d.adbin::text LIKE '{CONST %%:constisnull true%%', false)
FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped AND a.attname = ANY(%s)
"""


class SourceCatalog:
    """The stream's access to PostgreSQL (CDC_POSTGRES_*): what a column is now, and re-snapshot
    signals. Used only when a schema changes, with a connection of its own each time."""

    def __init__(self, pipeline: PipelineConfig, conninfo: Callable[[], str], lock_timeout: float = 60.0) -> None:
        self.pipeline = pipeline
        self.conninfo = conninfo
        self.lock_timeout = lock_timeout

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.conninfo(), autocommit=True, connect_timeout=30)

    def columns(self, table: TableConfig, specs: Sequence[ColumnSpec]) -> dict[str, SourceColumn]:
        """What PostgreSQL says about each of `specs`' columns of `table`, compared with Debezium's default."""
        import psycopg
        from psycopg import sql

        with self._connect() as conn:
            conn.execute("SET TIME ZONE 'UTC'")  # a timestamp default is compared as UTC, as the converter reads it
            regclass = sql.Identifier(table.schema_name, table.table_name).as_string(conn)
            rows = conn.execute(_CATALOG_SQL, (regclass, [s.name for s in specs])).fetchall()
            found = {row[0]: row for row in rows}
            result: dict[str, SourceColumn] = {}
            for spec in specs:
                row = found.get(spec.name)
                if row is None:
                    result[spec.name] = SourceColumn(exists=False)
                    continue
                _, type_sql, generated, has_missing, missing_text, default_sql, default_is_null = row
                matches = None
                if has_missing and spec.has_default:
                    try:
                        value = _converted_default(spec)
                        rendered = conn.execute(
                            sql.SQL("SELECT (%s::{})::text").format(sql.SQL(type_sql)), (value,)
                        ).fetchone()[0]
                        matches = rendered == missing_text
                    except (ValueError, TypeError, psycopg.Error) as exc:
                        log.info("column %s.%s: Debezium's default %r is not comparable: %s", table.name, spec.name,
                                 spec.default, exc)  # fmt: skip
                        matches = False
                result[spec.name] = SourceColumn(
                    True, type_sql, generated, has_missing, missing_text, default_sql, default_is_null, matches
                )
            return result

    def request_resnapshot(self, table: TableConfig) -> str:
        """Signal a Debezium incremental snapshot of `table`; returns the signal id. Takes the pipeline's
        signal lock for a moment, so a backfill job waiting for Debezium to take its own signal is not
        merged with this one (see control/backfill.py); after `lock_timeout` it signals anyway."""
        from cdc_pipeline.control.source import SignalLock, request_incremental_snapshot

        with self._connect() as conn:
            lock = SignalLock(conn, self.pipeline.name)
            if not lock.wait(self.lock_timeout):
                log.warning(
                    "a backfill's signal was not taken by Debezium in %.0f s; signalling the re-snapshot of %s anyway "
                    "(that backfill may report a timeout: run it again)",
                    self.lock_timeout,
                    table.name,
                )
            try:
                return request_incremental_snapshot(conn, self.pipeline, table, id_prefix="schema-change")
            finally:
                lock.release()


# --- ClickHouse: the record of schema changes ----------------------------------------------------------

SCHEMA_CHANGE_COLUMNS = (
    "recorded_at", "replica_table", "source_table", "column", "change", "old_type", "new_type", "action",
    "signal_id", "reason",
)  # fmt: skip


def schema_changes_table_sql(database: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {quote_identifier(database)}.{SCHEMA_CHANGES_TABLE} (\n"
        "  recorded_at DateTime64(3, 'UTC'), replica_table String, source_table String, column String,\n"
        "  change LowCardinality(String), old_type String, new_type String, action LowCardinality(String),\n"
        "  signal_id String, reason String\n"
        ") ENGINE = MergeTree ORDER BY (replica_table, recorded_at)"
    )


@dataclass(frozen=True)
class ChangeRecord:
    replica_table: str
    source_table: str
    column: str
    change: str  # add_column | type_change
    old_type: str
    new_type: str
    action: str
    reason: str
    signal_id: str = ""


class SchemaEvolution:
    """The sink's helper for schema changes: asks PostgreSQL, requests re-snapshots, keeps the record."""

    def __init__(self, pipeline: PipelineConfig, catalog: SourceCatalog | None) -> None:
        self.pipeline = pipeline
        self.catalog = catalog
        self._ready: set[str] = set()

    @classmethod
    def from_settings(cls, pipeline: PipelineConfig, settings: Any) -> SchemaEvolution:
        return cls(pipeline, SourceCatalog(pipeline, settings.postgres_conninfo))

    def _table_config(self, source: str | None) -> TableConfig | None:
        if source is None:
            return None
        with contextlib.suppress(KeyError):
            return self.pipeline.table(source)
        return None

    def plan_new_columns(self, source: str | None, specs: Sequence[ColumnSpec]) -> list[ColumnPlan]:
        table = self._table_config(source)
        if not specs:
            return []
        if table is None or self.catalog is None:
            return [plan_new_column(spec, None) for spec in specs]
        try:
            facts = self.catalog.columns(table, specs)
        except Exception as exc:
            names = ", ".join(s.name for s in specs)
            raise SchemaChangeError(
                f"new column(s) {names} of {table.name}: cannot read PostgreSQL's catalog to learn what existing rows "
                f"hold ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}). The stream stops rather than "
                "leave the replica different from the source: make PostgreSQL reachable from the stream "
                "(CDC_POSTGRES_DSN, CDC_POSTGRES_PASSWORD) and restart it"
            ) from exc
        return [plan_new_column(spec, facts[spec.name]) for spec in specs]

    def _ensure_log(self, client: Client, database: str) -> None:
        if database not in self._ready:
            client.command(schema_changes_table_sql(database))
            self._ready.add(database)

    def record(self, client: Client, database: str, records: Sequence[ChangeRecord]) -> None:
        if not records:
            return
        self._ensure_log(client, database)
        now = datetime.now(UTC)
        rows = [
            [now, r.replica_table, r.source_table, r.column, r.change, r.old_type, r.new_type, r.action, r.signal_id,
             r.reason]
            for r in records
        ]  # fmt: skip
        client.insert(f"{quote_identifier(database)}.{SCHEMA_CHANGES_TABLE}", rows, column_names=SCHEMA_CHANGE_COLUMNS)

    def _already_signalled(self, client: Client, database: str, record: ChangeRecord) -> str | None:
        """The signal id if the latest record of this column is this very change with a re-snapshot (a
        replayed batch, or a restart after a failure); None otherwise."""
        self._ensure_log(client, database)
        rows = client.query(
            f"SELECT change, new_type, signal_id FROM {quote_identifier(database)}.{SCHEMA_CHANGES_TABLE} "
            "WHERE replica_table = {t:String} AND column = {c:String} ORDER BY recorded_at DESC LIMIT 1",
            parameters={"t": record.replica_table, "c": record.column},
        ).result_rows
        if rows and rows[0][0] == record.change and rows[0][1] == record.new_type and rows[0][2]:
            return rows[0][2]
        return None

    def resnapshot(self, client: Client, database: str, records: Sequence[ChangeRecord]) -> list[ChangeRecord]:
        """Request one re-snapshot of the table for `records` (changes that need one), unless each was
        requested before (a replayed batch); record them, and return them with the signal id."""
        if not records:
            return []
        table = self._table_config(records[0].source_table or None)
        known = {r: self._already_signalled(client, database, r) for r in records}
        if all(known.values()):
            return [_with_signal(r, known[r] or "") for r in records]
        if table is None or self.catalog is None:
            for record in records:
                log.error(
                    "schema change on %s.%s (%s) needs a re-snapshot, but the stream cannot signal one: run the "
                    "backfill_table job for this table",
                    database, record.replica_table, record.reason,
                )  # fmt: skip
            return list(records)
        try:
            signal_id = self.catalog.request_resnapshot(table)
        except Exception as exc:
            raise SchemaChangeError(
                f"{table.name}: {records[0].reason}; the table must be re-read, but the re-snapshot signal could not "
                f"be written to {self.pipeline.source.signal_table} ({str(exc).splitlines()[0]}). Make PostgreSQL "
                "reachable from the stream and restart it, or run the backfill_table job for this table"
            ) from exc
        done = [_with_signal(r, known[r] or signal_id) for r in records]
        for record in done:
            log.warning(
                "schema change on %s: column %s: %s -> re-snapshot of %s requested (signal %s)",
                table.name, record.column, record.reason, table.name, record.signal_id,
            )  # fmt: skip
        self.record(client, database, done)
        return done


def _with_signal(record: ChangeRecord, signal_id: str) -> ChangeRecord:
    return ChangeRecord(**{**record.__dict__, "signal_id": signal_id})

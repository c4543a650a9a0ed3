"""The ClickHouse replica tables: DDL from the stream's own schemas, and idempotent columnar writes.

Every replica table is `ReplacingMergeTree(_version, _is_deleted)` ordered by the primary key.
`_version` comes from the source position (see `envelope.version`), so re-applying any batch, in any
order, can never bring back an older row; deletes are rows with `_is_deleted = 1`, which
`SELECT ... FINAL` hides.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from clickhouse_connect.driver.binding import format_query_value, quote_identifier
from clickhouse_connect.driver.client import Client

from cdc_pipeline.contract import CLICKHOUSE_ENGINE, CLICKHOUSE_META_COLUMNS, DELETED, LIVE_ROWS, META_NAMES, VERSION
from cdc_pipeline.streaming.evolution import (
    Action,
    ChangeRecord,
    ColumnPlan,
    SchemaEvolution,
    TypeChange,
    TypeConversionError,
    plan_new_column,
    plan_type_change,
)
from cdc_pipeline.streaming.types import ColumnSpec

log = logging.getLogger(__name__)

# Bookkeeping columns every replica table has, after the source's own columns (cdc_pipeline/contract.py).
META_COLUMNS = CLICKHOUSE_META_COLUMNS
# Every replica table the stream has created or written to, per database: a registered table that is
# missing was dropped or detached behind the stream's back, and is reported instead of recreated empty.
REGISTRY_TABLE = "_cdc_replica_tables"


class ReplicaTableMissingError(RuntimeError):
    """A replica table the stream wrote to before no longer exists (dropped or detached)."""


def registry_sql(database: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {quote_identifier(database)}.{REGISTRY_TABLE} "
        "(table String, registered_at DateTime64(3, 'UTC')) ENGINE = ReplacingMergeTree ORDER BY table"
    )


@dataclass(frozen=True)
class ReplicaTable:
    database: str
    name: str
    key_columns: tuple[str, ...]
    partition_by: str | None = None
    source: str | None = None  # the source table as named in pipeline.yaml (schema evolution asks PostgreSQL)

    @property
    def qualified(self) -> str:
        return f"{quote_identifier(self.database)}.{quote_identifier(self.name)}"


def _column_sql(column: ColumnSpec, default: str | None = None) -> str:
    return f"{quote_identifier(column.name)} {column.clickhouse_type}" + (f" DEFAULT {default}" if default else "")


def create_table_sql(
    table: ReplicaTable, columns: Sequence[ColumnSpec], defaults: Mapping[str, str] | None = None
) -> str:
    """CREATE TABLE IF NOT EXISTS for a replica table with `columns` from the source schema, and
    ClickHouse DEFAULT expressions by column name."""
    by_name = {c.name: c for c in columns}
    missing = [k for k in table.key_columns if k not in by_name]
    if missing:
        raise ValueError(f"{table.name}: key column(s) {missing} are not in the change events' schema")
    definitions = [_column_sql(c, (defaults or {}).get(c.name)) for c in columns]
    definitions += [f"{quote_identifier(name)} {ch_type}" for name, ch_type in META_COLUMNS]
    order_by = ", ".join(quote_identifier(k) for k in table.key_columns)
    nullable_key = any(by_name[k].clickhouse_type.startswith("Nullable(") for k in table.key_columns)
    sql = (
        f"CREATE TABLE IF NOT EXISTS {table.qualified} (\n  "
        + ",\n  ".join(definitions)
        + f"\n) ENGINE = {CLICKHOUSE_ENGINE}\n"
    )
    if table.partition_by:
        sql += f"PARTITION BY {table.partition_by}\n"
    sql += f"ORDER BY ({order_by})"
    if nullable_key:
        sql += "\nSETTINGS allow_nullable_key = 1"
    return sql


class ClickHouseSink:
    """Writes one micro-batch's changes to the replica tables (columnar inserts, never row by row).

    With a `SchemaEvolution` (the stream and replay jobs have one), new columns and type changes follow
    PostgreSQL exactly (see streaming/evolution.py); without one, new columns are added without a
    default and type changes are converted in place without a re-snapshot."""

    def __init__(self, client: Client, evolution: SchemaEvolution | None = None) -> None:
        self.client = client
        self.evolution = evolution
        # Per table: source column name -> ClickHouse type, as last read from system.columns.
        self._known: dict[str, dict[str, str]] = {}
        self._registries: set[str] = set()

    def forget(self, table: ReplicaTable) -> None:
        """Drop what is cached about `table` (after an error that says it changed or vanished)."""
        self._known.pop(table.qualified, None)

    def _registry(self, database: str) -> str:
        qualified = f"{quote_identifier(database)}.{REGISTRY_TABLE}"
        if database not in self._registries:
            self.client.command(registry_sql(database))
            self._registries.add(database)
        return qualified

    def _registered(self, table: ReplicaTable) -> bool:
        registry = self._registry(table.database)
        found = self.client.query(
            f"SELECT count() FROM {registry} WHERE table = {{t:String}}", parameters={"t": table.name}
        ).result_rows
        return bool(found and found[0][0])

    def _register(self, table: ReplicaTable) -> None:
        registry = self._registry(table.database)
        self.client.insert(registry, [[table.name, datetime.now(UTC)]], column_names=["table", "registered_at"])

    def existing_column_types(self, table: ReplicaTable) -> dict[str, str]:
        """Column name -> type in table order (empty if the table does not exist)."""
        rows = self.client.query(
            "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = {t:String} "
            "ORDER BY position",
            parameters={"db": table.database, "t": table.name},
        ).result_rows
        return {row[0]: row[1] for row in rows}

    def existing_key(self, database: str, name: str) -> tuple[str, ...]:
        """The sorting key of an existing replica table, column by column (empty if the table does not
        exist or its key is not a plain list of columns)."""
        rows = self.client.query(
            "SELECT sorting_key FROM system.tables WHERE database = {db:String} AND name = {t:String}",
            parameters={"db": database, "t": name},
        ).result_rows
        if not rows:
            return ()
        columns = set(self.existing_columns(ReplicaTable(database, name, ())))
        key = split_identifiers(rows[0][0])
        return key if key and set(key) <= columns else ()

    def existing_columns(self, table: ReplicaTable) -> list[str]:
        """Column names in table order (empty if the table does not exist)."""
        return list(self.existing_column_types(table))

    def ensure_table(
        self, table: ReplicaTable, columns: Sequence[ColumnSpec], partial: Collection[str] = ()
    ) -> list[str]:
        """Create the table, add the columns it lacks and convert columns whose type changed (schema
        evolution). `partial`: columns that some rows of this batch are written without (their schema
        predates the column), which matters when the table is created. Returns the DDL it ran.

        Costs no query when every column is known with an unchanged type (the usual batch)."""
        known = self._known.get(table.qualified)
        if known is not None and all(
            c.name in known and plan_type_change(c.name, known[c.name], c.clickhouse_type) is None for c in columns
        ):
            return []
        existing = self.existing_column_types(table)
        if not existing:
            if self._registered(table):
                raise ReplicaTableMissingError(
                    f"replica table {table.qualified} was dropped or detached behind the stream's back; the stream "
                    "will not recreate it empty and write around the rows it held. If it was detached, ATTACH it "
                    f"again. To rebuild it on purpose: drop it, run `ALTER TABLE {quote_identifier(table.database)}"
                    f".{REGISTRY_TABLE} DELETE WHERE table = '{table.name}'`, restart the stream and backfill the "
                    "table (backfill_table job)."
                )
            ran = self._create(table, columns, partial)
        else:
            source_columns = [name for name in existing if name not in META_NAMES]
            new = [c for c in columns if c.name not in existing]
            changes = [
                change
                for c in columns
                if c.name in existing and (change := plan_type_change(c.name, existing[c.name], c.clickhouse_type))
            ]
            ran = self._evolve(table, source_columns, new, changes) if new or changes else []
        if known is None:
            self._register(table)
        self._known[table.qualified] = {
            n: t for n, t in self.existing_column_types(table).items() if n not in META_NAMES
        }
        return ran

    def _plans(self, table: ReplicaTable, columns: Sequence[ColumnSpec]) -> list[ColumnPlan]:
        if self.evolution is None:
            return [plan_new_column(c, None) for c in columns]
        return self.evolution.plan_new_columns(table.source, columns)

    @staticmethod
    def _added(table: ReplicaTable, plans: list[ColumnPlan], specs: Mapping[str, ColumnSpec], resnapshot: bool):  # noqa: ANN205
        return [
            ChangeRecord(table.name, table.source or "", p.column, "add_column", "", specs[p.column].clickhouse_type,
                         p.action, p.reason)
            for p in plans
            if (p.action is Action.RESNAPSHOT) == resnapshot
        ]  # fmt: skip

    @staticmethod
    def _converted(table: ReplicaTable, changes: list[TypeChange], resnapshot: bool) -> list[ChangeRecord]:
        return [
            ChangeRecord(table.name, table.source or "", c.column, "type_change", c.old_type, c.new_type, Action.MODIFY,
                         c.reason)
            for c in changes
            if c.resnapshot == resnapshot
        ]  # fmt: skip

    def _resnapshot(self, table: ReplicaTable, records: list[ChangeRecord]) -> None:
        if not records:
            return
        if self.evolution is None:
            for record in records:
                log.error(
                    "schema change on %s, column %s: %s. Run the backfill_table job for this table: the sink has no "
                    "access to PostgreSQL to request a re-snapshot", table.qualified, record.column, record.reason,
                )  # fmt: skip
            return
        self.evolution.resnapshot(self.client, table.database, records)

    def _log_changes(self, table: ReplicaTable, records: list[ChangeRecord]) -> None:
        for record in records:
            log.warning(
                "schema change on %s, column %s: %s (%s)", table.qualified, record.column, record.action, record.reason
            )
        if self.evolution is not None:
            self.evolution.record(self.client, table.database, records)

    def _create(self, table: ReplicaTable, columns: Sequence[ColumnSpec], partial: Collection[str]) -> list[str]:
        # Rows of this batch whose schema predates a column get its DEFAULT: plan those columns like added ones.
        plans = self._plans(table, [c for c in columns if c.name in partial])
        specs = {c.name: c for c in columns}
        self._resnapshot(table, self._added(table, plans, specs, True))
        ddl = create_table_sql(table, columns, {p.column: p.default_sql for p in plans if p.default_sql})
        self.client.command(ddl)
        self._log_changes(table, self._added(table, plans, specs, False))
        return [ddl]

    def _evolve(
        self, table: ReplicaTable, source_columns: list[str], new: list[ColumnSpec], changes: list[TypeChange]
    ) -> list[str]:
        plans = self._plans(table, new)
        specs = {c.name: c for c in new}
        # The re-snapshot is requested before the DDL: a crash in between repeats the request (harmless,
        # and deduplicated through the record), where the other order could lose it.
        self._resnapshot(table, self._added(table, plans, specs, True) + self._converted(table, changes, True))
        ran: list[str] = []
        for plan in plans:
            # New source column, kept before the bookkeeping columns; rows written before it read its DEFAULT
            # (the value PostgreSQL gives them, see evolution.py), else NULL / the type's default.
            definition = _column_sql(specs[plan.column], plan.default_sql)
            ddl = (
                f"ALTER TABLE {table.qualified} ADD COLUMN IF NOT EXISTS {definition} "
                f"AFTER {quote_identifier(source_columns[-1])}"
            )
            self.client.command(ddl)
            ran.append(ddl)
            source_columns.append(plan.column)
        for change in changes:
            ran.append(self._modify(table, change))
        self._log_changes(table, self._added(table, plans, specs, False) + self._converted(table, changes, False))
        return ran

    def _modify(self, table: ReplicaTable, change: TypeChange) -> str:
        """Convert the column in place, synchronously (ClickHouse rewrites the data before the next insert).
        A key column cannot change type in place (ClickHouse forbids it): the table is rebuilt instead."""
        keys = self.client.query(
            "SELECT is_in_sorting_key OR is_in_partition_key FROM system.columns "
            "WHERE database = {db:String} AND table = {t:String} AND name = {c:String}",
            parameters={"db": table.database, "t": table.name, "c": change.column},
        ).result_rows
        if keys and keys[0][0]:
            return self._rebuild(table, change)
        if change.new_type.startswith("Nullable("):
            # ClickHouse turns a value it cannot parse into NULL when the new type is Nullable: a conversion
            # that would empty live values is refused rather than lose them silently.
            column = quote_identifier(change.column)
            lost = self.client.command(
                f"SELECT count() FROM {table.qualified} FINAL WHERE {LIVE_ROWS} AND {column} IS NOT NULL "
                f"AND CAST({column}, {format_query_value(change.new_type)}) IS NULL"
            )
            if lost:
                raise self._conversion_failed(table, change, ValueError(f"{lost} live value(s) would become NULL"))
        ddl = f"ALTER TABLE {table.qualified} MODIFY COLUMN {quote_identifier(change.column)} {change.new_type}"
        try:
            self.client.command(ddl, settings={"mutations_sync": 2})
        except Exception as exc:
            # A failed conversion leaves the new type in the metadata and a mutation that fails forever, which
            # makes the table unreadable: stop the mutation and put the old type back.
            with contextlib.suppress(Exception):
                self.client.command(
                    "KILL MUTATION WHERE database = {db:String} AND table = {t:String} AND NOT is_done",
                    parameters={"db": table.database, "t": table.name},
                )
                self.client.command(
                    f"ALTER TABLE {table.qualified} MODIFY COLUMN {quote_identifier(change.column)} {change.old_type}",
                    settings={"mutations_sync": 2},
                )
            raise self._conversion_failed(table, change, exc) from exc
        return ddl

    def _rebuild(self, table: ReplicaTable, change: TypeChange) -> str:
        """Copy the table into one with the new column type (every row version, converted by the INSERT),
        then swap the two atomically. On failure the replica table is left as it was."""
        scratch = ReplicaTable(table.database, f"{table.name}__cdc_rebuild", table.key_columns)
        columns = self.client.query(
            "SELECT name, type, default_kind, default_expression FROM system.columns "
            "WHERE database = {db:String} AND table = {t:String} ORDER BY position",
            parameters={"db": table.database, "t": table.name},
        ).result_rows
        sorting_key, partition_key, settings = self.client.query(
            "SELECT sorting_key, partition_key, engine_full LIKE '%allow_nullable_key = 1%' FROM system.tables "
            "WHERE database = {db:String} AND name = {t:String}",
            parameters={"db": table.database, "t": table.name},
        ).result_rows[0]
        definitions = [
            f"{quote_identifier(name)} {change.new_type if name == change.column else ch_type}"
            + (f" {kind} {expression}" if kind else "")
            for name, ch_type, kind, expression in columns
        ]
        nullable_key = settings or change.new_type.startswith("Nullable(")
        ddl = (
            f"CREATE TABLE {scratch.qualified} (\n  "
            + ",\n  ".join(definitions)
            + f"\n) ENGINE = {CLICKHOUSE_ENGINE}\n"
            + (f"PARTITION BY {partition_key}\n" if partition_key else "")
            + (f"ORDER BY {sorting_key}" if sorting_key.startswith("(") else f"ORDER BY ({sorting_key})")
            + ("\nSETTINGS allow_nullable_key = 1" if nullable_key else "")
        )
        self.client.command(f"DROP TABLE IF EXISTS {scratch.qualified}")
        self.client.command(ddl)
        try:
            self.client.command(f"INSERT INTO {scratch.qualified} SELECT * FROM {table.qualified}")
        except Exception as exc:
            with contextlib.suppress(Exception):
                self.client.command(f"DROP TABLE IF EXISTS {scratch.qualified}")
            raise self._conversion_failed(table, change, exc) from exc
        self.client.command(f"EXCHANGE TABLES {table.qualified} AND {scratch.qualified}")
        self.client.command(f"DROP TABLE {scratch.qualified}")
        log.warning("rebuilt %s with key column %s as %s", table.qualified, change.column, change.new_type)
        return ddl

    def _conversion_failed(self, table: ReplicaTable, change: TypeChange, exc: Exception) -> TypeConversionError:
        return TypeConversionError(
            f"{table.qualified}: column {change.column!r} changed type in {table.source or 'the source'} from "
            f"{change.old_type} to {change.new_type}, and ClickHouse cannot convert the replica's values "
            f"({str(exc).splitlines()[0][:300]}); the column keeps its type, and rows that need the new one are "
            "dead-lettered rather than written in the old type. To fix: drop "
            f"the replica table (DROP TABLE {table.qualified}) and restart the stream; "
            + (
                "a re-snapshot of the table has been requested and re-reads every row (if it already passed, "
                "run the backfill_table job)"
                if self.evolution is not None
                else "then run the backfill_table job for the table"
            )
        )

    def current_rows(
        self, table: ReplicaTable, keys: Sequence[Sequence[Any]], columns: Sequence[str]
    ) -> dict[tuple[Any, ...], dict[str, Any]]:
        """The live (FINAL, not deleted) values of `columns` for the rows with these key values, by
        normalized key (see `normalize_key`); keys without a live row are absent. Strings come back as
        bytes (bytea replicas hold arbitrary bytes), times as aware UTC datetimes: both insert as-is."""
        if not keys or not columns:
            return {}
        key_list = ", ".join(quote_identifier(k) for k in table.key_columns)
        wanted = ", ".join(
            str(format_query_value(tuple(key) if len(table.key_columns) > 1 else key[0])) for key in keys
        )
        selected = ", ".join(quote_identifier(c) for c in [*table.key_columns, *columns])
        key_expr = f"({key_list})" if len(table.key_columns) > 1 else key_list
        result = self.client.query(
            f"SELECT {selected} FROM {table.qualified} FINAL WHERE {key_expr} IN ({wanted}) AND {LIVE_ROWS}",
            query_formats={"String": "bytes", "FixedString": "bytes"},
            query_tz="UTC",
        )
        width = len(table.key_columns)
        return {
            normalize_key(row[:width]): {name: _as_utc(v) for name, v in zip(columns, row[width:], strict=True)}
            for row in result.result_rows
        }

    def upsert(self, table: ReplicaTable, column_names: Sequence[str], rows: Sequence[Sequence[Any]]) -> int:
        """Insert new row states; each row ends with the META_COLUMNS values."""
        if not rows:
            return 0
        self._insert_columns(table, [*column_names, *META_NAMES], rows)
        return len(rows)

    def delete(self, table: ReplicaTable, key_rows: Sequence[Sequence[Any]]) -> int:
        """Insert deletion markers: key values + (_version, 1, _source_ts); other columns take defaults."""
        if not key_rows:
            return 0
        self._insert_columns(table, [*table.key_columns, *META_NAMES], key_rows)
        return len(key_rows)

    def _insert_columns(self, table: ReplicaTable, names: list[str], rows: Sequence[Sequence[Any]]) -> None:
        # Column-oriented: one transpose here instead of clickhouse-connect's row-by-row walk.
        columns = [list(column) for column in zip(*rows, strict=True)]
        self.client.insert(table.qualified, columns, column_names=names, column_oriented=True)

    def truncate(self, table: ReplicaTable, row_version: int, source_ts: Any) -> bool:
        """Mark every live row deleted as of `row_version`; newer rows (higher versions) are unaffected.
        Returns False when the table does not exist yet (nothing was replicated, nothing to delete)."""
        # The table's own ORDER BY columns: a truncate-only batch carries no key schema.
        found = self.client.query(
            "SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String} "
            "AND is_in_sorting_key ORDER BY position",
            parameters={"db": table.database, "t": table.name},
        ).result_rows
        if not found:
            return False
        keys = ", ".join(quote_identifier(row[0]) for row in found)
        self.client.command(
            f"INSERT INTO {table.qualified} ({keys}, {', '.join(META_NAMES)}) "
            f"SELECT {keys}, toUInt128({{v:String}}), {DELETED}, {{ts:DateTime64(3, 'UTC')}} "
            f"FROM {table.qualified} FINAL WHERE {VERSION} < toUInt128({{v:String}})",
            parameters={"v": str(row_version), "ts": source_ts},
        )
        return True


def split_identifiers(text: str) -> tuple[str, ...]:
    """`a, `b,c`, "d"` as ClickHouse formats a key expression -> ("a", "b,c", "d"); () if it is not a plain
    list of identifiers (an expression such as `toDate(ts)`)."""
    text = text.strip()
    if text.startswith("(") and text.endswith(")"):  # `ORDER BY (id)` may read back as `(id)`
        return split_identifiers(text[1:-1])
    names: list[str] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] == " ":
            i += 1
        if i < n and text[i] in '`"':
            quote, i, name = text[i], i + 1, []
            while i < n and text[i] != quote:
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                name.append(text[i])
                i += 1
            if i >= n:
                return ()
            i += 1
            names.append("".join(name))
        else:
            start = i
            while i < n and text[i] not in ", ":
                i += 1
            token = text[start:i]
            if (
                not token
                or not (token[0].isalpha() or token[0] == "_")
                or not all(c.isalnum() or c == "_" for c in token)
            ):
                return ()
            names.append(token)
        while i < n and text[i] == " ":
            i += 1
        if i < n:
            if text[i] != ",":
                return ()
            i += 1
    return tuple(names)


def normalize_key(values: Sequence[Any]) -> tuple[Any, ...]:
    """A key tuple comparable between converted change values and values read back from ClickHouse."""
    return tuple(_normalize(value) for value in values)


def _normalize(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, Mapping):
        return tuple(sorted(value.items()))
    if isinstance(value, list):
        return tuple(_normalize(v) for v in value)
    return value


def _as_utc(value: Any) -> Any:
    # Replica timestamps are UTC; a naive datetime would be read as local time by the insert.
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    if isinstance(value, list):
        return [_as_utc(v) for v in value]
    return value

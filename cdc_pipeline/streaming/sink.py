"""The ClickHouse replica tables: DDL from the stream's own schemas, and idempotent columnar writes.

Every replica table is `ReplacingMergeTree(_version, _is_deleted)` ordered by the primary key.
`_version` comes from the source position (see `envelope.version`), so re-applying any batch, in any
order, can never bring back an older row; deletes are rows with `_is_deleted = 1`, which
`SELECT ... FINAL` hides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from clickhouse_connect.driver.binding import format_query_value, quote_identifier
from clickhouse_connect.driver.client import Client

from cdc_pipeline.streaming.types import ColumnSpec

# Bookkeeping columns every replica table has, after the source's own columns.
META_COLUMNS = (
    ("_version", "UInt128"),
    ("_is_deleted", "UInt8"),
    ("_source_ts", "DateTime64(3, 'UTC')"),
)
META_NAMES = tuple(name for name, _ in META_COLUMNS)
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

    @property
    def qualified(self) -> str:
        return f"{quote_identifier(self.database)}.{quote_identifier(self.name)}"


def create_table_sql(table: ReplicaTable, columns: Sequence[ColumnSpec]) -> str:
    """CREATE TABLE IF NOT EXISTS for a replica table with `columns` from the source schema."""
    by_name = {c.name: c for c in columns}
    missing = [k for k in table.key_columns if k not in by_name]
    if missing:
        raise ValueError(f"{table.name}: key column(s) {missing} are not in the change events' schema")
    definitions = [f"{quote_identifier(c.name)} {c.clickhouse_type}" for c in columns]
    definitions += [f"{quote_identifier(name)} {ch_type}" for name, ch_type in META_COLUMNS]
    order_by = ", ".join(quote_identifier(k) for k in table.key_columns)
    nullable_key = any(by_name[k].clickhouse_type.startswith("Nullable(") for k in table.key_columns)
    sql = (
        f"CREATE TABLE IF NOT EXISTS {table.qualified} (\n  "
        + ",\n  ".join(definitions)
        + "\n) ENGINE = ReplacingMergeTree(_version, _is_deleted)\n"
    )
    if table.partition_by:
        sql += f"PARTITION BY {table.partition_by}\n"
    sql += f"ORDER BY ({order_by})"
    if nullable_key:
        sql += "\nSETTINGS allow_nullable_key = 1"
    return sql


class ClickHouseSink:
    """Writes one micro-batch's changes to the replica tables (columnar inserts, never row by row)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._known_columns: dict[str, set[str]] = {}
        self._registries: set[str] = set()

    def forget(self, table: ReplicaTable) -> None:
        """Drop what is cached about `table` (after an error that says it changed or vanished)."""
        self._known_columns.pop(table.qualified, None)

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

    def existing_columns(self, table: ReplicaTable) -> list[str]:
        """Column names in table order (empty if the table does not exist)."""
        rows = self.client.query(
            "SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String} ORDER BY position",
            parameters={"db": table.database, "t": table.name},
        ).result_rows
        return [row[0] for row in rows]

    def ensure_table(self, table: ReplicaTable, columns: Sequence[ColumnSpec]) -> list[str]:
        """Create the table, or add the columns it lacks (schema evolution). Returns the DDL it ran."""
        known = self._known_columns.get(table.qualified)
        wanted = [c for c in columns if known is None or c.name not in known]
        if known is not None and not wanted:
            return []
        ran: list[str] = []
        existing = self.existing_columns(table)
        if not existing:
            if self._registered(table):
                raise ReplicaTableMissingError(
                    f"replica table {table.qualified} was dropped or detached behind the stream's back; the stream "
                    "will not recreate it empty and write around the rows it held. If it was detached, ATTACH it "
                    f"again. To rebuild it on purpose: drop it, run `ALTER TABLE {quote_identifier(table.database)}"
                    f".{REGISTRY_TABLE} DELETE WHERE table = '{table.name}'`, restart the stream and backfill the "
                    "table (backfill_table job)."
                )
            ddl = create_table_sql(table, columns)
            self.client.command(ddl)
            ran.append(ddl)
            existing = self.existing_columns(table)
        if known is None:
            self._register(table)
        source_columns = [name for name in existing if name not in META_NAMES]
        for column in columns:
            if column.name not in source_columns:
                # New source column, kept before the bookkeeping columns; rows written before it read the
                # type's default (NULL when Nullable) until they change again.
                ddl = (
                    f"ALTER TABLE {table.qualified} ADD COLUMN IF NOT EXISTS "
                    f"{quote_identifier(column.name)} {column.clickhouse_type} "
                    f"AFTER {quote_identifier(source_columns[-1])}"
                )
                self.client.command(ddl)
                ran.append(ddl)
                source_columns.append(column.name)
        self._known_columns[table.qualified] = set(source_columns)
        return ran

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
            f"SELECT {selected} FROM {table.qualified} FINAL WHERE {key_expr} IN ({wanted}) AND _is_deleted = 0",
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
        self.client.insert(table.qualified, list(rows), column_names=[*column_names, *META_NAMES])
        return len(rows)

    def delete(self, table: ReplicaTable, key_rows: Sequence[Sequence[Any]]) -> int:
        """Insert deletion markers: key values + (_version, 1, _source_ts); other columns take defaults."""
        if not key_rows:
            return 0
        self.client.insert(table.qualified, list(key_rows), column_names=[*table.key_columns, *META_NAMES])
        return len(key_rows)

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
            f"INSERT INTO {table.qualified} ({keys}, _version, _is_deleted, _source_ts) "
            f"SELECT {keys}, toUInt128({{v:String}}), 1, {{ts:DateTime64(3, 'UTC')}} "
            f"FROM {table.qualified} FINAL WHERE _version < toUInt128({{v:String}})",
            parameters={"v": str(row_version), "ts": source_ts},
        )
        return True


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

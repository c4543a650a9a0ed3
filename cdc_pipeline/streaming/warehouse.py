"""The PostgreSQL warehouse sink: the same replica contract as the ClickHouse tables, in a PostgreSQL
database that is not the source (a warehouse).

Every warehouse table has the source's columns plus the bookkeeping columns `_version` (numeric(39,0),
the source position, see `envelope.version`), `_is_deleted` (smallint) and `_source_ts` (timestamptz),
and a PRIMARY KEY on the source key. A batch is written with `COPY` into a temporary staging table and
one `INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE stored._version < EXCLUDED._version`: the stored
version decides, so a replayed or late change never regresses a row. Deletes and truncates keep a
tombstone (`_is_deleted = 1` with the delete's version) so that an older change arriving later cannot
bring the row back; the live rows are `WHERE _is_deleted = 0` (the `<table>_live` view).

The methods mirror `ClickHouseSink` (ensure_table, upsert, delete, truncate, current_rows), so the apply
path writes to either, or both, with the same converted rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from cdc_pipeline.contract import DELETED, IS_DELETED, LIVE_ROWS, META_NAMES, SOURCE_TS, VERSION, WAREHOUSE_META_COLUMNS
from cdc_pipeline.streaming.evolution import Action, SchemaEvolution, normalize_type, split_nullable
from cdc_pipeline.streaming.sink import ReplicaTable, normalize_key
from cdc_pipeline.streaming.types import ColumnSpec

log = logging.getLogger(__name__)


def _first(row: tuple[Any, ...] | None) -> Any:
    """The first value of a row the query always returns."""
    if row is None:
        raise RuntimeError("the query returned no row")
    return row[0]


# PostgreSQL error classes that mean "this row's content" (dead-letter it), not "try again later":
# 22 data exception (invalid text, out of range, NUL byte, ...), 23 integrity constraint violation.
CONTENT_ERROR_CLASSES = ("22", "23")


class WarehouseContentError(ValueError):
    """PostgreSQL rejected the batch for its content (SQLSTATE class 22/23): the apply path isolates and
    dead-letters the rows it names, like a ClickHouse content error."""


class WarehouseSchemaError(RuntimeError):
    """A warehouse table cannot follow a source schema change; the message names table, column and fix."""


_SCALARS = {
    "Int8": "smallint",
    "Int16": "smallint",
    "Int32": "integer",
    "Int64": "bigint",
    "UInt8": "smallint",
    "UInt16": "integer",
    "UInt32": "bigint",
    "UInt64": "numeric(20,0)",
    "Float32": "real",
    "Float64": "double precision",
    "Bool": "boolean",
    "UUID": "uuid",
    "Date": "date",
    "Date32": "date",
    "Time64(6)": "time(6)",
    "DateTime64(6)": "timestamp(6)",
    "DateTime64(6,'UTC')": "timestamptz(6)",
    "DateTime64(3,'UTC')": "timestamptz(3)",
}


def postgres_type(spec: ColumnSpec) -> str:
    """The warehouse column type for a replica column (the type mapping table in the README)."""
    return _postgres_type(spec.clickhouse_type, spec)


def _postgres_type(ch_type: str, spec: ColumnSpec) -> str:
    base, _nullable = split_nullable(normalize_type(ch_type))  # spaces removed: DateTime64(6,'UTC')
    if base.startswith("Array(") and base.endswith(")"):
        return _postgres_type(base[len("Array(") : -1], spec) + "[]"
    if base in _SCALARS:
        return _SCALARS[base]
    if base.startswith("Decimal("):
        return "numeric" + base[len("Decimal") :].replace(" ", "")
    if base == "String":
        if spec.binary:
            return "bytea"
        source = (spec.source_type or "").upper().lstrip("_")
        if source == "JSONB":
            return "jsonb"
        if source == "JSON":
            return "json"
        return "text"
    raise WarehouseSchemaError(
        f"column {spec.name!r}: no PostgreSQL warehouse type for ClickHouse type {ch_type}. To fix: add one in "
        "cdc_pipeline/streaming/warehouse.py, or leave the column out with the connector's column.exclude.list"
    )


def _to_time(value: Any) -> Any:
    """Time64 values are timedeltas since midnight; PostgreSQL's `time` wants a time (24:00:00 as text)."""
    if not isinstance(value, timedelta):
        return value
    micros = value // timedelta(microseconds=1)
    if micros >= 86_400_000_000:
        return "24:00:00"
    return (datetime.min + timedelta(microseconds=micros)).time()


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes | bytearray) else value


def _adapter(pg_type: str) -> Callable[[Any], Any] | None:
    """What a converted value needs before COPY: Time64 timedeltas become times, and strings read back
    from a replica as bytes (TOAST merges) become text again."""
    if pg_type.endswith("[]"):
        element = _adapter(pg_type[:-2])
        if element is None:
            return None
        return lambda values: [None if v is None else element(v) for v in values]
    if pg_type.startswith("time("):
        return _to_time
    if pg_type in ("json", "jsonb", "text"):
        return _text
    return None


class WarehouseSink:
    """Writes replica rows to a PostgreSQL warehouse. `conninfo` is a callable so the password is read
    from the settings when a connection opens and never stored in an attribute that gets logged."""

    def __init__(self, conninfo: Callable[[], str], evolution: SchemaEvolution | None = None) -> None:
        self._conninfo = conninfo
        self.evolution = evolution
        self._conn: psycopg.Connection | None = None
        self._known: dict[str, dict[str, str]] = {}  # table -> column -> PostgreSQL type

    # -- connection ---------------------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self._conninfo(), autocommit=False, connect_timeout=10)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _run(self, work: Callable[[psycopg.Cursor], Any]) -> Any:
        """One transaction; a content error becomes WarehouseContentError, everything else propagates
        (the apply path retries it)."""
        conn = self._connection()
        try:
            with conn.transaction(), conn.cursor() as cur:
                return work(cur)
        except psycopg.Error as exc:
            if conn.broken:
                self.close()
            # DataError without a SQLSTATE: psycopg could not encode a value (e.g. a NUL byte in text).
            if (exc.sqlstate or "")[:2] in CONTENT_ERROR_CLASSES or isinstance(exc, psycopg.DataError):
                raise WarehouseContentError(f"the PostgreSQL warehouse rejected the row(s): {exc}") from exc
            raise

    def forget(self, table: ReplicaTable) -> None:
        self._known.pop(self._key(table), None)

    @staticmethod
    def _key(table: ReplicaTable) -> str:
        return f"{table.database}.{table.name}"

    @staticmethod
    def _ident(table: ReplicaTable) -> sql.Composable:
        return sql.Identifier(table.database, table.name)

    # -- DDL ----------------------------------------------------------------------------------------------

    def existing_column_types(self, table: ReplicaTable) -> dict[str, str]:
        def read(cur: psycopg.Cursor) -> dict[str, str]:
            cur.execute(
                "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
                "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                (table.database, table.name),
            )
            return {name: type_ for name, type_ in cur.fetchall()}

        return self._run(read)

    def existing_key(self, database: str, name: str) -> tuple[str, ...]:
        """The warehouse table's primary key columns in order (empty if the table does not exist)."""

        def read(cur: psycopg.Cursor) -> tuple[str, ...]:
            cur.execute(
                "SELECT a.attname FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true "
                "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum "
                "WHERE n.nspname = %s AND c.relname = %s AND i.indisprimary ORDER BY k.ord",
                (database, name),
            )
            return tuple(r[0] for r in cur.fetchall())

        return self._run(read)

    def ensure_table(
        self, table: ReplicaTable, columns: Sequence[ColumnSpec], partial: Collection[str] = ()
    ) -> list[str]:
        """Create the schema and table, add columns the table lacks, convert columns whose type changed.
        Returns the DDL it ran (none when every column is known with its type)."""
        wanted = {c.name: postgres_type(c) for c in columns}
        known = self._known.get(self._key(table))
        if known is not None and all(known.get(n) == t for n, t in wanted.items()):
            return []
        existing = self.existing_column_types(table)
        statements: list[sql.Composed] = []
        if not existing:
            missing = [k for k in table.key_columns if k not in wanted]
            if missing:
                raise WarehouseSchemaError(
                    f"{self._key(table)}: key column(s) {missing} are not in the change events' schema"
                )
            # Rows of this batch whose schema predates a column get its DEFAULT: plan those like added columns.
            plans = self._plans(table, [c for c in columns if c.name in partial])
            definitions = [self._column_sql(spec, wanted[spec.name], plans.get(spec.name)) for spec in columns]
            definitions += [sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t)) for n, t in WAREHOUSE_META_COLUMNS]
            definitions.append(
                sql.SQL("PRIMARY KEY ({})").format(sql.SQL(", ").join(map(sql.Identifier, table.key_columns)))
            )
            statements.append(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(table.database)))
            statements.append(
                sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
                    self._ident(table), sql.SQL(", ").join(definitions)
                )
            )
            statements.append(self._live_view(table))
        else:
            plans = self._plans(table, [c for c in columns if c.name not in existing])
            for spec in columns:
                pg_type = wanted[spec.name]
                if spec.name not in existing:
                    statements.append(self._add_column(table, spec, pg_type, plans.get(spec.name)))
                elif _comparable(existing[spec.name]) != _comparable(pg_type):
                    statements.append(
                        sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE {} USING {}::{}").format(
                            self._ident(table),
                            sql.Identifier(spec.name),
                            sql.SQL(pg_type),
                            sql.Identifier(spec.name),
                            sql.SQL(pg_type),
                        )
                    )
            if statements:
                statements.append(self._live_view(table))

        def run(cur: psycopg.Cursor) -> list[str]:
            texts = []
            for statement in statements:
                cur.execute(statement)
                texts.append(statement.as_string(cur))
            return texts

        try:
            ran = self._run(run) if statements else []
        except WarehouseContentError as exc:
            raise WarehouseSchemaError(
                f"{self._key(table)}: the warehouse table cannot follow the source's schema change ({exc}). To fix: "
                f"drop the warehouse table and backfill it (backfill_table job)"
            ) from exc
        for text in ran:
            log.info("warehouse DDL: %s", text)
        reread = [p for p in plans.values() if p.action is Action.RESNAPSHOT]
        for plan in reread:
            log.warning("warehouse %s: column %s: %s; the table is re-read", self._key(table), plan.column, plan.reason)
        if reread:
            self._resnapshot(table)
        self._known[self._key(table)] = {n: t for n, t in wanted.items()}
        return ran

    def _plans(self, table: ReplicaTable, columns: Sequence[ColumnSpec]) -> dict[str, Any]:
        if self.evolution is None or not columns:
            return {}
        return {p.column: p for p in self.evolution.plan_new_columns(table.source, columns)}

    def _column_sql(self, spec: ColumnSpec, pg_type: str, plan: Any) -> sql.Composable:
        """`name type [DEFAULT value]`: a column whose existing rows read a constant in the source gets it as
        its DEFAULT (exact at once); one whose rows PostgreSQL rewrote without events is re-read by
        `ensure_table`."""
        column = sql.SQL("{} {}").format(sql.Identifier(spec.name), sql.SQL(pg_type))
        if plan is not None and plan.action is Action.DEFAULT and spec.has_default:
            value, adapt = spec.convert(spec.default), _adapter(pg_type)
            literal = sql.Literal(adapt(value) if adapt and value is not None else value)
            return sql.SQL("{} DEFAULT {}").format(column, literal)
        return column

    def _add_column(self, table: ReplicaTable, spec: ColumnSpec, pg_type: str, plan: Any) -> sql.Composed:
        return sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {}").format(
            self._ident(table), self._column_sql(spec, pg_type, plan)
        )

    def _resnapshot(self, table: ReplicaTable) -> None:
        """Re-read a table whose new column PostgreSQL filled without change events. A table that also goes
        to ClickHouse gets its re-snapshot from the ClickHouse sink's schema evolution (one signal, not two)."""
        config = self.evolution.pipeline.table(table.source) if self.evolution and table.source else None
        if config is None or self.evolution is None or "clickhouse" in config.sinks or self.evolution.catalog is None:
            return
        signal = self.evolution.catalog.request_resnapshot(config)
        log.warning("warehouse %s: re-snapshot requested (signal %s)", self._key(table), signal)

    def _live_view(self, table: ReplicaTable) -> sql.Composed:
        return sql.SQL(f"CREATE OR REPLACE VIEW {{}} AS SELECT * FROM {{}} WHERE {LIVE_ROWS}").format(
            sql.Identifier(table.database, f"{table.name}_live"), self._ident(table)
        )

    # -- writes -------------------------------------------------------------------------------------------

    def _write(self, table: ReplicaTable, names: Sequence[str], rows: Sequence[Sequence[Any]], delete: bool) -> int:
        if not rows:
            return 0
        known = self._known.get(self._key(table)) or {}
        adapters = [_adapter(known.get(n, "")) for n in names]
        keys = sql.SQL(", ").join(map(sql.Identifier, table.key_columns))
        all_names = [*names, *META_NAMES]
        columns = sql.SQL(", ").join(map(sql.Identifier, all_names))
        updates = list(META_NAMES) if delete else [n for n in all_names if n not in table.key_columns]
        set_clause = sql.SQL(", ").join(
            sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(n), sql.Identifier(n)) for n in updates
        )
        stage = sql.Identifier(f"_cdc_stage_{table.name}"[:63])

        def work(cur: psycopg.Cursor) -> int:
            cur.execute(sql.SQL("CREATE TEMP TABLE {} (LIKE {}) ON COMMIT DROP").format(stage, self._ident(table)))
            with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(stage, columns)) as copy:
                for row in rows:
                    values = list(row)
                    for i, adapt in enumerate(adapters):
                        if adapt is not None and values[i] is not None:
                            values[i] = adapt(values[i])
                    copy.write_row(values)
            cur.execute(
                sql.SQL(
                    "INSERT INTO {target} AS t ({columns}) "
                    "SELECT DISTINCT ON ({keys}) {columns} FROM {stage} ORDER BY {keys}, {version} DESC "
                    "ON CONFLICT ({keys}) DO UPDATE SET {set_clause} WHERE t.{version} < EXCLUDED.{version}"
                ).format(
                    target=self._ident(table),
                    columns=columns,
                    keys=keys,
                    stage=stage,
                    set_clause=set_clause,
                    version=sql.Identifier(VERSION),
                )
            )
            return len(rows)

        return self._run(work)

    def upsert(self, table: ReplicaTable, column_names: Sequence[str], rows: Sequence[Sequence[Any]]) -> int:
        """Row states; each row ends with the META_COLUMNS values (_version, _is_deleted, _source_ts)."""
        return self._write(table, column_names, rows, delete=False)

    def delete(self, table: ReplicaTable, key_rows: Sequence[Sequence[Any]]) -> int:
        """Tombstones: key values + (_version, 1, _source_ts); the row's other columns keep their values."""
        return self._write(table, table.key_columns, key_rows, delete=True)

    def truncate(self, table: ReplicaTable, row_version: int, source_ts: Any) -> bool:
        """Mark every row older than `row_version` deleted as of it. False when the table does not exist."""

        def work(cur: psycopg.Cursor) -> bool:
            cur.execute("SELECT to_regclass(%s)", (self._ident(table).as_string(cur),))
            if _first(cur.fetchone()) is None:
                return False
            cur.execute(
                sql.SQL("UPDATE {} SET {} = %s, {} = %s, {} = %s WHERE {} < %s").format(
                    self._ident(table),
                    sql.Identifier(IS_DELETED),
                    sql.Identifier(VERSION),
                    sql.Identifier(SOURCE_TS),
                    sql.Identifier(VERSION),
                ),
                (DELETED, row_version, source_ts, row_version),
            )
            return True

        return self._run(work)

    def current_rows(
        self, table: ReplicaTable, keys: Sequence[Sequence[Any]], columns: Sequence[str]
    ) -> dict[tuple[Any, ...], dict[str, Any]]:
        """The live values of `columns` for the rows with these keys, by normalized key."""
        if not keys or not columns:
            return {}
        key_list = sql.SQL(", ").join(map(sql.Identifier, table.key_columns))
        selected = sql.SQL(", ").join(map(sql.Identifier, [*table.key_columns, *columns]))

        one = sql.SQL("({})").format(sql.SQL(", ").join(sql.Placeholder() for _ in table.key_columns))
        query = sql.SQL(f"SELECT {{}} FROM {{}} WHERE ({{}}) IN (VALUES {{}}) AND {LIVE_ROWS}").format(
            selected, self._ident(table), key_list, sql.SQL(", ").join(one for _ in keys)
        )

        def work(cur: psycopg.Cursor) -> list[tuple[Any, ...]]:
            cur.execute(query, [value for key in keys for value in key])
            return cur.fetchall()

        width = len(table.key_columns)
        return {
            normalize_key(row[:width]): {name: _utc(v) for name, v in zip(columns, row[width:], strict=True)}
            for row in self._run(work)
        }


def _comparable(pg_type: str) -> str:
    """format_type's spelling vs ours: `timestamp(6) without time zone` == `timestamp(6)`."""
    text = pg_type.lower().replace(" without time zone", "").replace("timestamp(6) with time zone", "timestamptz(6)")
    text = text.replace("timestamp(3) with time zone", "timestamptz(3)")
    return text.replace("character varying", "varchar").replace(" ", "")


def _utc(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC)
    return value

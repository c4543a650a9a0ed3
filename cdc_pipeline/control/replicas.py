"""Read access to a replica table, whichever sink holds it: what the asset checks and `reconcile` ask of a
replica (does it exist, its live rows, duplicate keys, newest change, columns, DDL), answered by the
ClickHouse replica (`FINAL`, `_is_deleted = 0`) or by the PostgreSQL warehouse table (`_is_deleted = 0`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Protocol

import psycopg
from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client
from psycopg import sql

from cdc_pipeline.clickhouse_client import command_int
from cdc_pipeline.contract import DELETED, IS_DELETED, LIVE_ROWS, META_NAMES, SOURCE_TS, VERSION


class Replica(Protocol):
    kind: str  # "clickhouse" or "warehouse"
    qualified: str  # for messages

    def exists(self) -> bool: ...
    def live_count(self) -> int: ...
    def duplicate_keys(self, keys: list[str], limit: int = 20) -> list[tuple[Any, ...]]: ...
    def newest_source_ts(self) -> Any: ...
    def columns(self) -> list[str]: ...
    def ddl(self) -> str: ...
    def rows(self, columns: list[str], binary: set[str]) -> list[tuple[Any, ...]]: ...
    def live_versions(
        self, key: list[str], keys: list[tuple[Any, ...]]
    ) -> dict[tuple[Any, ...], tuple[tuple[Any, ...], int]]: ...
    def mark_deleted(self, key: list[str], stale: dict[tuple[Any, ...], tuple[tuple[Any, ...], int]]) -> None: ...


def _normalized(values: tuple[Any, ...]) -> tuple[Any, ...]:
    from cdc_pipeline.control.reconcile import normalize  # reconcile imports this module

    return tuple(normalize(v) for v in values)


class ClickHouseReplica:
    kind = "clickhouse"

    def __init__(self, client: Client, database: str, table: str) -> None:
        self.client, self.database, self.table = client, database, table
        self.qualified = f"{quote_identifier(database)}.{quote_identifier(table)}"

    def exists(self) -> bool:
        return bool(command_int(self.client, f"EXISTS TABLE {self.qualified}"))

    def live_count(self) -> int:
        return command_int(self.client, f"SELECT count() FROM {self.qualified} FINAL WHERE {LIVE_ROWS}")

    def duplicate_keys(self, keys: list[str], limit: int = 20) -> list[tuple[Any, ...]]:
        key_list = ", ".join(quote_identifier(k) for k in keys)
        return [
            tuple(row)
            for row in self.client.query(
                f"SELECT {key_list}, count() AS n FROM {self.qualified} FINAL WHERE {LIVE_ROWS} "
                f"GROUP BY {key_list} HAVING n > 1 ORDER BY n DESC LIMIT {int(limit)}"
            ).result_rows
        ]

    def newest_source_ts(self) -> Any:
        return self.client.command(f"SELECT max({SOURCE_TS}) FROM {self.qualified}")

    def columns(self) -> list[str]:
        rows = self.client.query(
            "SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String} ORDER BY position",
            parameters={"db": self.database, "t": self.table},
        ).result_rows
        return [r[0] for r in rows if r[0] not in META_NAMES]

    def ddl(self) -> str:
        return str(self.client.command(f"SHOW CREATE TABLE {self.qualified}"))

    def rows(self, columns: list[str], binary: set[str]) -> list[tuple[Any, ...]]:
        result = self.client.query(
            f"SELECT {', '.join(quote_identifier(n) for n in columns)} FROM {self.qualified} FINAL WHERE {LIVE_ROWS}",
            column_formats={n: "bytes" for n in columns if n in binary},
        )
        return [tuple(r) for r in result.result_rows]

    def live_versions(
        self, key: list[str], keys: list[tuple[Any, ...]]
    ) -> dict[tuple[Any, ...], tuple[tuple[Any, ...], int]]:
        """For each of `keys` (normalized, as a diff has them) with a live row: the key as the replica
        returns it (to write it back) and the row's `_version`."""
        key_sql = ", ".join(quote_identifier(k) for k in key)
        wanted = set(keys)
        found = {}
        for row in self.client.query(
            f"SELECT {key_sql}, {VERSION} FROM {self.qualified} FINAL WHERE {LIVE_ROWS}"
        ).result_rows:
            compared = _normalized(tuple(row[:-1]))
            if compared in wanted:
                found[compared] = (tuple(row[:-1]), row[-1])
        return found

    def mark_deleted(self, key: list[str], stale: dict[tuple[Any, ...], tuple[tuple[Any, ...], int]]) -> None:
        """A delete marker one version above each stale row: any later real change has a higher version."""
        markers = [[*raw, version + 1, DELETED, datetime.now(UTC)] for raw, version in stale.values()]
        self.client.insert(self.qualified, markers, column_names=[*key, *META_NAMES])


class WarehouseReplica:
    kind = "warehouse"

    def __init__(self, conn: psycopg.Connection, schema: str, table: str) -> None:
        self.conn, self.schema, self.table = conn, schema, table
        self.ident = sql.Identifier(schema, table)
        self.qualified = f"{schema}.{table} (PostgreSQL warehouse)"

    def _one(self, query: sql.SQL | sql.Composed, params: tuple[Any, ...] = ()) -> Any:
        row = self.conn.execute(query, params).fetchone()
        return row[0] if row else None

    def exists(self) -> bool:
        return self._one(sql.SQL("SELECT to_regclass(%s) IS NOT NULL"), (self.ident.as_string(self.conn),)) is True

    def live_count(self) -> int:
        return int(self._one(sql.SQL(f"SELECT count(*) FROM {{}} WHERE {LIVE_ROWS}").format(self.ident)))

    def duplicate_keys(self, keys: list[str], limit: int = 20) -> list[tuple[Any, ...]]:
        # The primary key makes duplicates impossible; asked anyway, so a dropped constraint would show.
        key_list = sql.SQL(", ").join(map(sql.Identifier, keys))
        return [
            tuple(r)
            for r in self.conn.execute(
                sql.SQL(
                    f"SELECT {{k}}, count(*) AS n FROM {{t}} WHERE {LIVE_ROWS} GROUP BY {{k}} HAVING count(*) > 1 "
                    "ORDER BY n DESC LIMIT {limit}"
                ).format(k=key_list, t=self.ident, limit=sql.Literal(int(limit)))
            ).fetchall()
        ]

    def newest_source_ts(self) -> Any:
        return self._one(sql.SQL("SELECT max({}) FROM {}").format(sql.Identifier(SOURCE_TS), self.ident))

    def columns(self) -> list[str]:
        rows = self.conn.execute(
            "SELECT a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s "
            "AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            (self.schema, self.table),
        ).fetchall()
        return [r[0] for r in rows if r[0] not in META_NAMES]

    def ddl(self) -> str:
        rows = self.conn.execute(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
            "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            (self.schema, self.table),
        ).fetchall()
        body = ",\n  ".join(f"{sql.Identifier(n).as_string(self.conn)} {t}" for n, t in rows)
        return f"CREATE TABLE {self.ident.as_string(self.conn)} (\n  {body}\n)"

    def rows(self, columns: list[str], binary: set[str]) -> list[tuple[Any, ...]]:
        return [
            tuple(r)
            for r in self.conn.execute(
                sql.SQL(f"SELECT {{}} FROM {{}} WHERE {LIVE_ROWS}").format(
                    sql.SQL(", ").join(map(sql.Identifier, columns)), self.ident
                )
            ).fetchall()
        ]

    def live_versions(
        self, key: list[str], keys: list[tuple[Any, ...]]
    ) -> dict[tuple[Any, ...], tuple[tuple[Any, ...], int]]:
        wanted = set(keys)
        found = {}
        query = sql.SQL(f"SELECT {{}}, {{}} FROM {{}} WHERE {LIVE_ROWS}").format(
            sql.SQL(", ").join(map(sql.Identifier, key)), sql.Identifier(VERSION), self.ident
        )
        for row in self.conn.execute(query).fetchall():
            compared = _normalized(tuple(row[:-1]))
            if compared in wanted:
                found[compared] = (tuple(row[:-1]), int(row[-1]))
        return found

    def mark_deleted(self, key: list[str], stale: dict[tuple[Any, ...], tuple[tuple[Any, ...], int]]) -> None:
        """Tombstone each stale row one version above its own (unless a newer change arrived meanwhile)."""
        condition = sql.SQL(" AND ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in key)
        deleted, version_column, source_ts = map(sql.Identifier, (IS_DELETED, VERSION, SOURCE_TS))
        query = sql.SQL("UPDATE {t} SET {d} = %s, {v} = %s, {ts} = %s WHERE {c} AND {v} = %s").format(
            t=self.ident, d=deleted, v=version_column, ts=source_ts, c=condition
        )
        with self.conn.transaction():
            for raw, version in stale.values():
                self.conn.execute(query, (DELETED, version + 1, datetime.now(UTC), *raw, version))

"""Reconcile a replica with its source, row by row: every captured column of every row, compared in
one canonical form per PostgreSQL type (the two client libraries return different Python types for
the same value, and some mappings are lossy by design, see the README's type table).

Both sides are read whole into memory: meant for tables up to a few million rows per run. The reconcile
job (defs/jobs/reconcile_job.py) compares once the stream settled (`reconcile_settled`) and reports with
`summary` and `differences_md`; control/repair.py repairs what differs."""

from __future__ import annotations

import csv
import json
import re
import struct
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

from cdc_pipeline.config import TableConfig
from cdc_pipeline.control import source
from cdc_pipeline.control.replicas import Replica


class DuplicateKeyError(AssertionError):
    """The replica's FINAL view has two live rows for one key (it never should)."""


def normalize(value: Any) -> Any:
    """One comparable form for a value from either side (psycopg or clickhouse-connect)."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value
    if isinstance(value, list | tuple):
        return [normalize(v) for v in value]
    if isinstance(value, dict):
        return value
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, float | int | Decimal | date | str | bytes | bool) or value is None:
        return value
    return str(value)


_INTERVAL_PART = re.compile(r"(-?[\d.]+)([YMDHS])")


def _interval(text: str) -> tuple[Decimal, ...]:
    """ISO 8601 interval (PostgreSQL's iso_8601 style or Debezium's) as (years, months, days, h, m, s)."""
    date_part, _, time_part = text.lstrip("P").partition("T")
    parts = dict.fromkeys("YMDhms", Decimal(0))
    for number, unit in _INTERVAL_PART.findall(date_part):
        parts[unit] = Decimal(number)
    for number, unit in _INTERVAL_PART.findall(time_part):
        parts[{"H": "h", "M": "m", "S": "s"}[unit]] = Decimal(number)
    months = parts["Y"] * 12 + parts["M"]
    seconds = parts["h"] * 3600 + parts["m"] * 60 + parts["s"]
    return (months, parts["D"], seconds)


# The replica's date range (Date32/DateTime64): the stream's default `out_of_range: clamp` policy stores
# values beyond it at the nearest end, so both sides are compared clamped.
_LOW_DATE, _HIGH_DATE = date(1900, 1, 1), date(2299, 12, 31)
_LOW_TIME, _HIGH_TIME = datetime(1900, 1, 1), datetime(2299, 12, 31, 23, 59, 59, 999999)
_BEYOND = {"infinity": 1, "-infinity": -1}


def _clamped(pg_type: str, value: Any) -> Any:
    if pg_type == "ARRAY" and isinstance(value, list):
        return [_clamped("element", v) for v in value]
    if pg_type == "element":  # an array element: its type shows in its value
        if isinstance(value, datetime):
            return min(max(value, _LOW_TIME), _HIGH_TIME)
        return min(max(value, _LOW_DATE), _HIGH_DATE) if isinstance(value, date) else value
    if pg_type == "date":
        if isinstance(value, str):  # 'infinity', '-infinity' or a year Python cannot hold (see _lenient_loaders)
            low = _BEYOND.get(value) == -1 or value.endswith(" BC")
            return _LOW_DATE if low else _HIGH_DATE
        return min(max(value, _LOW_DATE), _HIGH_DATE) if isinstance(value, date) else value
    if pg_type.startswith("timestamp"):
        if isinstance(value, str):
            low = _BEYOND.get(value) == -1 or value.endswith(" BC")
            return _LOW_TIME if low else _HIGH_TIME
        return min(max(value, _LOW_TIME), _HIGH_TIME) if isinstance(value, datetime) else value
    return value


def canonical(pg_type: str, value: Any) -> Any:
    """Both sides' values in one form per PostgreSQL type (after `normalize`). A value that does not
    parse as its type (e.g. a placeholder that reached a replica) is kept as ("unparsable", text), so it
    is reported as a difference instead of failing the comparison."""
    try:
        return _clamped(pg_type, _canonical(pg_type, value))
    except (ArithmeticError, ValueError, TypeError, struct.error):
        return ("unparsable", repr(value)[:200])


def _canonical(pg_type: str, value: Any) -> Any:
    if pg_type == "ARRAY":
        if isinstance(value, str):  # psycopg leaves arrays of user types (enum[]) as their text form
            value = next(csv.reader([value[1:-1]], escapechar="\\")) if value != "{}" else []
        return [] if value is None else [canonical("element", v) for v in value]
    if value is None:
        return None
    if pg_type == "numeric" or (pg_type == "element" and isinstance(value, Decimal)):
        number = Decimal(str(value))
        return "NaN" if number.is_nan() else number
    if pg_type == "real":
        value = float(value)
        return "NaN" if value != value else struct.unpack("f", struct.pack("f", value))[0]
    if pg_type == "double precision":
        value = float(value)
        return "NaN" if value != value else value
    if pg_type == "time without time zone":
        if isinstance(value, timedelta):
            return value
        if isinstance(value, str):  # clickhouse-connect reads Time64 as text
            hours, minutes, seconds = value.split(":")
            return timedelta(hours=int(hours), minutes=int(minutes), seconds=float(Decimal(seconds)))
        return timedelta(hours=value.hour, minutes=value.minute, seconds=value.second, microseconds=value.microsecond)
    if pg_type == "interval":
        return _interval(str(value))
    if pg_type in ("json", "jsonb"):
        return json.loads(value) if isinstance(value, str) else value
    if pg_type == "bytea":
        return bytes(value)
    return value


def _lenient_loaders(conn: psycopg.Connection) -> None:
    """Dates and timestamps Python cannot hold ('infinity', years past 9999 or BC) load as their text
    instead of failing the whole read."""
    from psycopg.types.datetime import DateLoader, TimestampLoader, TimestamptzLoader

    for name, base in (("date", DateLoader), ("timestamp", TimestampLoader), ("timestamptz", TimestamptzLoader)):

        class Lenient(base):  # type: ignore[valid-type, misc]
            def load(self, data: Any) -> Any:
                try:
                    return super().load(data)
                except psycopg.DataError:
                    return bytes(data).decode()

        conn.adapters.register_loader(name, Lenient)


def source_columns(conn: psycopg.Connection, schema: str, table: str) -> list[tuple[str, str]]:
    return conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
        "ORDER BY ordinal_position",
        (schema, table),
    ).fetchall()


def primary_key(conn: psycopg.Connection, schema: str, table: str) -> list[str]:
    rows = conn.execute(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        "WHERE i.indrelid = %s::regclass AND i.indisprimary ORDER BY array_position(i.indkey, a.attnum)",
        (sql.Identifier(schema, table).as_string(conn),),
    ).fetchall()
    return [r[0] for r in rows]


def source_rows(
    conn: psycopg.Connection,
    schema: str,
    table: str,
    columns: list[tuple[str, str]] | None = None,
    key: list[str] | None = None,
    condition: str | None = None,
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Rows by key (default: every column, the table's primary key), optionally filtered by SQL."""
    columns = columns or source_columns(conn, schema, table)
    key = key or primary_key(conn, schema, table)
    names = [c for c, _ in columns]
    types = dict(columns)
    # Intervals as ISO 8601 text: psycopg's timedelta cannot hold months.
    selected = [
        sql.SQL("{}::text").format(sql.Identifier(n)) if types[n] == "interval" else sql.Identifier(n) for n in names
    ]
    query = sql.SQL("SELECT {} FROM {}").format(sql.SQL(", ").join(selected), sql.Identifier(schema, table))
    if condition:
        query += sql.SQL(" WHERE ") + sql.SQL(condition)  # an operator-supplied filter
    conn.execute("SET intervalstyle = 'iso_8601'")
    rows = {}
    _lenient_loaders(conn)
    for record in conn.execute(query):
        row = {n: canonical(types[n], normalize(v)) for n, v in zip(names, record, strict=True)}
        rows[tuple(row[k] for k in key)] = row
    return rows


def replica_rows(
    replica: Replica, columns: list[tuple[str, str]], key: list[str]
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The replica's live rows by key, canonical like `source_rows` (ClickHouse or warehouse alike)."""
    names = [c for c, _ in columns]
    types = dict(columns)
    rows = {}
    for record in replica.rows(names, {n for n in names if types[n] == "bytea"}):
        row = {}
        for name, value in zip(names, record, strict=True):
            row[name] = canonical(types[name], normalize(value))
        key_value = tuple(row[k] for k in key)
        if key_value in rows:
            raise DuplicateKeyError(f"{replica.qualified}: duplicate key {key_value} among the live rows")
        rows[key_value] = row
    return rows


def diff(
    source: dict[tuple[Any, ...], dict[str, Any]], replica: dict[tuple[Any, ...], dict[str, Any]], limit: int = 5
) -> list[str]:
    problems = [f"missing in replica: {k}" for k in list(source.keys() - replica.keys())[:limit]]
    problems += [f"extra in replica: {k}" for k in list(replica.keys() - source.keys())[:limit]]
    for k in sorted(source.keys() & replica.keys())[:100_000]:
        if source[k] != replica[k]:
            different = {c: (source[k][c], replica[k].get(c)) for c in source[k] if source[k][c] != replica[k].get(c)}
            problems.append(f"row {k} differs: {different}")
            if len(problems) > 3 * limit:
                break
    return problems


@dataclass
class Differences:
    """A row-level diff by key: `missing` (in the source, not the replica), `extra` (in the replica,
    not the source), `different` (both, with the differing columns as (source, replica) values)."""

    source_rows: int
    replica_rows: int
    missing: list[tuple[Any, ...]] = field(default_factory=list)
    extra: list[tuple[Any, ...]] = field(default_factory=list)
    different: dict[tuple[Any, ...], dict[str, tuple[Any, Any]]] = field(default_factory=dict)
    # Captured source columns the replica does not have yet (compared on the others), see no_schema_drift.
    columns_not_in_replica: list[str] = field(default_factory=list)
    replica_exists: bool = True
    unsettled_lag: int = 0  # the stream's lag when compared (0: nothing was in flight in Kafka)

    @property
    def total(self) -> int:
        return len(self.missing) + len(self.extra) + len(self.different)

    def keys_to_backfill(self) -> list[tuple[Any, ...]]:
        """Keys a snapshot of the source repairs (extra rows are not in the source to snapshot)."""
        return sorted(self.missing, key=repr) + sorted(self.different, key=repr)


def compare(
    source: dict[tuple[Any, ...], dict[str, Any]], replica: dict[tuple[Any, ...], dict[str, Any]]
) -> Differences:
    result = Differences(len(source), len(replica))
    result.missing = sorted(source.keys() - replica.keys(), key=repr)
    result.extra = sorted(replica.keys() - source.keys(), key=repr)
    for key in sorted(source.keys() & replica.keys(), key=repr):
        if source[key] != replica[key]:
            result.different[key] = {
                c: (source[key][c], replica[key].get(c)) for c in source[key] if source[key][c] != replica[key].get(c)
            }
    return result


def reconcile(
    conn: psycopg.Connection,
    replica: Replica,
    schema: str,
    table: str,
    key: list[str],
    captured: list[str] | None = None,
) -> Differences:
    """Diff the source table with its replica (live rows) on the captured columns the replica has; a
    replica table that does not exist yet has every source row missing."""
    columns = source_columns(conn, schema, table)
    if captured is not None:
        columns = [(name, pg_type) for name, pg_type in columns if name in captured]
    present = set(replica.columns()) if replica.exists() else set()
    compared = [(name, pg_type) for name, pg_type in columns if name in present or not present]
    # One snapshot of the source; the replica is read after it, so in-flight changes show as differences
    # that a second pass (after the stream caught up) clears.
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        source = source_rows(conn, schema, table, compared, key)
    replica_values = replica_rows(replica, compared, key) if present else {}
    result = compare(source, replica_values)
    result.replica_exists = bool(present)
    result.columns_not_in_replica = [name for name, _ in columns if present and name not in present]
    return result


def reconcile_settled(
    connect: Callable[[], AbstractContextManager[psycopg.Connection[Any]]],
    lag: Callable[[], int],
    replica: Replica,
    table: TableConfig,
    settle_s: float,
    warn: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Differences:
    """`reconcile` after the stream caught up (`lag()`, its total lag, reached 0, or `settle_s` passed);
    keys that differ are compared once more after a pause, so a change in flight at the first pass is
    not reported. `connect` opens a source connection (autocommit)."""
    deadline = clock() + settle_s
    while (behind := lag()) and clock() < deadline:
        sleep(2)
    if behind:
        warn(
            f"{table.name}: the stream still lags by {behind} after {settle_s:.0f} s; differences may be in "
            "flight (is the stream running?)"
        )
    with connect() as conn:
        key = source.primary_key(conn, table)
        captured = source.source_columns(conn, table)
        result = reconcile(conn, replica, table.schema_name, table.table_name, key, captured)
        if result.total:
            sleep(min(10.0, settle_s))
            again = reconcile(conn, replica, table.schema_name, table.table_name, key, captured)
            still_missing, still_extra = set(again.missing), set(again.extra)
            result.missing = [k for k in result.missing if k in still_missing]
            result.extra = [k for k in result.extra if k in still_extra]
            result.different = {k: v for k, v in again.different.items() if k in result.different}
    result.unsettled_lag = behind
    return result


def replica_label(table: TableConfig, replica: Replica) -> str:
    """How reports name a replica: the table's name, with the sink when it is not ClickHouse."""
    return table.name if replica.kind == "clickhouse" else f"{table.name} ({replica.kind})"


def counts(diff: Differences) -> dict[str, int]:
    return {"missing": len(diff.missing), "extra": len(diff.extra), "different": len(diff.different)}


def summary(diff: Differences, kind: str, max_keys: int = 100) -> dict[str, Any]:
    """The reconcile job's report of one replica (JSON-ready: keys as lists of strings)."""
    return {
        "sink": kind, "source_rows": diff.source_rows, "replica_rows": diff.replica_rows, **counts(diff),
        "missing_keys": [list(map(str, k)) for k in diff.missing[:max_keys]],
        "extra_keys": [list(map(str, k)) for k in diff.extra[:max_keys]],
        "different_keys": [list(map(str, k)) for k in list(diff.different)[:max_keys]],
        "columns_not_in_replica": diff.columns_not_in_replica, "replica_exists": diff.replica_exists,
        "lag_at_compare": diff.unsettled_lag,
    }  # fmt: skip


def differences_md(diff: Differences, limit: int = 50) -> str:
    """The differences as a Markdown table (at most `limit` rows per kind)."""
    lines = ["| kind | key | columns (source → replica) |", "|---|---|---|"]
    for key in diff.missing[:limit]:
        lines.append(f"| missing | {key} | |")
    for key in diff.extra[:limit]:
        lines.append(f"| extra | {key} | |")
    for key, columns in list(diff.different.items())[:limit]:
        change = ", ".join(f"{c}: {s!r} → {r!r}" for c, (s, r) in columns.items())
        lines.append(f"| different | {key} | {change[:300]} |")
    return "\n".join(lines)

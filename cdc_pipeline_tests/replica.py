"""Test support: run the real pipeline for a throwaway PostgreSQL schema, and compare the ClickHouse
replica (`FINAL`, deleted rows hidden) with the source row for row, every column."""

from __future__ import annotations

import contextlib
import csv
import json
import re
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import yaml
from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client
from psycopg import sql

from cdc_pipeline.config import PipelineConfig, parse_pipeline_config
from cdc_pipeline.connector import connector_name, prepare_source, provision_connector
from cdc_pipeline.resources import KafkaConnectResource
from cdc_pipeline.settings import Settings
from cdc_pipeline.streaming.launch import SparkSubmit, launch
from cdc_pipeline_tests.conftest import stop_process_group


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


def canonical(pg_type: str, value: Any) -> Any:
    """Both sides' values in one form per PostgreSQL type (after `normalize`)."""
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
        (f'"{schema}"."{table}"',),
    ).fetchall()
    return [r[0] for r in rows]


def source_rows(conn: psycopg.Connection, schema: str, table: str) -> dict[tuple, dict[str, Any]]:
    columns = source_columns(conn, schema, table)
    key = primary_key(conn, schema, table)
    names = [c for c, _ in columns]
    types = dict(columns)
    # Intervals as ISO 8601 text: psycopg's timedelta cannot hold months.
    selected = [
        sql.SQL("{}::text").format(sql.Identifier(n)) if types[n] == "interval" else sql.Identifier(n) for n in names
    ]
    query = sql.SQL("SELECT {} FROM {}.{}").format(
        sql.SQL(", ").join(selected), sql.Identifier(schema), sql.Identifier(table)
    )
    conn.execute("SET intervalstyle = 'iso_8601'")
    rows = {}
    for record in conn.execute(query):
        row = {n: canonical(types[n], normalize(v)) for n, v in zip(names, record, strict=True)}
        rows[tuple(row[k] for k in key)] = row
    return rows


def replica_rows(
    client: Client, database: str, table: str, columns: list[tuple[str, str]], key: list[str]
) -> dict[tuple, dict[str, Any]]:
    names = [c for c, _ in columns]
    types = dict(columns)
    result = client.query(
        f"SELECT {', '.join(quote_identifier(n) for n in names)} "
        f"FROM {quote_identifier(database)}.{quote_identifier(table)} FINAL WHERE _is_deleted = 0",
        column_formats={n: "bytes" for n in names if types[n] == "bytea"},
    )
    rows = {}
    for record in result.result_rows:
        row = {}
        for name, value in zip(names, record, strict=True):
            row[name] = canonical(types[name], normalize(value))
        key_value = tuple(row[k] for k in key)
        if key_value in rows:
            raise AssertionError(f"{database}.{table}: duplicate key {key_value} in the FINAL view")
        rows[key_value] = row
    return rows


def diff(source: dict[tuple, dict], replica: dict[tuple, dict], limit: int = 5) -> list[str]:
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
class RunningPipeline:
    """A pipeline over one PostgreSQL schema: connector provisioned, stream started by the test."""

    settings: Settings
    config: PipelineConfig
    config_path: Path
    checkpoint: str
    schema: str
    database: str
    log_path: Path
    stream: subprocess.Popen | None = None

    def start_stream(self, master: str = "local[2]", conf: dict[str, str] | None = None) -> None:
        submit = SparkSubmit(master=master, conf=conf or {}, jvm_cache_dir=self.settings.jvm_cache_dir)
        argv = submit.stream_argv(self.config_path, checkpoint_location=self.checkpoint, name=self.config.query_name)
        self.stream = launch(argv, log_path=self.log_path)

    def kill_stream(self, sig: int = signal.SIGKILL) -> None:
        if self.stream is not None:
            stop_process_group(self.stream, timeout=60, sig=sig)
        self.stream = None

    def stream_alive(self) -> bool:
        return self.stream is not None and self.stream.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def mismatches(self, conn: psycopg.Connection, client: Client, tables: list[str]) -> list[str]:
        problems = []
        for table in tables:
            columns = source_columns(conn, self.schema, table)
            key = primary_key(conn, self.schema, table)
            sink_table = self.config.sink_table(self.config.table(f"{self.schema}.{table}"))
            try:
                replica = replica_rows(client, self.database, sink_table, columns, key)
            except Exception as exc:  # table not created yet, column not added yet
                problems.append(f"{table}: {str(exc).splitlines()[0][:200]}")
                continue
            problems += [f"{table}: {p}" for p in diff(source_rows(conn, self.schema, table), replica)]
        return problems

    def wait_until_replica_matches(
        self, conn: psycopg.Connection, client: Client, tables: list[str], timeout: float = 300
    ) -> int:
        """Wait until every table's replica equals its source; returns how many rows were compared."""
        deadline = time.monotonic() + timeout
        problems: list[str] = ["not checked yet"]
        while time.monotonic() < deadline:
            problems = self.mismatches(conn, client, tables)
            if not problems:
                return sum(len(source_rows(conn, self.schema, table)) for table in tables)
            if self.stream is not None and not self.stream_alive():
                raise AssertionError(f"the stream exited:\n{self.log_tail()}")
            time.sleep(3)
        raise AssertionError("replica does not match the source:\n" + "\n".join(problems[:20]) + "\n" + self.log_tail())


@contextmanager
def pipeline_for_schema(
    settings: Settings, name: str, tables: list[str], work_dir: Path, trigger: str = "1 seconds"
) -> Iterator[RunningPipeline]:
    """Provision a connector for `<name>.<table>` tables (already created by the caller); stop and
    remove everything afterwards, also when the test fails."""
    raw = {
        "name": name,
        "source": {
            "schemas": [name],
            "signal_table": f"{name}.cdc_signal",
            "heartbeat_table": None,
            "heartbeat_interval_ms": 5000,
        },
        "tables": [{"name": f"{name}.{t}", "clickhouse_table": t} for t in tables],
        "sink": {"clickhouse": {"database": name}},
        "stream": {"trigger_interval": trigger, "max_offsets_per_trigger": 2000},
    }
    config = parse_pipeline_config(raw, source=f"{name}.yaml")
    config_path = work_dir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    connect = KafkaConnectResource(url=settings.connect_url)
    running = RunningPipeline(
        settings, config, config_path, str(work_dir / "checkpoint"), name, name, work_dir / "stream.log"
    )
    prepare_source(settings.postgres_conninfo(), config)
    provision_connector(connect, config, settings)
    try:
        yield running
    finally:
        running.kill_stream(signal.SIGTERM)
        with contextlib.suppress(Exception):  # cleanup goes on
            connect.delete(connector_name(config))
        with psycopg.connect(settings.postgres_conninfo(), autocommit=True) as conn:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                active = conn.execute(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (config.slot_name,)
                ).fetchone()
                if active is None:
                    break
                if not active[0]:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (config.slot_name,))
                    break
                time.sleep(1)
            conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(config.publication_name)))

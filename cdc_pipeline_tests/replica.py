"""Test support: run the real pipeline for a throwaway PostgreSQL schema, and compare the ClickHouse
replica (`FINAL`, deleted rows hidden) with the source row for row, every column."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import yaml
from clickhouse_connect.driver.client import Client
from psycopg import sql

from cdc_pipeline.config import PipelineConfig, TableConfig, parse_pipeline_config
from cdc_pipeline.connector import connector_name, prepare_source, provision_connector
from cdc_pipeline.control.reconcile import diff, primary_key, replica_rows, source_columns, source_rows
from cdc_pipeline.control.replicas import ClickHouseReplica, WarehouseReplica
from cdc_pipeline.resources import KafkaConnectResource
from cdc_pipeline.settings import Settings
from cdc_pipeline.streaming.launch import SparkSubmit, submit_env
from cdc_pipeline_tests.conftest import stop_process_group


def launch(argv: Sequence[str], *, log_path: Path | None = None) -> subprocess.Popen:
    """Start spark-submit detached (own session) with output to `log_path` (the tests' own streams; the
    product starts its stream through control/stream.py)."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(
            list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=submit_env(), start_new_session=True,
        )  # fmt: skip
    finally:
        if not isinstance(out, int):
            out.close()


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

    def compared(self, conn: psycopg.Connection, name: str) -> tuple[TableConfig, list[tuple[str, str]], list[str]]:
        """The table `name` (pipeline.yaml syntax, unqualified: the pipeline's first schema), its captured
        columns with their types, and its replica key (the configured override, else the primary key)."""
        table = self.config.table(name)
        columns = source_columns(conn, table.schema_name, table.table_name)
        if table.columns is not None:
            columns = [(c, t) for c, t in columns if table.columns.captures(c)]
        key = table.primary_key or primary_key(conn, table.schema_name, table.table_name)
        return table, columns, key

    def mismatches(
        self, conn: psycopg.Connection, client: Client, tables: list[str], warehouse: psycopg.Connection | None = None
    ) -> list[str]:
        """Differences of each table's ClickHouse replica (or with `warehouse`, its warehouse table)."""
        problems = []
        for name in tables:
            table, columns, key = self.compared(conn, name)
            sink_table = self.config.sink_table(table)
            target = (
                WarehouseReplica(warehouse, self.database, sink_table)
                if warehouse is not None
                else ClickHouseReplica(client, self.database, sink_table)
            )
            try:
                replica = replica_rows(target, columns, key)
            except Exception as exc:  # table not created yet, column not added yet
                problems.append(f"{name}: {str(exc).splitlines()[0][:200]}")
                continue
            source = source_rows(conn, table.schema_name, table.table_name, columns, key)
            problems += [f"{name}: {p}" for p in diff(source, replica)]
        return problems

    def wait_until_replica_matches(
        self,
        conn: psycopg.Connection,
        client: Client,
        tables: list[str],
        timeout: float = 300,
        warehouse: psycopg.Connection | None = None,
    ) -> int:
        """Wait until every table's replica (ClickHouse, or with `warehouse` the warehouse table) equals its
        source; returns how many rows were compared."""
        deadline = time.monotonic() + timeout
        problems: list[str] = ["not checked yet"]
        while time.monotonic() < deadline:
            problems = self.mismatches(conn, client, tables, warehouse)
            if not problems:
                return sum(
                    len(source_rows(conn, t.schema_name, t.table_name, columns, key))
                    for t, columns, key in (self.compared(conn, name) for name in tables)
                )
            if self.stream is not None and not self.stream_alive():
                raise AssertionError(f"the stream exited:\n{self.log_tail()}")
            time.sleep(3)
        raise AssertionError("replica does not match the source:\n" + "\n".join(problems[:20]) + "\n" + self.log_tail())


def write_schema_pipeline(
    name: str,
    tables: list[str | dict[str, Any]],
    work_dir: Path,
    *,
    trigger: str = "1 seconds",
    schema: str | None = None,
    stream: dict[str, Any] | None = None,
    table_options: dict[str, dict[str, Any]] | None = None,
    clickhouse: dict[str, Any] | None = None,
    aggregates: list[dict[str, Any]] | None = None,
    **source: Any,
) -> tuple[PipelineConfig, Path]:
    """A pipeline over the tables of PostgreSQL schema `schema` (pipeline.yaml syntax; default `name`),
    replicated to ClickHouse database `name`, written to `work_dir/<name>.yaml`. A table given by name is
    replicated under its own name (with `table_options[name]` added to its entry); a dict is a whole
    `tables` entry (an unqualified name means `schema`). `source` adds source settings, `stream` stream
    settings, `clickhouse` sink.clickhouse keys, `aggregates` the aggregates section."""
    schema = schema or name
    raw = {
        "name": name,
        "source": {
            "schemas": [schema],
            "signal_table": f"{schema}.cdc_signal",
            "heartbeat_table": None,
            "heartbeat_interval_ms": 5000,
            **source,
        },
        "tables": [
            t
            if isinstance(t, dict)
            else {"name": f"{schema}.{t}", "clickhouse_table": t, **(table_options or {}).get(t, {})}
            for t in tables
        ],
        "sink": {"clickhouse": {"database": name, **(clickhouse or {})}},
        "stream": {"trigger_interval": trigger, "max_offsets_per_trigger": 2000, **(stream or {})},
    }
    if aggregates:
        raw["aggregates"] = aggregates
    config = parse_pipeline_config(raw, source=f"{name}.yaml")
    config_path = work_dir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    return config, config_path


@contextmanager
def pipeline_for_schema(
    settings: Settings,
    name: str,
    tables: list[str | dict[str, Any]],
    work_dir: Path,
    trigger: str = "1 seconds",
    schema: str | None = None,
    before_provision: Callable[[PipelineConfig], None] | None = None,
    **options: Any,
) -> Iterator[RunningPipeline]:
    """Provision a connector for the tables of schema `schema` (default `name`; tables already created by
    the caller, see `write_schema_pipeline`, which also takes `options`); stop and remove everything
    afterwards, also when the test fails. `before_provision` runs after the source is prepared, just
    before the connector is created."""
    config, config_path = write_schema_pipeline(name, tables, work_dir, trigger=trigger, schema=schema, **options)
    connect = KafkaConnectResource(url=settings.connect_url)
    running = RunningPipeline(
        settings, config, config_path, str(work_dir / "checkpoint"), name, name, work_dir / "stream.log"
    )
    prepare_source(settings.postgres_conninfo(), config)
    try:
        if before_provision is not None:
            before_provision(config)
        provision_connector(connect, config, settings)
        yield running
    finally:
        running.kill_stream(signal.SIGTERM)
        remove_pipeline(settings, config)


def remove_pipeline(settings: Settings, config: PipelineConfig) -> None:
    """Delete the connector, then its slot (once inactive) and publication; errors do not stop cleanup."""
    connect = KafkaConnectResource(url=settings.connect_url)
    with contextlib.suppress(Exception):
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

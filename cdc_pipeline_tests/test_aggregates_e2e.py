"""Aggregates end to end on the real stack: after random inserts, updates (status, amount, event time,
primary key) and deletes, every aggregate table equals a recomputation from the source rows (done here
in Python, independently of the SQL) and from the replica (the asset check's SQL); and still does after
the driver is killed with SIGKILL and restarted, and after the replay job re-applies the whole topic."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from clickhouse_connect.driver.client import Client
from confluent_kafka import TopicPartition
from dagster import DagsterInstance, SensorResult, build_sensor_context
from psycopg import sql

from cdc_pipeline.config import AggregateConfig
from cdc_pipeline.definitions import build_definitions
from cdc_pipeline.resources import ClickHouseResource, ControlPlaneResource, KafkaResource
from cdc_pipeline.settings import Settings
from cdc_pipeline.streaming import replay as replay_app
from cdc_pipeline.streaming.aggregates import LATE_TABLE, compare, to_micros, window_starts
from cdc_pipeline.streaming.launch import SparkSubmit, submit_env
from cdc_pipeline.workload.ecommerce import Workload, create_schema
from cdc_pipeline_tests.replica import RunningPipeline, pipeline_for_schema

pytestmark = pytest.mark.integration

BASE = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
SPAN_US = 3 * 3600 * 1_000_000  # event times within three hours: windows hold many rows


class ClusteredWorkload(Workload):
    """The e-commerce workload with order times within three hours, so windows hold several orders."""

    def _ts(self) -> datetime:
        return BASE + timedelta(microseconds=self.rng.randrange(SPAN_US))


def aggregates_for(schema: str) -> list[dict[str, Any]]:
    table = f"{schema}.orders"
    return [
        {
            "name": "orders_per_minute", "table": table, "event_time": "created_at", "window": {"size": "1 minute"},
            "watermark_delay": "30 seconds", "group_by": ["status"],
            "measures": [
                {"name": "orders", "function": "count"}, {"name": "revenue", "function": "sum", "column": "total"},
                {"name": "avg_total", "function": "avg", "column": "total"},
                {"name": "min_total", "function": "min", "column": "total"},
                {"name": "last_order", "function": "max", "column": "created_at"},
            ],
        },
        {
            "name": "revenue_5m_sliding", "table": table, "event_time": "created_at",
            "window": {"size": "5 minutes", "slide": "1 minute"}, "watermark_delay": "1 minute",
            "filter": "status <> 'cancelled'",
            "measures": [{"name": "revenue", "function": "sum", "column": "total"},
                         {"name": "orders", "function": "count"}],
        },
        {
            "name": "customers_per_hour", "table": table, "event_time": "created_at", "window": {"size": "1 hour"},
            "watermark_delay": "5 minutes", "group_by": ["note"],  # a Nullable group column
            "measures": [{"name": "customers", "function": "approx_count_distinct", "column": "customer_id"}],
        },
    ]  # fmt: skip


def expected_from_source(conn: psycopg.Connection, schema: str, aggregate: AggregateConfig) -> dict:
    """(window start µs, group...) -> measures, computed in Python from the source rows."""
    rows = conn.execute(
        sql.SQL("SELECT customer_id, status, total, note, created_at FROM {}.orders").format(sql.Identifier(schema))
    ).fetchall()
    buckets: dict[tuple, list[dict]] = defaultdict(list)
    for customer_id, status, total, note, created_at in rows:
        row = {"customer_id": customer_id, "status": status, "total": total, "note": note, "created_at": created_at}
        if aggregate.filter and status == "cancelled":
            continue
        for start in window_starts(to_micros(created_at), aggregate.window.size_us, aggregate.window.slide_us):
            buckets[(start, *(row[g] for g in aggregate.group_by))].append(row)
    return {
        key: tuple(_measure(m.function, [r[m.column] for r in members] if m.column else None, len(members))
                   for m in aggregate.measures)
        for key, members in buckets.items()
    }  # fmt: skip


def _measure(function: str, values: list | None, rows: int) -> Any:
    if function == "count":
        return rows if values is None else sum(v is not None for v in values)
    assert values is not None
    if function == "sum":
        return sum(values, Decimal(0))
    if function == "avg":
        return float(sum(values, Decimal(0)) / len(values))
    if function == "approx_count_distinct":
        return len(set(values))
    return min(values) if function == "min" else max(values)


def stored(client: Client, database: str, aggregate: AggregateConfig) -> dict:
    names = ", ".join(f"`{n}`" for n in [*aggregate.group_by, *(m.name for m in aggregate.measures)])
    rows = client.query(
        f"SELECT window_start, {names} FROM `{database}`.`{aggregate.sink_table}` FINAL WHERE _is_deleted = 0",
        query_tz="UTC",
    ).result_rows
    width = 1 + len(aggregate.group_by)
    return {(to_micros(r[0]), *r[1:width]): tuple(r[width:]) for r in rows}


def differences(expected: dict, actual: dict) -> list[str]:
    problems = [f"missing {k}: {expected[k]}" for k in sorted(expected.keys() - actual.keys(), key=str)]
    problems += [f"extra {k}: {actual[k]}" for k in sorted(actual.keys() - expected.keys(), key=str)]
    for key in sorted(expected.keys() & actual.keys(), key=str):
        for want, got in zip(expected[key], actual[key], strict=True):
            if isinstance(want, float):
                same = abs(want - float(got)) <= 1e-9 * max(1.0, abs(want))
            elif isinstance(want, datetime):
                same = to_micros(want) == to_micros(got)
            else:
                same = want == got
            if not same:
                problems.append(f"{key}: stored {actual[key]} != source {expected[key]}")
                break
    return problems


def wait_until_aggregates_match(
    running: RunningPipeline, conn: psycopg.Connection, client: Client, timeout: float = 600
) -> None:
    """Every aggregate equals the source's recomputation, and the asset check's SQL comparison passes."""
    deadline = time.monotonic() + timeout
    problems = ["not checked yet"]
    while time.monotonic() < deadline:
        problems = []
        for aggregate in running.config.aggregates:
            try:
                actual = stored(client, running.database, aggregate)
            except Exception as exc:  # the table is created with the first change
                problems.append(f"{aggregate.name}: {str(exc).splitlines()[0][:200]}")
                continue
            expected = expected_from_source(conn, running.schema, aggregate)
            problems += [f"{aggregate.name}: {p}" for p in differences(expected, actual)]
            if not problems:
                check = compare(client, running.config, running.database, aggregate, closed_only=False)
                if not check.ok:
                    problems.append(f"{aggregate.name}: {check.summary()}")
        if not problems:
            return
        if running.stream is not None and not running.stream_alive():
            raise AssertionError(f"the stream exited:\n{running.log_tail()}")
        time.sleep(3)
    raise AssertionError("aggregates differ:\n" + "\n".join(problems[:20]) + "\n" + running.log_tail())


def change_orders(conn: psycopg.Connection, workload: ClusteredWorkload, rng: random.Random, changes: int) -> None:
    """Random changes of orders only: inserts, updates of status or key (the workload's), moves of an order's
    time and amount (to another window), and deletes, five per transaction."""
    table = sql.SQL("{}.orders").format(sql.Identifier(workload.schema))
    for start in range(0, changes, 5):
        with conn.transaction():
            for _ in range(min(5, changes - start)):
                roll = rng.random()
                if roll < 0.45 or not workload.live["orders"]:
                    workload.insert(conn, "orders")
                elif roll < 0.65:
                    workload.update(conn, "orders")
                elif roll < 0.85:
                    key = rng.choice(workload.live["orders"])
                    conn.execute(
                        sql.SQL("UPDATE {} SET created_at = %s, total = %s WHERE id = %s").format(table),
                        (workload._ts(), Decimal(rng.randrange(0, 10**7)) / 100, key),
                    )
                else:
                    workload.delete(conn, "orders")


def replay_whole_topic(settings: Settings, running: RunningPipeline, workdir: Path) -> dict:
    topic = running.config.topic_for(running.config.table(f"{running.schema}.orders"))
    consumer = KafkaResource(bootstrap_servers=settings.kafka_bootstrap_servers).consumer("aggregates-replay-probe")
    try:
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10, cached=False)
    finally:
        consumer.close()
    argv = SparkSubmit(master="local[2]", jvm_cache_dir=settings.jvm_cache_dir).argv(
        replay_app.__file__, "--config", str(running.config_path),
        "--starting-offsets", json.dumps({topic: {"0": 0}}), "--ending-offsets", json.dumps({topic: {"0": high}}),
        "--result-file", str(workdir / "replay-result.json"),
        name=f"{running.config.query_name}_replay",
    )  # fmt: skip
    done = subprocess.run(
        argv, env=submit_env(master="local[2]"), capture_output=True, text=True, timeout=900, start_new_session=True
    )
    result = replay_app.read_result(workdir / "replay-result.json")
    assert done.returncode == 0 and result is not None, "\n".join((done.stdout + done.stderr).splitlines()[-40:])
    return result


def test_aggregates_follow_updates_deletes_a_driver_kill_and_a_replay(
    settings: Settings,
    source: psycopg.Connection,
    clickhouse: Client,
    clickhouse_url: str,
    unique_name: str,
    tmp_path: Path,
) -> None:
    create_schema(source, unique_name)
    workload = ClusteredWorkload(unique_name, seed=int(unique_name[2:], 16) % 10_000)
    rng = random.Random(workload.seed)
    for _ in range(100):  # snapshot rows
        workload.insert(source, "orders")
    with pipeline_for_schema(
        settings, unique_name, ["orders"], tmp_path, aggregates=aggregates_for(unique_name)
    ) as running:
        # 1. A random workload while the stream runs.
        running.start_stream()
        running.wait_until_replica_matches(source, clickhouse, ["orders"], timeout=600)  # the snapshot: a watermark
        change_orders(source, workload, rng, 600)
        running.wait_until_replica_matches(source, clickhouse, ["orders"], timeout=600)
        wait_until_aggregates_match(running, source, clickhouse)
        late = clickhouse.command(
            f"SELECT count() FROM `{running.database}`.{LATE_TABLE} FINAL WHERE aggregate = 'orders_per_minute'"
        )
        assert int(late) > 0  # event times are random within three hours: many changes touch closed windows
        for aggregate in running.config.aggregates:
            check = compare(clickhouse, running.config, running.database, aggregate)
            assert check.ok and check.compared_rows > 0, check.summary()

        # 2. The driver killed with SIGKILL at random points while changes go on, then restarted.
        for _round in range(2):
            change_orders(source, workload, rng, 300)
            time.sleep(rng.uniform(5, 20))
            running.kill_stream(signal.SIGKILL)
            change_orders(source, workload, rng, 100)
            running.start_stream()
        change_orders(source, workload, rng, 200)
        running.wait_until_replica_matches(source, clickhouse, ["orders"], timeout=600)
        wait_until_aggregates_match(running, source, clickhouse)

        # 3. The stream stopped, and the replay job re-applies the whole topic: nothing counts twice.
        running.kill_stream(signal.SIGTERM)
        summary = replay_whole_topic(settings, running, tmp_path)
        assert summary["records"] > 1000, summary
        wait_until_aggregates_match(running, source, clickhouse, timeout=30)

        # 4. Dagster: the check passes, finds a tampered closed window, and materializing repairs it; the
        # metrics sensor records rates and late changes as observations.
        resources = {
            "clickhouse": ClickHouseResource(
                url=clickhouse_url, password=os.environ["CDC_CLICKHOUSE_PASSWORD"], database=running.database
            ),
            "control_plane": ControlPlaneResource(config_path=str(running.config_path), stack_dir=str(tmp_path)),
        }
        defs = build_definitions(running.config, running.config_path, resources)
        instance = DagsterInstance.ephemeral()

        def checks() -> dict[str, Any]:
            result = defs.resolve_job_def("check_aggregates").execute_in_process(instance=instance)
            return {e.asset_key.path[-1]: e for e in result.get_asset_check_evaluations()}

        evaluations = checks()
        assert len(evaluations) == 3 and all(e.passed for e in evaluations.values()), evaluations
        assert evaluations["orders_per_minute"].metadata["compared_rows"].value > 0
        assert evaluations["orders_per_minute"].metadata["late_changes"].value > 0
        table = f"`{running.database}`.agg_orders_per_minute"
        clickhouse.command(
            f"INSERT INTO {table} SELECT * REPLACE (orders + 1 AS orders, _version + 1 AS _version) FROM {table} "
            "FINAL WHERE _is_deleted = 0 ORDER BY window_start LIMIT 1"
        )
        evaluations = checks()
        assert not evaluations["orders_per_minute"].passed
        assert evaluations["orders_per_minute"].metadata["different"].value == 1
        assert defs.resolve_job_def("rebuild_aggregates").execute_in_process(instance=instance).success
        assert all(e.passed for e in checks().values())
        sensor = f"{running.config.name}_aggregate_metrics"
        context = build_sensor_context(instance=instance, definitions=defs, sensor_name=sensor, resources=resources)
        metrics = defs.get_sensor_def(sensor)(context)
        assert isinstance(metrics, SensorResult) and len(metrics.asset_events) == 3
        observed = {e.asset_key.path[-1]: e.metadata for e in metrics.asset_events}
        assert observed["orders_per_minute"]["changes"].value > 0
        assert observed["orders_per_minute"]["late_changes"].value > 0
        assert observed["revenue_5m_sliding"]["watermark"].value

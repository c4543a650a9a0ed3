"""The PostgreSQL warehouse sink end to end: one table replicated to ClickHouse and the warehouse, one to
the warehouse only; random inserts, updates and deletes (with large TOASTed values), a stream killed with
SIGKILL mid-way, a truncate and an added column with a default. Both replicas equal the source row for row."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import psycopg
import pytest
from clickhouse_connect.driver.client import Client
from dagster import DagsterInstance

from cdc_pipeline.definitions import build_definitions
from cdc_pipeline.resources import (
    ClickHouseResource,
    ControlPlaneResource,
    KafkaConnectResource,
    KafkaResource,
    MonitorResource,
    PostgresResource,
)
from cdc_pipeline.settings import Settings
from cdc_pipeline_tests.replica import RunningPipeline, pipeline_for_schema

pytestmark = pytest.mark.integration


def changes(conn: psycopg.Connection, schema: str, rng: random.Random, n: int) -> None:
    for _ in range(n):
        table = rng.choice(["accounts", "notes"])
        key = rng.randint(1, 60)
        action = rng.random()
        with conn.transaction():
            if table == "accounts":
                if action < 0.6:
                    conn.execute(
                        f'INSERT INTO "{schema}".accounts (id, owner, balance, tags, profile, photo, seen_at) '
                        "VALUES (%s, %s, %s, %s, %s, %s, now()) ON CONFLICT (id) DO UPDATE SET balance = "
                        "EXCLUDED.balance, seen_at = EXCLUDED.seen_at",
                        (key, f"owner {key} ✓", rng.randint(-10**6, 10**6) / 100, [f"t{key}", None],
                         f'{{"k": {key}, "big": "{"x" * rng.choice([10, 5000])}"}}',
                         rng.randbytes(rng.choice([3, 9000]))),
                    )  # fmt: skip
                elif action < 0.85:
                    conn.execute(f'UPDATE "{schema}".accounts SET balance = balance + 1 WHERE id = %s', (key,))
                else:
                    conn.execute(f'DELETE FROM "{schema}".accounts WHERE id = %s', (key,))
            else:
                if action < 0.6:
                    conn.execute(
                        f'INSERT INTO "{schema}".notes (id, body) VALUES (%s, %s) ON CONFLICT (id) DO UPDATE '
                        "SET body = EXCLUDED.body",
                        (key, "note " + "y" * rng.choice([5, 4000])),
                    )
                elif action < 0.8:
                    conn.execute(f'UPDATE "{schema}".notes SET n = n + 1 WHERE id = %s', (key,))
                else:
                    conn.execute(f'DELETE FROM "{schema}".notes WHERE id = %s', (key,))


def control_resources(settings: Settings, running: RunningPipeline) -> dict:
    secret = settings.warehouse_password.get_secret_value() if settings.warehouse_password else None
    return {
        "postgres": PostgresResource(dsn=settings.postgres_dsn, password=settings.postgres_password.get_secret_value()),
        "warehouse": PostgresResource(dsn=settings.warehouse_dsn, password=secret),
        "kafka": KafkaResource(bootstrap_servers=settings.kafka_bootstrap_servers),
        "kafka_connect": KafkaConnectResource(url=settings.connect_url),
        "clickhouse": ClickHouseResource(
            url=settings.clickhouse_endpoint, password=settings.clickhouse_password.get_secret_value(),
            database=running.database,
        ),
        "control_plane": ControlPlaneResource(
            config_path=str(running.config_path), stack_dir=str(running.config_path.parent),
            control_dir=str(running.config_path.parent / "control"), checkpoint_location=running.checkpoint,
        ),
        "monitor": MonitorResource(check_wait_s=60),
    }  # fmt: skip


def test_warehouse_replicas_equal_the_source_after_changes_a_kill_and_a_truncate(
    settings: Settings,
    source: psycopg.Connection,
    clickhouse: Client,
    warehouse: psycopg.Connection,
    unique_name: str,
    tmp_path: Path,
) -> None:
    schema = unique_name
    source.execute(f'CREATE SCHEMA "{schema}"')
    source.execute(
        f'CREATE TABLE "{schema}".accounts (id int PRIMARY KEY, owner text NOT NULL, balance numeric(12,2), '
        "tags text[], profile jsonb, photo bytea, seen_at timestamptz, opened date DEFAULT '2020-02-29')"
    )
    source.execute(f'CREATE TABLE "{schema}".notes (id bigint PRIMARY KEY, body text, n int NOT NULL DEFAULT 0)')
    rng = random.Random(7)
    changes(source, schema, rng, 150)  # rows before the snapshot
    options = {"accounts": {"sinks": ["clickhouse", "warehouse"]}, "notes": {"sinks": ["warehouse"]}}
    try:
        with pipeline_for_schema(
            settings, unique_name, ["accounts", "notes"], tmp_path, table_options=options
        ) as running:
            running.start_stream()
            changes(source, schema, rng, 300)
            time.sleep(rng.uniform(10, 25))
            running.kill_stream(signal.SIGKILL)  # somewhere in the middle of a batch
            changes(source, schema, rng, 200)
            running.start_stream()
            source.execute(f'TRUNCATE "{schema}".notes')
            changes(source, schema, rng, 200)
            source.execute(f"ALTER TABLE \"{schema}\".notes ADD COLUMN label text DEFAULT 'plain'")
            changes(source, schema, rng, 100)
            compared = running.wait_until_replica_matches(
                source, clickhouse, ["accounts", "notes"], timeout=600, warehouse=warehouse
            )
            assert compared > 50
            running.wait_until_replica_matches(source, clickhouse, ["accounts"], timeout=300)
            # No ClickHouse table for the warehouse-only table.
            assert not int(clickhouse.command(f"EXISTS TABLE `{unique_name}`.`notes`"))
            old_labels = warehouse.execute(
                f'SELECT count(*) FROM "{unique_name}".notes_live WHERE label IS DISTINCT FROM %s', ("plain",)
            ).fetchone()
            assert old_labels == (0,)  # every row read 'plain', rows written before the column too
            assert running.stream_alive(), running.log_tail()

            # The control plane sees the warehouse tables: the four checks pass; reconcile finds a row deleted
            # behind the pipeline's back and repairs it (backfill of its key).
            defs = build_definitions(running.config, running.config_path, control_resources(settings, running))
            instance = DagsterInstance.ephemeral()
            checks = defs.resolve_job_def("check_replicas").execute_in_process(instance=instance)
            evaluations = {
                (e.asset_key.path[-2], e.asset_key.path[-1], e.check_name): e
                for e in checks.get_asset_check_evaluations()
            }
            assert len(evaluations) == 12, sorted(evaluations)  # accounts twice, notes once
            assert all(e.passed for e in evaluations.values()), {k: e.metadata for k, e in evaluations.items()}
            deleted = warehouse.execute(
                f'DELETE FROM "{unique_name}".notes WHERE _is_deleted = 0 AND id = '
                f'(SELECT min(id) FROM "{unique_name}".notes WHERE _is_deleted = 0) RETURNING id'
            ).fetchone()
            assert deleted is not None
            failed = defs.resolve_job_def("reconcile_tables").execute_in_process(
                run_config={"ops": {"reconcile_op": {"config": {"settle_s": 30}}}},
                instance=instance,
                raise_on_error=False,
            )
            assert not failed.success
            repaired = defs.resolve_job_def("reconcile_tables").execute_in_process(
                run_config={"ops": {"reconcile_op": {"config": {"settle_s": 30, "backfill_differences": True}}}},
                instance=instance,
            )
            report = repaired.output_for_node("reconcile_op")
            after = report[f"{schema}.notes (warehouse)"]["after_backfill"]
            assert after == {"missing": 0, "extra": 0, "different": 0}, report
    finally:
        source.execute(f'DROP SCHEMA "{schema}" CASCADE')
        warehouse.execute(f'DROP SCHEMA IF EXISTS "{unique_name}" CASCADE')
        clickhouse.command(f"DROP DATABASE IF EXISTS `{unique_name}`")

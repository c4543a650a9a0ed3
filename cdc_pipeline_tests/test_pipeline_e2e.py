"""End to end on the real stack: PostgreSQL -> Debezium -> Kafka -> Spark -> ClickHouse. After the
stream catches up, ClickHouse `FINAL` (deleted rows hidden) equals PostgreSQL row for row, every column."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from clickhouse_connect.driver.client import Client

from cdc_pipeline.clickhouse import connect_clickhouse
from cdc_pipeline.settings import Settings
from cdc_pipeline.stack.stack import LocalStack
from cdc_pipeline.workload.ecommerce import TABLES, Workload, create_schema
from cdc_pipeline_tests.replica import RunningPipeline, pipeline_for_schema

pytestmark = pytest.mark.integration


@pytest.fixture
def source(settings: Settings, local_stack: LocalStack) -> Iterator[psycopg.Connection]:
    with psycopg.connect(settings.postgres_conninfo(), autocommit=True) as conn:
        yield conn


@pytest.fixture
def clickhouse(settings: Settings, local_stack: LocalStack) -> Iterator[Client]:
    client = connect_clickhouse(settings.clickhouse_endpoint, settings.clickhouse_user)
    yield client
    client.close()


@pytest.fixture
def shop(
    settings: Settings, source: psycopg.Connection, unique_name: str, tmp_path: Path
) -> Iterator[tuple[RunningPipeline, Workload]]:
    """The e-commerce schema with rows already present before the connector starts (snapshot)."""
    create_schema(source, unique_name)
    workload = Workload(unique_name, seed=int(unique_name[2:], 16) % 10_000)
    for table in TABLES:
        for _ in range(50):
            workload.insert(source, table)
    with pipeline_for_schema(settings, unique_name, list(TABLES), tmp_path) as running:
        yield running, workload


def test_snapshot_and_random_changes_arrive_exactly(shop, source: psycopg.Connection, clickhouse: Client) -> None:  # noqa: ANN001
    running, workload = shop
    running.start_stream()
    workload.run(source, 3000)
    assert running.wait_until_replica_matches(source, clickhouse, list(TABLES), timeout=600) > 500


def test_driver_killed_mid_stream_resumes_without_loss_or_duplicates(
    shop, source: psycopg.Connection, clickhouse: Client
) -> None:  # noqa: ANN001
    running, workload = shop
    rng = random.Random(7)
    for _round in range(3):
        running.start_stream()
        workload.run(source, 600)
        time.sleep(rng.uniform(15, 35))  # somewhere in the middle of startup or a batch
        running.kill_stream(signal.SIGKILL)
    running.start_stream()
    workload.run(source, 300)
    assert running.wait_until_replica_matches(source, clickhouse, list(TABLES), timeout=600) > 500
    # wait_until_replica_matches also fails on any duplicate key in the FINAL view.

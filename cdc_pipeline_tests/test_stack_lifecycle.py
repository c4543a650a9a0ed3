"""`cdc-pipeline stack up | down | status` as a user runs it: idempotent up, a down that leaves no
process and no open port, and data that survives down + up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import psycopg
import pytest
from confluent_kafka import Consumer, Producer
from psycopg import sql

from cdc_pipeline.clickhouse_client import connect_clickhouse
from cdc_pipeline.process import port_open
from cdc_pipeline.settings import Settings
from cdc_pipeline.stack.lifecycle import LocalStack

pytestmark = pytest.mark.integration
SERVICES = {"postgres", "kafka", "connect", "clickhouse"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cdc_pipeline.cli", "stack", *args],
        capture_output=True, text=True, env=dict(os.environ), timeout=600,
        cwd=os.environ["CDC_STACK_DIR"],  # away from a developer's .env: the test stack is set by env only
    )  # fmt: skip


def _ch_password(settings: Settings) -> str:
    assert settings.clickhouse_password is not None
    return settings.clickhouse_password.get_secret_value()


def status_json() -> dict[str, dict]:
    result = cli("status", "--json")
    return json.loads(result.stdout)


def test_status_json_reports_every_service_healthy(local_stack: LocalStack) -> None:
    result = cli("status", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    status = json.loads(result.stdout)
    assert set(status) == SERVICES
    for name, entry in status.items():
        assert entry["healthy"], (name, entry)
        assert entry["pid"] and psutil.pid_exists(entry["pid"]), (name, entry)
        assert entry["endpoint"]
    assert local_stack.settings.postgres_password.get_secret_value() not in result.stdout


def test_second_up_is_a_no_op(local_stack: LocalStack) -> None:
    before = {name: entry["pid"] for name, entry in status_json().items()}
    result = cli("up")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Starting" not in result.stdout
    assert {name: entry["pid"] for name, entry in status_json().items()} == before


def test_down_frees_everything_and_up_keeps_the_data(
    local_stack: LocalStack, settings: Settings, unique_name: str
) -> None:
    # Given data in each store,
    with psycopg.connect(settings.postgres_conninfo(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} AS SELECT 42 AS answer").format(sql.Identifier(unique_name)))
    ch = connect_clickhouse(
        settings.clickhouse_endpoint, password=_ch_password(settings), database=settings.clickhouse_database
    )
    ch.command(f"CREATE TABLE {unique_name} (k UInt32) ENGINE = MergeTree ORDER BY k")
    ch.insert(unique_name, [[7]], column_names=["k"])
    ch.close()
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
    producer.produce(unique_name, value=b"kept")
    assert producer.flush(30) == 0
    del producer  # an idle client would log connection failures while the broker is down
    pids = [entry["pid"] for entry in status_json().values()]

    # when the stack goes down, no process of it is left and every port is free,
    result = cli("down")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
    for service in local_stack.services:
        for host, port in service.ports():
            assert not port_open(host, port), f"{service.name} still listens on {port}"
    assert cli("status").returncode == 1

    # and when it comes back, the data is still there.
    result = cli("up")
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(entry["healthy"] for entry in status_json().values())
    with psycopg.connect(settings.postgres_conninfo()) as conn:
        assert conn.execute(sql.SQL("SELECT answer FROM {}").format(sql.Identifier(unique_name))).fetchone() == (42,)
    ch = connect_clickhouse(
        settings.clickhouse_endpoint, password=_ch_password(settings), database=settings.clickhouse_database
    )
    assert ch.query(f"SELECT k FROM {unique_name}").result_rows == [(7,)]
    ch.close()
    consumer = Consumer({
        "bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": unique_name, "auto.offset.reset": "earliest",
    })  # fmt: skip
    consumer.subscribe([unique_name])
    try:
        message = None
        for _ in range(60):
            message = consumer.poll(1.0)
            if message is not None and message.error() is None:
                break
        assert message is not None and message.value() == b"kept"
    finally:
        consumer.close()


def test_up_fails_clearly_when_a_port_is_taken(local_stack: LocalStack, settings: Settings, tmp_path) -> None:  # noqa: ANN001
    # A second stack pointed at the running one's PostgreSQL port must refuse, naming service and port.
    other_dir = tmp_path / "other"
    env = dict(os.environ, CDC_STACK_DIR=str(other_dir))
    result = subprocess.run(
        [sys.executable, "-m", "cdc_pipeline.cli", "stack", "up"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "postgres" in result.stderr and settings.postgres_params["port"] in result.stderr

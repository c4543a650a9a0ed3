"""One translator everywhere: a custom `CdcTranslator` subclass passed to `build_definitions` decides
the keys of the assets and checks, and the keys the jobs and sensors record observations and alerts
to (a job or sensor that built its own default translator would record to keys no asset has)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from dagster import AssetKey, DagsterInstance, Definitions, SensorResult, build_sensor_context

from cdc_pipeline.clickhouse_client import connect_clickhouse
from cdc_pipeline.config import TableConfig
from cdc_pipeline.definitions import build_definitions
from cdc_pipeline.defs.translator import CdcTranslator
from cdc_pipeline.resources import (
    ClickHouseResource,
    ControlPlaneResource,
    KafkaConnectResource,
    KafkaResource,
    MonitorResource,
    NotifierResource,
    PostgresResource,
    SparkResource,
)
from cdc_pipeline.settings import Settings
from cdc_pipeline.stack.lifecycle import LocalStack
from cdc_pipeline_tests.replica import write_schema_pipeline
from cdc_pipeline_tests.test_control_plane import Webhook

PREFIX = "team_x"


class PrefixedTranslator(CdcTranslator):
    """Every key under `team_x/`."""

    def source_key(self, table: TableConfig) -> AssetKey:
        return super().source_key(table).with_prefix(PREFIX)

    def connector_key(self) -> AssetKey:
        return super().connector_key().with_prefix(PREFIX)

    def topic_key(self, table: TableConfig) -> AssetKey:
        return super().topic_key(table).with_prefix(PREFIX)

    def stream_key(self) -> AssetKey:
        return super().stream_key().with_prefix(PREFIX)

    def sink_key(self, table: TableConfig) -> AssetKey:
        return super().sink_key(table).with_prefix(PREFIX)

    def warehouse_key(self, table: TableConfig) -> AssetKey:
        return super().warehouse_key(table).with_prefix(PREFIX)


def test_the_translator_is_a_pure_function_of_its_arguments() -> None:
    from cdc_pipeline.config import load_pipeline_config

    pipeline = load_pipeline_config(Path(__file__).parents[1] / "pipeline.yaml")
    translator = CdcTranslator(pipeline, database="analytics", connector={"database.hostname": "db.example"})
    sink = translator.sink_spec(pipeline.tables[0])
    assert sink.metadata["database"] == "analytics"
    assert translator.connector_spec().metadata["config"].value["database.hostname"] == "db.example"
    settings = Settings(_env_file=None, postgres_dsn="postgresql://cdc@db.example:6543/shop", clickhouse_database="a")
    from_settings = CdcTranslator.from_settings(pipeline, settings)
    assert from_settings.database == "a" and from_settings.connector["database.port"] == "6543"


@pytest.fixture
def prefixed(
    settings: Settings, local_stack: LocalStack, clickhouse_url: str, tmp_path: Path
) -> Iterator[tuple[Definitions, CdcTranslator, dict[str, Any], Webhook, psycopg.Connection]]:
    name = f"tr_{os.urandom(4).hex()}"
    config, config_path = write_schema_pipeline(name, ["items"], tmp_path)
    webhook = Webhook()
    clickhouse = connect_clickhouse(clickhouse_url, "default", os.environ["CDC_CLICKHOUSE_PASSWORD"])
    clickhouse.command(f"CREATE DATABASE {name}")  # the replica database, without the replica table yet
    with psycopg.connect(settings.postgres_conninfo(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}; CREATE TABLE {name}.items (id int PRIMARY KEY, label text)")
        resources = {
            "postgres": PostgresResource(
                dsn=settings.postgres_dsn, password=settings.postgres_password.get_secret_value()
            ),
            "kafka": KafkaResource(bootstrap_servers=settings.kafka_bootstrap_servers),
            "kafka_connect": KafkaConnectResource(url=settings.connect_url),
            "spark": SparkResource(master="local[1]", jvm_cache_dir=str(settings.jvm_cache_dir)),
            "clickhouse": ClickHouseResource(
                url=clickhouse_url, password=os.environ["CDC_CLICKHOUSE_PASSWORD"], database=name
            ),
            "control_plane": ControlPlaneResource(
                config_path=str(config_path), stack_dir=str(tmp_path), control_dir=str(tmp_path / "control")
            ),
            "notifier": NotifierResource(webhook_url=webhook.url),
            "monitor": MonitorResource(check_wait_s=0, lag_window=2),
        }
        translator = PrefixedTranslator.from_settings(config, settings)
        defs = build_definitions(
            config, config_path, resources, translator=translator, checks_cron="0 * * * *", observe_cron="0 * * * *"
        )
        try:
            yield defs, translator, resources, webhook, conn
        finally:
            webhook.close()
            conn.execute(f"DROP SCHEMA {name} CASCADE")
            clickhouse.command(f"DROP DATABASE {name}")
            clickhouse.close()


def test_a_custom_translator_names_every_key(
    prefixed: tuple[Definitions, CdcTranslator, dict[str, Any], Webhook, psycopg.Connection],
) -> None:
    defs, translator, resources, webhook, conn = prefixed
    graph = defs.get_repository_def().asset_graph
    asset_keys = set(graph.get_all_asset_keys())
    assert asset_keys and all(key.path[0] == PREFIX for key in asset_keys), asset_keys
    check_keys = graph.asset_check_keys
    assert check_keys and all(key.asset_key.path[0] == PREFIX for key in check_keys)
    instance = DagsterInstance.ephemeral()

    def observed(result: Any) -> list[AssetKey]:
        return [e.asset_key for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"]

    def run(job: str, ok: bool = True, run_config: dict | None = None) -> Any:
        result = defs.resolve_job_def(job).execute_in_process(
            instance=instance, raise_on_error=False, run_config=run_config or {}
        )
        assert result.success == ok, job
        return result

    # Jobs: their observations go to the custom keys (which are the assets' keys).
    recorded = observed(run("stop_stream")) + observed(run("stream_status"))
    reconcile = {"ops": {"reconcile_op": {"config": {"settle_s": 0}}}}
    recorded += observed(run("reconcile_tables", run_config=reconcile))  # an empty table: nothing differs
    # Checks: rows in the source, none replicated (nothing runs), so row_count_matches_source (ERROR) fails...
    conn.execute(
        f"INSERT INTO {translator.pipeline.tables[0].name} SELECT g, 'item ' || g FROM generate_series(1, 5) g"
    )
    checks = run("check_replicas").get_asset_check_evaluations()
    assert {e.asset_key for e in checks} <= asset_keys
    assert any(e.check_name == "row_count_matches_source" and not e.passed for e in checks)

    # Sensors: their observations, and the alert of the failed check, name the custom keys.
    def evaluate(sensor: str) -> Any:
        context = build_sensor_context(instance=instance, resources=resources, definitions=defs, sensor_name=sensor)
        return defs.resolve_sensor_def(sensor)(context)

    for sensor in ("consumer_lag", "checkpoint_health", "replication_health"):
        result = evaluate(sensor)
        assert isinstance(result, SensorResult) and result.asset_events, sensor
        recorded += [event.asset_key for event in result.asset_events]
    evaluate("alert_on_check_failure")
    alerts = webhook.texts("check:")
    assert len(alerts) == 1 and f"{PREFIX}/" in alerts[0], webhook.received

    assert all(key in asset_keys for key in recorded), recorded
    table = translator.pipeline.tables[0]
    expected = {translator.stream_key(), translator.connector_key(), translator.topic_key(table)}
    assert expected | set(translator.replica_keys(table)) <= set(recorded), recorded

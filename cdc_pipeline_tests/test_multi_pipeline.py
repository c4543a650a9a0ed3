"""Several pipelines in one code location: `CdcPipelinesComponent` loaded from a `defs.yaml` (as a dg project
loads it) with two pipeline files over two source databases. Every job, op, sensor, schedule and resource key
is the pipeline's own, the asset keys do not meet, and a job and a sensor of each pipeline run against the
real stack, each on its own database."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from dagster import DagsterInstance, Definitions, SensorResult, build_sensor_context
from dagster.components.testing import create_defs_folder_sandbox
from psycopg import sql

from cdc_pipeline.config import PipelineConfig
from cdc_pipeline.defs.component import CdcPipelinesComponent, PipelineFile, load_pipelines
from cdc_pipeline.settings import Settings
from cdc_pipeline.stack.lifecycle import LocalStack
from cdc_pipeline_tests.replica import remove_pipeline, write_schema_pipeline

SECOND_DSN = "MULTI_TEST_POSTGRES_DSN"


@pytest.fixture
def two_databases(settings: Settings, local_stack: LocalStack) -> Iterator[tuple[str, str, str]]:
    """Two pipeline names, one for a schema of the stack's source database and one for a second source
    database (created by the stack's superuser, owned by the `cdc` role, dropped afterwards)."""
    first, second = (f"m{side}_{uuid.uuid4().hex[:8]}" for side in "ab")
    superuser = local_stack.postgres._superuser_conninfo()
    with psycopg.connect(superuser, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER cdc").format(sql.Identifier(second)))
    second_dsn = settings.postgres_dsn.rsplit("/", 1)[0] + f"/{second}"
    password = settings.postgres_password.get_secret_value() if settings.postgres_password else None
    try:
        for dsn, name in ((settings.postgres_dsn, first), (second_dsn, second)):
            with psycopg.connect(dsn, password=password, autocommit=True) as conn:
                conn.execute(f"CREATE SCHEMA {name}; CREATE TABLE {name}.items (id int PRIMARY KEY, label text)")
                conn.execute(f"INSERT INTO {name}.items SELECT g, '{name} ' || g FROM generate_series(1, 3) g")
        yield first, second, second_dsn
    finally:
        with psycopg.connect(settings.postgres_conninfo(), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {first} CASCADE")
        with psycopg.connect(superuser, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(second)))


def _observed_connector(result: Any) -> dict[str, Any]:
    assert isinstance(result, SensorResult) and result.asset_events, result
    (event,) = result.asset_events
    return {"key": event.asset_key, **{k: getattr(v, "value", v) for k, v in event.metadata.items()}}


def test_two_pipelines_in_one_code_location(
    settings: Settings, two_databases: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second, second_dsn = two_databases
    monkeypatch.setenv(SECOND_DSN, second_dsn)
    configs: dict[str, PipelineConfig] = {}
    with create_defs_folder_sandbox() as sandbox:
        folder = sandbox.defs_folder_path / "pipelines"
        folder.mkdir()
        for name in (first, second):
            configs[name], _ = write_schema_pipeline(name, ["items"], folder)
        (folder / "defs.yaml").write_text(
            yaml.safe_dump(
                {
                    "type": "cdc_pipeline.defs.component.CdcPipelinesComponent",
                    "attributes": {
                        "pipelines": [
                            {"path": f"{first}.yaml"},
                            {"path": f"{second}.yaml", "env": {"CDC_POSTGRES_DSN": SECOND_DSN}},
                        ]
                    },
                }
            )
        )
        try:
            with sandbox.load_component_and_build_defs(defs_path=folder) as (component, defs):
                assert isinstance(component, CdcPipelinesComponent)
                _run_both(defs, first, second)
        finally:
            for config in configs.values():
                remove_pipeline(settings, config)


def _run_both(defs: Definitions, first: str, second: str) -> None:
    repository = defs.get_repository_def()
    # Loading validated the names: Dagster refuses two jobs, ops, sensors or schedules of one name.
    jobs = {job.name for job in repository.get_all_jobs()}
    sensors = {sensor.name for sensor in repository.sensor_defs}
    schedules = {schedule.name for schedule in repository.schedule_defs}
    for name in (first, second):
        assert {f"{name}_provision", f"{name}_start_stream", f"{name}_check_services", f"{name}_backfill_table"} <= jobs
        assert {f"{name}_replication_health", f"{name}_consumer_lag", f"{name}_checkpoint_health"} <= sensors
        assert {f"{name}_nightly_reconcile", f"{name}_observe_source_tables_schedule"} <= schedules
        assert {f"{name}_postgres", f"{name}_control_plane", f"{name}_clickhouse", f"{name}_kafka"} <= set(
            defs.resources
        )
    assert "alert_on_run_failure" in sensors and "notifier" in defs.resources  # the location's, once
    assert not {"provision", "start_stream", "postgres", "control_plane"} & (jobs | set(defs.resources))
    keys = {key.path[0] for key in repository.asset_graph.get_all_asset_keys()}
    assert keys == {first, second}, keys  # every asset key starts with its pipeline's name

    # A job of each: provisioning checks its own source database and creates its own connector.
    instance = DagsterInstance.ephemeral()
    databases = {}
    for name in (first, second):
        result = defs.resolve_job_def(f"{name}_provision").execute_in_process(instance=instance, raise_on_error=False)
        assert result.success, [str(e.event_specific_data) for e in result.all_events if e.is_failure]
        (materialization,) = result.asset_materializations_for_node(f"{name}_provision_connector")
        assert materialization.asset_key.path[0] == name
        databases[name] = materialization.metadata["config"].value["database.dbname"]
    assert databases == {first: "shop", second: second}, databases
    # And the observation job (a generator body): each counts the rows of its own source table.
    for name in (first, second):
        result = defs.resolve_job_def(f"{name}_observe_source_tables").execute_in_process(instance=instance)
        (observation,) = [e.event_specific_data.asset_observation for e in result.all_events if e.is_asset_observation]
        assert observation.asset_key.path == [name, "postgres", name, "items"], observation
        assert observation.metadata["row_count"].value == 3, observation.metadata

    # A sensor of each: the replication sensor reads its own slot and connector, and records to its own asset.
    for name in (first, second):
        context = build_sensor_context(
            instance=instance, resources=defs.resources, definitions=defs, sensor_name=f"{name}_replication_health"
        )
        observed = _observed_connector(defs.resolve_sensor_def(f"{name}_replication_health")(context))
        assert observed["key"].path == [name, "debezium_connector"], observed
        assert observed["connector_state"] == "RUNNING", observed
        assert observed["slot_active"] is True, observed


def test_pipelines_that_would_share_a_name_or_a_table_are_refused(tmp_path: Path) -> None:
    shop = tmp_path / "shop.yaml"
    write_schema_pipeline("shop", ["items"], tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    write_schema_pipeline("shop", ["items"], other, schema="other")
    with pytest.raises(ValueError, match="both use the pipeline name 'shop'"):
        load_pipelines([PipelineFile(path=str(shop)), PipelineFile(path="other/shop.yaml")], tmp_path)
    # Another name, but the same ClickHouse database and table.
    write_schema_pipeline("crm", ["items"], tmp_path, schema="crm", clickhouse={"database": "shop"})
    with pytest.raises(ValueError, match=r"both use the table shop\.items in ClickHouse"):
        load_pipelines([PipelineFile(path="shop.yaml"), PipelineFile(path="crm.yaml")], tmp_path)
    # One pipeline: the plain names; several: prefixed by the pipeline name unless set.
    (alone,) = load_pipelines([PipelineFile(path="shop.yaml")], tmp_path)
    assert alone.prefix == ""
    write_schema_pipeline("crm", ["items"], tmp_path, schema="crm")
    both = load_pipelines([PipelineFile(path="shop.yaml", prefix=""), PipelineFile(path="crm.yaml")], tmp_path)
    assert [p.prefix for p in both] == ["", "crm"]

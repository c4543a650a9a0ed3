"""The code location loads: `dg check defs` passes without a Dagster warning, the automation is on by
default, and `dg dev` serves the UI with the pipeline's jobs and resources."""

from __future__ import annotations

import os
import subprocess
import time
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from dagster import BetaWarning

from cdc_pipeline.defs.assets import CHECKS
from cdc_pipeline_tests.conftest import DG, REPO_ROOT, dagster_dev_server


def test_dg_check_defs_passes_without_warnings(tmp_path: Path) -> None:
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")  # an instance, so no "no dagster.yaml"
    result = subprocess.run(
        [DG, "check", "defs"],
        cwd=REPO_ROOT,
        env=dict(os.environ, DAGSTER_HOME=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "All definitions loaded successfully" in output, output
    # No blanket silencing: whatever Dagster warns about (deprecations, beta APIs) would show here.
    assert "Warning" not in output and "WARNING" not in output, output


def test_checks_and_observations_run_by_themselves() -> None:
    from dagster import AssetCheckKey, DefaultScheduleStatus, DefaultSensorStatus

    from cdc_pipeline.definitions import defs

    repository = defs.get_repository_def()
    automation = repository.get_sensor_def("replica_checks_automation")
    assert automation.default_status == DefaultSensorStatus.RUNNING
    checks = {key for key in repository.asset_graph.asset_check_keys if isinstance(key, AssetCheckKey)}
    assert {key.name for key in checks} == {*CHECKS, "matches_replica"}  # the replicas' and the aggregates' checks
    for key in checks:
        condition = repository.asset_graph.get(key).automation_condition
        assert condition is not None and "cron" in (condition.get_label() or ""), key
    schedule = repository.get_schedule_def("observe_source_tables_schedule")
    assert schedule.default_status == DefaultScheduleStatus.RUNNING and schedule.job_name == "observe_source_tables"
    for name in ("replication_health", "alert_on_check_failure", "alert_on_run_failure"):
        assert repository.get_sensor_def(name).default_status == DefaultSensorStatus.RUNNING, name


def test_the_checks_are_requested_at_each_cron_tick() -> None:
    from dagster import DagsterInstance, evaluate_automation_conditions

    from cdc_pipeline.config import load_pipeline_config
    from cdc_pipeline.definitions import build_definitions

    config_path = REPO_ROOT / "pipeline.yaml"
    defs = build_definitions(load_pipeline_config(config_path), config_path, checks_cron="*/10 * * * *")
    instance = DagsterInstance.ephemeral()
    start = datetime(2026, 1, 1, 0, 1, tzinfo=UTC)
    requested = []
    cursor = None
    for minutes in (0, 4, 8, 10, 14, 20):  # 00:01 ... 00:21; ticks at 00:10 and 00:20
        with warnings.catch_warnings():  # the tester itself selects with a beta parameter
            warnings.simplefilter("ignore", category=BetaWarning)
            result = evaluate_automation_conditions(
                defs=defs, instance=instance, cursor=cursor, evaluation_time=start + timedelta(minutes=minutes)
            )
        cursor = result.cursor
        requested.append(result.total_requested)
    # Every check of every table and aggregate at the 00:10 and 00:20 ticks, nothing in between.
    every = 4 * len(CHECKS) + len(load_pipeline_config(config_path).aggregates)
    assert requested == [0, 0, 0, every, 0, every], requested


def test_dagster_dev_serves_the_ui_with_the_code_location(dagster_dev: str, tmp_path: Path) -> None:
    deadline = time.monotonic() + 240
    jobs: list[str] = []
    query = "{ repositoriesOrError { ... on RepositoryConnection { nodes { name jobs { name } } } } }"
    while time.monotonic() < deadline and "check_services" not in jobs:
        try:
            response = requests.post(f"{dagster_dev}/graphql", json={"query": query}, timeout=10)
            nodes = response.json()["data"]["repositoriesOrError"].get("nodes", [])
            jobs = [job["name"] for node in nodes for job in node["jobs"]]
        except (requests.RequestException, ValueError, KeyError, TypeError):
            pass
        if "check_services" not in jobs:
            time.sleep(2)
    assert "check_services" in jobs, (tmp_path / "dagster-dev.log").read_text()[-3000:]
    page = requests.get(dagster_dev, timeout=10)
    assert page.status_code == 200 and "Dagster" in page.text


RUNS_QUERY = "{ runsOrError { ... on Runs { results { runId jobName tags { key value } } } } }"


def test_the_daemon_runs_the_checks_and_observations_by_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dg dev` with every-minute crons and nobody clicking: the automation sensor launches a run of the
    replica checks and the schedule one of the observations. (No stack here: the runs start and fail
    to connect, which is not what this test is about; test_control_plane.py runs the same jobs for real.)"""
    monkeypatch.setenv("CDC_CHECKS_CRON", "* * * * *")
    monkeypatch.setenv("CDC_OBSERVE_CRON", "* * * * *")
    launched: dict[str, str] = {}
    with dagster_dev_server(tmp_path) as url:
        deadline = time.monotonic() + 360
        while time.monotonic() < deadline and len(launched) < 2:
            try:
                response = requests.post(f"{url}/graphql", json={"query": RUNS_QUERY}, timeout=10)
                runs = response.json()["data"]["runsOrError"]["results"]
            except (requests.RequestException, ValueError, KeyError, TypeError):
                runs = []
            for run in runs:
                tags = {t["key"]: t["value"] for t in run["tags"]}
                if tags.get("dagster/sensor_name") == "replica_checks_automation":
                    launched["checks"] = run["runId"]
                if tags.get("dagster/schedule_name") == "observe_source_tables_schedule":
                    launched["observations"] = run["runId"]
            if len(launched) < 2:
                time.sleep(5)
    assert set(launched) == {"checks", "observations"}, (launched, (tmp_path / "dagster-dev.log").read_text()[-3000:])


def test_a_bad_cron_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from cdc_pipeline.config import load_pipeline_config
    from cdc_pipeline.definitions import build_definitions

    monkeypatch.setenv("CDC_CHECKS_CRON", "every hour")
    config_path = REPO_ROOT / "pipeline.yaml"
    with pytest.raises(ValueError, match=r"CDC_CHECKS_CRON='every hour' is not a cron expression: use five fields"):
        build_definitions(load_pipeline_config(config_path), config_path)

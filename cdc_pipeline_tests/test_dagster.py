"""The code location loads: `dagster definitions validate` passes and `dagster dev` serves the UI with
the pipeline's jobs and resources."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import requests

from cdc_pipeline_tests.conftest import DAGSTER, REPO_ROOT


def test_definitions_validate(tmp_path: Path) -> None:
    result = subprocess.run(
        [DAGSTER, "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO_ROOT,
        env=dict(os.environ, DAGSTER_HOME=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All code locations passed validation" in result.stdout + result.stderr


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

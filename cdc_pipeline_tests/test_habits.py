"""Lint, format and type errors fail the suite (no stack needed): ruff check and ruff format --check on
the repository, and mypy with the configuration in pyproject.toml ([tool.mypy]: control/, streaming/,
config.py, contract.py, kafka_connect.py and probes.py; strict on the modules listed in its overrides)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cdc_pipeline_tests.conftest import REPO_ROOT

BIN = Path(sys.executable).parent


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("command", [("check",), ("format", "--check")], ids=["check", "format"])
def test_ruff(command: tuple[str, ...]) -> None:
    result = _run(str(BIN / "ruff"), *command, ".")
    assert result.returncode == 0, f"ruff {' '.join(command)} failed (fix: ruff {command[0]} .):\n{result.stdout}"


def test_mypy() -> None:
    result = _run(str(BIN / "mypy"))
    assert result.returncode == 0, f"mypy failed:\n{result.stdout}{result.stderr}"

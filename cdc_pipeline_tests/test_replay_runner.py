"""The replay runner (cdc_pipeline/control/replay_runner.py) with a stand-in for spark-submit: a small
Python program that writes output and a result file, fails, or outlives its timeout. No Dagster, no Spark."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from cdc_pipeline.control.replay_runner import ReplayTimeout, read_result, replay_arguments, run_replay


def stand_in(code: str):  # noqa: ANN201
    """argv(result_file) running `code` with the result file as sys.argv[1]."""
    return lambda result_file: [sys.executable, "-c", code, str(result_file)]


def test_the_arguments_name_the_config_the_range_and_the_result_file(tmp_path: Path) -> None:
    args = replay_arguments("/etc/pipeline.yaml", "shop.public.orders", 5, 9, tmp_path / "r.json")
    assert args == [
        "--config", "/etc/pipeline.yaml",
        "--starting-offsets", json.dumps({"shop.public.orders": {"0": 5}}),
        "--ending-offsets", json.dumps({"shop.public.orders": {"0": 9}}),
        "--result-file", str(tmp_path / "r.json"),
    ]  # fmt: skip


def test_a_replay_that_succeeds_returns_its_counts_output_and_reports_progress() -> None:
    code = (
        "import json, os, sys, time\n"
        "print('replaying', os.environ['STAND_IN'], flush=True)\n"
        "time.sleep(0.6)\n"
        "open(sys.argv[1], 'w').write(json.dumps({'applied_rows': 4}))\n"
    )
    notes: list[float] = []
    outcome = run_replay(
        stand_in(code), {**os.environ, "STAND_IN": "x"}, timeout_s=60, on_progress=notes.append,
        note_every_s=0.1, poll_s=0.05,
    )  # fmt: skip
    assert outcome.returncode == 0 and outcome.result == {"applied_rows": 4}
    assert outcome.output == ["replaying x"]
    assert notes and all(b > a for a, b in zip(notes, notes[1:], strict=False))


def test_a_replay_that_fails_returns_its_exit_code_and_output_without_counts() -> None:
    outcome = run_replay(stand_in("import sys; print('boom'); sys.exit(3)"), dict(os.environ), 60, poll_s=0.05)
    assert outcome.returncode == 3 and outcome.result is None and outcome.output == ["boom"]


def test_a_replay_past_its_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    # The stand-in starts a child (as spark-submit starts the JVM) and both outlive the timeout.
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(600)\n"
    )
    with pytest.raises(ReplayTimeout) as caught:
        run_replay(stand_in(code), dict(os.environ), timeout_s=1.0, poll_s=0.05)
    assert caught.value.tail == ["started"] and "1 s" in str(caught.value)
    child = int(pid_file.read_text())
    for _ in range(200):  # killed with the group; reaped by init
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[0] == "Z":
            break  # a zombie: dead, not yet reaped
        time.sleep(0.05)
    else:
        pytest.fail(f"the stand-in's child {child} survived the timeout")


def test_read_result_is_none_without_a_file(tmp_path: Path) -> None:
    assert read_result(tmp_path / "absent.json") is None

"""Running a replay (streaming/replay.py) as a spark-submit child process, without Dagster: its arguments,
the process in its own process group (so a timeout, or the caller's interruption, stops spark-submit's JVM
and its Python driver together), its output in a file (no pipe to fill), a progress callback every
`note_every_s`, and the counts it writes to its result file. The replay job's op builds the spark-submit
command around `replay_arguments` and turns the outcome into its run's result or failure."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TIMEOUT_TAIL_LINES = 20


def replay_arguments(config_path: str | Path, topic: str, start: int, end: int, result_file: Path) -> list[str]:
    """The replay application's arguments: offsets [start, end) of partition 0 of `topic`."""
    return [
        "--config", str(config_path),
        "--starting-offsets", json.dumps({topic: {"0": start}}),
        "--ending-offsets", json.dumps({topic: {"0": end}}),
        "--result-file", str(result_file),
    ]  # fmt: skip


def read_result(path: Path) -> dict[str, Any] | None:
    """The counts a replay wrote with `--result-file`, or None when it wrote none (it failed first)."""
    try:
        result: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return result


class ReplayTimeout(Exception):
    """The child did not finish in `timeout_s` and was killed; `tail` holds its last output lines."""

    def __init__(self, timeout_s: float, tail: list[str]) -> None:
        super().__init__(f"did not finish in {timeout_s:.0f} s and was stopped")
        self.timeout_s = timeout_s
        self.tail = tail


@dataclass(frozen=True)
class ReplayOutcome:
    """How the child ended: its exit code, its whole output, and the result file's counts (None: none)."""

    returncode: int
    output: list[str]
    result: dict[str, Any] | None
    seconds: float


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):  # the group ended between poll and kill
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_replay(
    argv: Callable[[Path], Sequence[str]],
    env: Mapping[str, str],
    timeout_s: float,
    on_progress: Callable[[float], None] | None = None,
    note_every_s: float = 30.0,
    poll_s: float = 0.5,
) -> ReplayOutcome:
    """Run `argv(result_file)` with `env` in a new session until it exits; `on_progress(elapsed_s)` every
    `note_every_s` while it runs. Raises ReplayTimeout after `timeout_s` (the process group is killed
    first); if the caller is interrupted meanwhile, the process group is killed too."""
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="cdc-replay-") as workdir,
        open(Path(workdir) / "output.log", "w+", errors="replace") as out,
    ):
        result_file = Path(workdir) / "result.json"
        process = subprocess.Popen(
            list(argv(result_file)), env=dict(env), stdout=out, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            next_note = started + note_every_s
            while process.poll() is None:
                elapsed = time.monotonic() - started
                if elapsed > timeout_s:
                    _stop(process)
                    out.seek(0)
                    raise ReplayTimeout(timeout_s, out.read().splitlines()[-TIMEOUT_TAIL_LINES:])
                if on_progress is not None and time.monotonic() >= next_note:
                    on_progress(elapsed)
                    next_note += note_every_s
                time.sleep(poll_s)
        finally:
            _stop(process)  # the caller was interrupted while the replay ran: stop it too
        out.seek(0)
        lines = out.read().splitlines()
        result = read_result(result_file)
    return ReplayOutcome(process.returncode, lines, result, time.monotonic() - started)

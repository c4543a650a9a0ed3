"""Dagster for the demo: the webserver and the daemon (so sensors, schedules and automation run), served by
`dg dev` (the dg CLI), behind one function so the command can change without touching the demo."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import requests

from cdc_pipeline.bench.env import python_path_env, settings_env
from cdc_pipeline.settings import ENV_PREFIX, Settings

CODE_MODULE = "cdc_pipeline.definitions"
LOCATION = "cdc_pipeline"  # as in the repo's workspace.yaml and [tool.dg.project]


@dataclass
class DagsterProcess:
    """A running webserver + daemon (one process group) and where its output goes."""

    process: subprocess.Popen
    url: str
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def ready(self) -> bool:
        """The webserver answers and has loaded the code location."""
        try:
            response = requests.get(f"{self.url}/server_info", timeout=2)
        except requests.RequestException:
            return False
        return response.ok

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM to the group (webserver, daemon, code server, runs), SIGKILL after `timeout`."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def dagster_command(workspace: Path, host: str, port: int) -> list[str]:
    """The command that serves the webserver and runs the daemon for the code location."""
    dg = str(Path(sys.executable).with_name("dg"))
    return [dg, "dev", "-w", str(workspace), "-h", host, "-p", str(port)]


def start_dagster(
    settings: Settings, config_path: Path, home: Path, port: int, host: str = "127.0.0.1"
) -> DagsterProcess:
    """Start Dagster for the pipeline at `config_path` against the services of `settings`. DAGSTER_HOME and
    the working directory are `home` (instance storage persists across demos; no `.env` there, so the
    settings given here are the ones the code location sees). Secrets travel in the environment only."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(settings_env(settings))
    env.update(python_path_env())
    env.update({"DAGSTER_HOME": str(home.resolve()), f"{ENV_PREFIX}PIPELINE_CONFIG": str(config_path.resolve())})
    # The package's own workspace file (an installed package has no repo checkout to point at).
    workspace = home / "workspace.yaml"
    workspace.write_text(
        f"load_from:\n  - python_module:\n      module_name: {CODE_MODULE}\n      location_name: {LOCATION}\n"
    )
    log_path = home / "dagster.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            dagster_command(workspace, host, port), cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    return DagsterProcess(process, f"http://{host}:{port}", log_path)

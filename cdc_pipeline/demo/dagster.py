"""Dagster for the demo: the webserver and the daemon (so sensors, schedules and automation run), served by
`dg dev` (the dg CLI), behind one function so the command can change without touching the demo."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
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
        """SIGTERM to the group (webserver, daemon, code server, runs), SIGKILL after `timeout`; then
        whatever of the group outlived `dg dev` (a code server was once seen to) is given 10 s and killed."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        deadline = time.monotonic() + 10
        while _group_alive(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        if _group_alive(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dagster_command(workspace: Path, host: str, port: int) -> list[str]:
    """The command that serves the webserver and runs the daemon for the code location."""
    dg = str(Path(sys.executable).with_name("dg"))
    return [dg, "dev", "-w", str(workspace), "-h", host, "-p", str(port)]


def control_plane_env(settings: Settings) -> dict[str, str]:
    """The CDC_* variables of the control plane's settings (automation crons, alert thresholds, restarts,
    the alert webhook), so Dagster runs with the settings the demo was given (its environment or `.env`)."""
    env = {
        "CHECKS_CRON": settings.checks_cron,
        "OBSERVE_CRON": settings.observe_cron,
        "LAG_THRESHOLD": str(settings.lag_threshold),
        "AUTO_RESTART_STREAM": str(settings.auto_restart_stream).lower(),
        "AUTO_RESTART_CONNECTOR": str(settings.auto_restart_connector).lower(),
        "SLOT_MAX_RETAINED_BYTES": str(settings.slot_max_retained_bytes),
        "SLOT_MAX_RETENTION_AGE_S": str(settings.slot_max_retention_age_s),
        "CONNECTOR_MAX_PAUSED_S": str(settings.connector_max_paused_s),
    }
    if settings.control_dir is not None:
        env["CONTROL_DIR"] = str(settings.control_dir.resolve())
    if settings.alert_webhook_url is not None:
        env["ALERT_WEBHOOK_URL"] = settings.alert_webhook_url.get_secret_value()
    return {ENV_PREFIX + key: value for key, value in env.items()}


def dagster_env(settings: Settings, config_path: Path, home: Path) -> dict[str, str]:
    """Dagster's environment: the caller's without its own CDC_* variables, plus `settings` (services and
    control plane) as CDC_* variables, this `cdc_pipeline` on PYTHONPATH, DAGSTER_HOME and the pipeline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(settings_env(settings))
    env.update(control_plane_env(settings))
    env.update(python_path_env())
    env.update({"DAGSTER_HOME": str(home.resolve()), f"{ENV_PREFIX}PIPELINE_CONFIG": str(config_path.resolve())})
    return env


def start_dagster(
    settings: Settings, config_path: Path, home: Path, port: int, host: str = "127.0.0.1"
) -> DagsterProcess:
    """Start Dagster for the pipeline at `config_path` against the services of `settings`. DAGSTER_HOME and
    the working directory are `home` (instance storage persists across demos; no `.env` there, so the
    settings given here are the ones the code location sees). Secrets travel in the environment only."""
    home.mkdir(parents=True, exist_ok=True)
    env = dagster_env(settings, config_path, home)
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

"""One real local stack per test session, on free ports and in its own state directory so it never
touches a developer's running stack; always torn down, also when tests fail."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest
from clickhouse_connect.driver.client import Client

from cdc_pipeline.bench.env import free_ports
from cdc_pipeline.clickhouse_client import connect_clickhouse
from cdc_pipeline.settings import Settings
from cdc_pipeline.stack.lifecycle import LocalStack

REPO_ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
DAGSTER = str(Path(sys.executable).with_name("dagster"))
DG = str(Path(sys.executable).with_name("dg"))


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # A terminated test run (CI timeout, kill) still runs fixture teardown: the stack is stopped.
    signal.signal(signal.SIGTERM, _interrupt)


def stop_process_group(process: subprocess.Popen, timeout: float = 30, sig: int = signal.SIGTERM) -> None:
    """Signal a process started with start_new_session=True and its children; SIGKILL after `timeout`."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll `probe` until it returns something truthy (returned); AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@contextmanager
def dagster_dev_server(tmp_path: Path) -> Iterator[str]:
    """`dg dev` on a free port with the repo's workspace.yaml and the current os.environ; yields its URL.

    DAGSTER_HOME and the working directory are `tmp_path/dagster_home`, not the repo: `dg dev -w`
    loads `.env` from its working directory over the environment, and a developer's (or CI's, written
    by scripts/setup.sh) `.env` would point the code location away from the test stack. The pipeline
    definition is the repo's `pipeline.yaml` unless CDC_PIPELINE_CONFIG says otherwise. Output goes to
    `tmp_path/dagster-dev.log`. The webserver, daemon, code server and runs are stopped on exit."""
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    env = dict(os.environ, DAGSTER_HOME=str(home))
    env.setdefault("CDC_PIPELINE_CONFIG", str(REPO_ROOT / "pipeline.yaml"))
    (port,) = free_ports(1)
    log = open(tmp_path / "dagster-dev.log", "wb")  # noqa: SIM115 - closed in the finally below
    process = subprocess.Popen(
        [DG, "dev", "-w", str(REPO_ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        cwd=home,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # so the webserver, daemon, code server and runs stop together
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(process, timeout=60)
        log.close()


@pytest.fixture
def dagster_dev(tmp_path: Path) -> Iterator[str]:
    """`dagster dev` without a stack: enough to load the code location and serve the UI."""
    with dagster_dev_server(tmp_path) as url:
        yield url


@pytest.fixture(scope="session")
def stack_env() -> Iterator[dict[str, str]]:
    """CDC_* variables for the test stack, exported to this process (Dagster's EnvVar reads them)."""
    pg, kafka, controller, connect, clickhouse = free_ports(5)
    # The PostgreSQL server runs as the `postgres` user when tests run as root: it must reach the dir.
    state_dir = Path(tempfile.mkdtemp(prefix="cdc-test-stack-"))
    state_dir.chmod(0o755)
    env = {
        "CDC_STACK_DIR": str(state_dir),
        "CDC_POSTGRES_DSN": f"postgresql://cdc@127.0.0.1:{pg}/shop",
        "CDC_POSTGRES_PASSWORD": secrets.token_urlsafe(16),
        "CDC_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka}",
        "CDC_KAFKA_CONTROLLER_PORT": str(controller),
        "CDC_CONNECT_URL": f"http://127.0.0.1:{connect}",
        "CDC_CLICKHOUSE_LOCAL_PORT": str(clickhouse),
        "CDC_CLICKHOUSE_PASSWORD": secrets.token_urlsafe(16),
        "CDC_CLICKHOUSE_DATABASE": "cdc",
        "CDC_WAREHOUSE_DSN": f"postgresql://cdc_warehouse@127.0.0.1:{pg}/warehouse",
        "CDC_WAREHOUSE_PASSWORD": secrets.token_urlsafe(16),
        "CDC_SPARK_MASTER": "local[2]",
    }
    saved = {k: os.environ.get(k) for k in [*env, "CDC_CLICKHOUSE_URL"]}
    os.environ.pop("CDC_CLICKHOUSE_URL", None)  # the test stack always runs its own endpoint
    os.environ.update(env)
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def settings(stack_env: dict[str, str]) -> Settings:
    return Settings(_env_file=None)


@pytest.fixture(scope="session")
def local_stack(settings: Settings) -> Iterator[LocalStack]:
    stack = LocalStack(settings)
    try:
        stack.up()
        yield stack
    finally:
        stack.down(purge=True)


@pytest.fixture(scope="session")
def clickhouse_url(local_stack: LocalStack) -> str:
    return local_stack.settings.clickhouse_endpoint


@pytest.fixture
def source(settings: Settings, local_stack: LocalStack) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the test stack's PostgreSQL."""
    with psycopg.connect(settings.postgres_conninfo(), autocommit=True) as conn:
        yield conn


@pytest.fixture
def warehouse(settings: Settings, local_stack: LocalStack) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the test stack's PostgreSQL warehouse (a second database and role)."""
    with psycopg.connect(settings.warehouse_conninfo(), autocommit=True) as conn:
        yield conn


@pytest.fixture
def clickhouse(settings: Settings, local_stack: LocalStack) -> Iterator[Client]:
    """A clickhouse-connect client of the test stack's ClickHouse endpoint (with its password)."""
    client = connect_clickhouse(
        settings.clickhouse_endpoint, settings.clickhouse_user, settings.clickhouse_password.get_secret_value()
    )
    yield client
    client.close()


@pytest.fixture
def unique_name() -> str:
    """A fresh lower-case identifier, for isolating a test's tables, topics and connectors."""
    return f"t_{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def spark():  # noqa: ANN201 - pyspark is imported lazily: most tests never need a JVM
    """A small local SparkSession for the pure DataFrame functions."""
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("cdc-pipeline-tests")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.memory", "1g")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .getOrCreate()
    )
    try:
        yield session
    finally:
        session.stop()


# --- `cdc-pipeline demo` on the session stack (test_demo.py, test_dagster_ui.py) ----------------------
DEMO_SMALL = ["--orders", "150", "--customers", "40", "--products", "25", "--rate", "50"]


def demo_argv(schema: str, *extra: str, name: str | None = None) -> list[str]:
    """The demo with a small history in schema and ClickHouse database `schema`, pipeline `name` (default
    `schema`); `extra` adds options (e.g. --no-dagster, --duration)."""
    return [
        sys.executable, "-m", "cdc_pipeline.cli", "demo", "--name", name or schema, "--schema", schema,
        "--database", schema, *DEMO_SMALL, *extra,
    ]  # fmt: skip


@pytest.fixture
def demo_name(
    settings: Settings, local_stack: LocalStack, source: psycopg.Connection, clickhouse: Client, unique_name: str
) -> Iterator[str]:
    """A schema and database name for a demo run; afterwards its stream, connector, slot, publication,
    schema and database are removed (for every demo pipeline over that schema)."""
    from cdc_pipeline.config import load_pipeline_config
    from cdc_pipeline.control.stream import StreamController
    from cdc_pipeline_tests.replica import remove_pipeline

    yield unique_name
    for config_path in (settings.stack_dir.resolve() / "demo").glob("*.yaml"):
        config = load_pipeline_config(config_path)
        if unique_name not in config.source.schemas:
            continue
        try:
            StreamController(settings.stack_dir.resolve() / "control", config.name).stop()
        finally:
            remove_pipeline(settings, config)
    source.execute(f'DROP SCHEMA IF EXISTS "{unique_name}" CASCADE')
    clickhouse.command(f"DROP DATABASE IF EXISTS `{unique_name}`")

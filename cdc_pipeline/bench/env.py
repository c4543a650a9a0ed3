"""Where the benchmark runs: a throwaway local stack on free ports in a temporary state directory (the
default), or the stack the settings point at (`--use-running-stack`); and the environment its child
processes (the stream, the baseline consumer) get, so they talk to the same services as the bench."""

from __future__ import annotations

import os
import secrets
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path

from cdc_pipeline.settings import ENV_PREFIX, Settings
from cdc_pipeline.streaming.launch import submit_env


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that were free on loopback a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def throwaway_settings(base: Settings) -> Settings:
    """Settings for a fresh local stack of the bench's own: free ports, a new state directory, a generated
    password. Only the Spark master and the JVM cache are taken from `base` (the caller's settings)."""
    pg, kafka, controller, connect, clickhouse = free_ports(5)
    state_dir = Path(tempfile.mkdtemp(prefix="cdc-bench-stack-"))
    state_dir.chmod(0o755)  # the PostgreSQL server runs as the `postgres` user when the bench runs as root
    return Settings(
        _env_file=None,
        stack_dir=state_dir,
        postgres_dsn=f"postgresql://cdc@127.0.0.1:{pg}/shop",
        postgres_password=secrets.token_urlsafe(16),
        kafka_bootstrap_servers=f"127.0.0.1:{kafka}",
        kafka_controller_port=controller,
        connect_url=f"http://127.0.0.1:{connect}",
        clickhouse_url=None,
        clickhouse_local_port=clickhouse,
        clickhouse_user="default",
        clickhouse_password=secrets.token_urlsafe(16),  # the local endpoint requires one (README: Security)
        clickhouse_database="cdc",
        spark_master=base.spark_master,
        jvm_cache_dir=base.jvm_cache_dir,
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """The CDC_* variables that make `Settings()` in a child process equal to `settings` (secrets
    included: they travel in the environment, never in argv)."""
    env = {
        "POSTGRES_DSN": settings.postgres_dsn,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "CONNECT_URL": settings.connect_url,
        "CLICKHOUSE_USER": settings.clickhouse_user,
        "CLICKHOUSE_DATABASE": settings.clickhouse_database,
        "CLICKHOUSE_LOCAL_PORT": str(settings.clickhouse_local_port),
        "SPARK_MASTER": settings.spark_master,
        "STACK_DIR": str(settings.stack_dir.resolve()),
        "JVM_CACHE_DIR": str(settings.jvm_cache_dir),
    }
    if settings.clickhouse_url:
        env["CLICKHOUSE_URL"] = settings.clickhouse_url
    if settings.postgres_password:
        env["POSTGRES_PASSWORD"] = settings.postgres_password.get_secret_value()
    if settings.clickhouse_password:
        env["CLICKHOUSE_PASSWORD"] = settings.clickhouse_password.get_secret_value()
    return {ENV_PREFIX + key: value for key, value in env.items()}


def child_env(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of a child process: the caller's, without any CDC_* variable of its own (a developer's
    CDC_CLICKHOUSE_URL must not leak into a throwaway stack's stream), plus `settings` as CDC_* variables.
    Children also run in a work directory without `.env`, so nothing else overrides them."""
    env = {k: v for k, v in submit_env(master=settings.spark_master).items() if not k.startswith(ENV_PREFIX)}
    env.update(settings_env(settings))
    env.update(extra or {})
    return env


def python_path_env() -> dict[str, str]:
    """PYTHONPATH that makes children import this very `cdc_pipeline` (a worktree on PYTHONPATH included)."""
    root = str(Path(__file__).resolve().parents[2])
    current = os.environ.get("PYTHONPATH", "")
    parts = [p for p in current.split(os.pathsep) if p]
    return {"PYTHONPATH": os.pathsep.join([root, *[p for p in parts if p != root]])}

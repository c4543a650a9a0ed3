"""The one settings source: environment variables (or a `.env` file), read by the stack, Dagster and
the Spark application alike. Every variable is documented in `.env.example`."""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from urllib.parse import urlsplit

from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "CDC_"


class Settings(BaseSettings):
    """Connection settings for every external system. Defaults match the local stack."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # PostgreSQL source. The DSN carries no password; the password is its own (secret) variable.
    postgres_dsn: str = "postgresql://cdc@127.0.0.1:5432/shop"
    postgres_password: SecretStr | None = None

    # PostgreSQL warehouse (optional second sink, see pipeline.yaml `tables[].sinks`): a database that is
    # not the source. Unset: no table may name the warehouse sink. The local stack creates this role and
    # database in its PostgreSQL server when the DSN points at it.
    warehouse_dsn: str | None = None
    warehouse_password: SecretStr | None = None

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    connect_url: str = "http://127.0.0.1:8083"

    # ClickHouse. Leave CDC_CLICKHOUSE_URL unset to let `cdc-pipeline stack up` run the local
    # chDB-backed endpoint; set it to use a real ClickHouse server (the stack then starts none).
    clickhouse_url: str | None = None
    clickhouse_user: str = "default"
    clickhouse_password: SecretStr | None = None
    clickhouse_database: str = "cdc"

    spark_master: str = "local[2]"

    # The pipeline definition (read by the CLI, the Spark application and Dagster).
    pipeline_config: Path = Path("pipeline.yaml")

    # Control plane (Dagster). Alerts go to this Slack-compatible incoming webhook (secret: the URL is
    # the credential) and to the Dagster logs; unset, to the logs only.
    alert_webhook_url: SecretStr | None = None
    # Where the control plane tracks the streaming application (pid, desired state, log).
    # Default: <stack_dir>/control. Must be shared by the Dagster run workers and the daemon.
    control_dir: Path | None = None
    # Consumer lag (messages) above which, held over the sensor's window, the lag sensor alerts.
    lag_threshold: int = 10_000
    # Let the checkpoint sensor restart a stream that died (with backoff), and the connector sensor
    # restart failed connector tasks.
    auto_restart_stream: bool = False
    auto_restart_connector: bool = False
    # When Dagster runs the replica checks and observes the source tables by itself (cron, UTC).
    checks_cron: str = "*/15 * * * *"
    observe_cron: str = "*/5 * * * *"
    # Replication sensor: alert when the slot retains more WAL than this, or has not advanced for this
    # long while WAL waits behind it, or the connector has been PAUSED this long.
    slot_max_retained_bytes: int = Field(default=1 << 30, gt=0)
    slot_max_retention_age_s: float = Field(default=3600, gt=0)
    connector_max_paused_s: float = Field(default=1800, ge=0)

    # Local stack only.
    stack_dir: Path = Path(".stack")
    jvm_cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "cdc-pipeline")
    # The local stack listens where the endpoints above point; these are the extra ports it needs.
    kafka_controller_port: int = 9093
    clickhouse_local_port: int = 8123

    @field_validator(
        "postgres_password", "clickhouse_password", "warehouse_password", "alert_webhook_url", mode="before"
    )
    @classmethod
    def _empty_secret_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("clickhouse_database")
    @classmethod
    def _plain_database_name(cls, value: str) -> str:
        # Written into SQL (CREATE DATABASE, table names): a plain identifier only.
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(f"CDC_CLICKHOUSE_DATABASE: use letters, digits and _, not a digit first: {value!r}")
        return value

    @field_validator("warehouse_dsn", mode="before")
    @classmethod
    def _empty_dsn_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("postgres_dsn", "warehouse_dsn")
    @classmethod
    def _dsn_parses(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            conninfo_to_dict(value)
        except Exception as exc:  # psycopg raises ProgrammingError with the parse detail
            raise ValueError(f"not a valid libpq connection string: {exc}") from exc
        return value

    @cached_property
    def postgres_params(self) -> dict[str, str]:
        """The DSN's parts (host, port, dbname, user), without any password."""
        params = {k: str(v) for k, v in conninfo_to_dict(self.postgres_dsn).items()}
        params.pop("password", None)
        params.setdefault("host", "127.0.0.1")
        params.setdefault("port", "5432")
        return params

    def postgres_conninfo(self) -> str:
        """The DSN with the password added: for connecting, never for printing."""
        password = self.postgres_password.get_secret_value() if self.postgres_password else None
        original = conninfo_to_dict(self.postgres_dsn)
        return make_conninfo(self.postgres_dsn, password=password or original.get("password"))

    @cached_property
    def warehouse_params(self) -> dict[str, str]:
        """The warehouse DSN's parts, without any password (empty when no warehouse is configured)."""
        if self.warehouse_dsn is None:
            return {}
        params = {k: str(v) for k, v in conninfo_to_dict(self.warehouse_dsn).items()}
        params.pop("password", None)
        params.setdefault("host", "127.0.0.1")
        params.setdefault("port", "5432")
        return params

    def warehouse_conninfo(self) -> str:
        """The warehouse DSN with its password added: for connecting, never for printing."""
        if self.warehouse_dsn is None:
            raise ValueError(
                "no PostgreSQL warehouse is configured: set CDC_WAREHOUSE_DSN and CDC_WAREHOUSE_PASSWORD "
                "(or remove `warehouse` from the tables' sinks in pipeline.yaml)"
            )
        password = self.warehouse_password.get_secret_value() if self.warehouse_password else None
        original = conninfo_to_dict(self.warehouse_dsn)
        return make_conninfo(self.warehouse_dsn, password=password or original.get("password"))

    @property
    def kafka_host_port(self) -> tuple[str, int]:
        first = self.kafka_bootstrap_servers.split(",")[0].strip()
        host, _, port = first.rpartition(":")
        return host or "127.0.0.1", int(port or 9092)

    @property
    def connect_host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.connect_url)
        return parts.hostname or "127.0.0.1", parts.port or 8083

    @property
    def clickhouse_is_external(self) -> bool:
        return self.clickhouse_url is not None

    @property
    def clickhouse_endpoint(self) -> str:
        return self.clickhouse_url or f"http://127.0.0.1:{self.clickhouse_local_port}"

    @property
    def clickhouse_host_port(self) -> tuple[str, int, bool]:
        parts = urlsplit(self.clickhouse_endpoint)
        secure = parts.scheme == "https"
        return parts.hostname or "127.0.0.1", parts.port or (8443 if secure else 8123), secure


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment and `.env`, with explicit overrides (e.g. CLI flags) on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})

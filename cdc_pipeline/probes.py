"""Protocol-level health probes, one per external system: each asks the service a real question in
its own protocol. Shared by `cdc-pipeline stack` and the Dagster resources, and free of Dagster."""

from __future__ import annotations

import re
import socket
import subprocess
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import psycopg
import requests

from cdc_pipeline.clickhouse_client import connect_clickhouse
from cdc_pipeline.jvm import DEBEZIUM_CONNECTOR_CLASS


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def postgres_health(conninfo: str, timeout: float = 5.0) -> Health:
    """Run a query; also report whether logical decoding is possible (wal_level=logical)."""
    try:
        with psycopg.connect(conninfo, connect_timeout=max(1, int(timeout))) as conn:
            version = conn.execute("SHOW server_version").fetchone()
            wal_level = conn.execute("SHOW wal_level").fetchone()
    except psycopg.Error as exc:
        return Health(False, f"PostgreSQL query failed: {_first_line(exc)}")
    return Health(True, f"PostgreSQL {version[0] if version else '?'}, wal_level={wal_level[0] if wal_level else '?'}")


def kafka_health(bootstrap_servers: str, timeout: float = 5.0) -> Health:
    """Fetch cluster metadata from the brokers."""
    from confluent_kafka.admin import AdminClient  # heavy native import: only when probing

    try:
        # log_level 0: a refused connection is the answer here, not something to print 20 times a second.
        admin = AdminClient(
            {"bootstrap.servers": bootstrap_servers, "socket.timeout.ms": int(timeout * 1000), "log_level": 0}
        )
        metadata = admin.list_topics(timeout=timeout)
    except Exception as exc:  # KafkaException carries the librdkafka error
        return Health(False, f"Kafka metadata request failed: {_first_line(exc)}")
    return Health(True, f"{len(metadata.brokers)} broker(s), {len(metadata.topics)} topic(s)")


def connect_health(connect_url: str, timeout: float = 5.0) -> Health:
    """The worker's REST API answers and lists the Debezium PostgreSQL connector plugin."""
    try:
        response = requests.get(f"{connect_url.rstrip('/')}/connector-plugins", timeout=timeout)
        response.raise_for_status()
        plugins = {p.get("class") for p in response.json()}
    except (requests.RequestException, ValueError) as exc:
        return Health(False, f"Kafka Connect REST API failed: {_first_line(exc)}")
    if DEBEZIUM_CONNECTOR_CLASS not in plugins:
        return Health(False, f"Kafka Connect is up but {DEBEZIUM_CONNECTOR_CLASS} is not on its plugin path")
    return Health(True, f"{len(plugins)} plugin(s) including the Debezium PostgreSQL connector")


def clickhouse_health(url: str, user: str, password: str | None, timeout: float = 5.0) -> Health:
    """`SELECT version()` through clickhouse-connect, exactly as the product talks to ClickHouse."""
    try:
        client = connect_clickhouse(url, user, password, connect_timeout=timeout, send_receive_timeout=timeout)
        try:
            version = client.command("SELECT version()")
        finally:
            client.close()
    except Exception as exc:  # clickhouse-connect raises OperationalError/DatabaseError subclasses
        return Health(False, f"ClickHouse query failed: {_first_line(exc)}")
    return Health(True, f"ClickHouse {version}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def spark_health(spark_submit: str, master: str, timeout: float = 60.0) -> Health:
    """spark-submit runs (Java found, distribution intact) and a standalone master accepts connections."""
    try:
        result = subprocess.run([spark_submit, "--version"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Health(False, f"spark-submit could not run: {_first_line(exc)}")
    if result.returncode != 0:
        return Health(False, f"spark-submit --version failed: {(result.stderr or result.stdout)[-300:]}")
    match = re.search(r"version (\d+\.\d+\.\d+\S*)", result.stderr + result.stdout)
    version = match.group(1) if match else "?"
    if master.startswith("spark://"):
        for hostport in master[len("spark://") :].split(","):
            parts = urlsplit(f"//{hostport}")
            try:
                socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 7077), timeout=5).close()
            except OSError as exc:
                return Health(False, f"Spark master {hostport} unreachable: {_first_line(exc)}")
    return Health(True, f"spark-submit {version}, master {master}")

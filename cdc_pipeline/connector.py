"""The Debezium PostgreSQL connector of a pipeline: its Kafka Connect config, rendered from
`pipeline.yaml` and the settings, and the source-side tables it needs (signal, heartbeat)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import sql

from cdc_pipeline.config import PipelineConfig, TableConfig
from cdc_pipeline.control.source import set_full_identity
from cdc_pipeline.resources.connect import ConnectError, KafkaConnectResource
from cdc_pipeline.settings import ENV_PREFIX, Settings
from cdc_pipeline.stack.jvm import DEBEZIUM_CONNECTOR_CLASS
from cdc_pipeline.topics import ensure_topics

log = logging.getLogger(__name__)

JSON_CONVERTER = "org.apache.kafka.connect.json.JsonConverter"
# Resolved by the Connect worker's EnvVarConfigProvider: the secret never enters the stored config.
PASSWORD_REFERENCE = f"${{env:{ENV_PREFIX}POSTGRES_PASSWORD}}"


def connector_name(pipeline: PipelineConfig) -> str:
    """The Kafka Connect connector name of `pipeline`."""
    return f"cdc-{pipeline.name}-postgres"


def _table_regex(qualified: str) -> str:
    # Debezium include lists are comma-separated, anchored Java regexes: a plain name must be escaped.
    return re.escape(qualified)


def _captured_tables(pipeline: PipelineConfig) -> list[str]:
    # Debezium reads signals from the WAL, and heartbeat rows advance the slot: both tables must be captured.
    helpers = [pipeline.source.signal_table, pipeline.source.heartbeat_table]
    return [table.name for table in pipeline.tables] + [name for name in helpers if name]


def _column_exclusions(table: TableConfig) -> str | None:
    if table.columns is None:
        return None
    prefix = _table_regex(table.name) + r"\."
    if table.columns.exclude is not None:
        return ",".join(prefix + re.escape(column) for column in table.columns.exclude)
    # Debezium allows only one of column.include.list / column.exclude.list for the whole connector, so an
    # allow list becomes "every column except these" via a negative lookahead.
    kept = "|".join(re.escape(column) for column in table.columns.include or [])
    return f"{prefix}(?!(?:{kept})$).+"


def heartbeat_query(pipeline: PipelineConfig) -> str | None:
    """The `heartbeat.action.query` upserting one row of the heartbeat table, or None without one."""
    parts = pipeline.heartbeat_table_parts
    if parts is None:
        return None
    return (
        sql.SQL("INSERT INTO {} (id, ts) VALUES (1, now()) ON CONFLICT (id) DO UPDATE SET ts = EXCLUDED.ts")
        .format(sql.Identifier(*parts))
        .as_string()
    )


def connector_config(pipeline: PipelineConfig, settings: Settings) -> dict[str, str]:
    """The connector's Kafka Connect config (every value a string, as Connect stores it)."""
    params = settings.postgres_params
    config = {
        "connector.class": DEBEZIUM_CONNECTOR_CLASS,
        "tasks.max": "1",
        "database.hostname": params["host"],
        "database.port": params["port"],
        "database.user": params["user"],
        "database.password": PASSWORD_REFERENCE,
        "database.dbname": params["dbname"],
        "topic.prefix": pipeline.topic_prefix,
        "plugin.name": "pgoutput",
        "slot.name": pipeline.slot_name,
        "publication.name": pipeline.publication_name,
        # Debezium keeps the publication's table list equal to table.include.list: adding a table is a config change.
        "publication.autocreate.mode": "filtered",
        "snapshot.mode": "initial",
        "table.include.list": ",".join(_table_regex(name) for name in _captured_tables(pipeline)),
        # Source types (precision, scale, length) in the schema let the sink create exact ClickHouse types.
        "column.propagate.source.type": ",".join(_table_regex(table.name) + r"\..+" for table in pipeline.tables),
        # Exact decimals: a double would round NUMERIC values, a byte-encoded BigDecimal is opaque to Spark.
        "decimal.handling.mode": "string",
        "time.precision.mode": "adaptive_time_microseconds",
        # Intervals keep months apart from days (ISO 8601 text); bytea arrives as base64 bytes.
        "interval.handling.mode": "string",
        "binary.handling.mode": "bytes",
        "hstore.handling.mode": "json",
        # Debezium skips truncates by default; the sink must see them to empty the replica too.
        "skipped.operations": "none",
        # The sink applies `op: d` events itself; tombstones would only add null-valued records to skip.
        "tombstones.on.delete": "false",
        "signal.enabled.channels": "source",
        "signal.data.collection": pipeline.source.signal_table,
        "incremental.snapshot.chunk.size": str(pipeline.source.snapshot_chunk_size),
        # Snapshot progress and completion as records on a topic: how a backfill knows it finished.
        "notification.enabled.channels": "sink",
        "notification.sink.topic.name": pipeline.notification_topic,
        "heartbeat.interval.ms": str(pipeline.source.heartbeat_interval_ms),
        "key.converter": JSON_CONVERTER,
        "key.converter.schemas.enable": "true",
        "value.converter": JSON_CONVERTER,
        "value.converter.schemas.enable": "true",
        # One partition per table topic keeps each table's changes in commit order for the stream.
        "topic.creation.default.partitions": "1",
        "topic.creation.default.replication.factor": "-1",
    }
    if query := heartbeat_query(pipeline):
        config["heartbeat.action.query"] = query
    exclusions = [rule for table in pipeline.tables if (rule := _column_exclusions(table))]
    if exclusions:
        config["column.exclude.list"] = ",".join(exclusions)
    keys = [f"{_table_regex(t.name)}:{','.join(t.primary_key)}" for t in pipeline.tables if t.primary_key]
    if keys:
        config["message.key.columns"] = ";".join(keys)
    config.update(pipeline.source.connector_properties)
    return config


def provision_connector(
    connect: KafkaConnectResource,
    pipeline: PipelineConfig,
    settings: Settings,
    *,
    kafka_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Create the pipeline's missing topics (see `cdc_pipeline.topics`), then create or update its
    connector and return the connector's stored config; unchanged configs are left alone.
    `kafka_config`: librdkafka settings of the cluster (default: the settings' bootstrap servers)."""
    report = ensure_topics(kafka_config or {"bootstrap.servers": settings.kafka_bootstrap_servers}, pipeline)
    for line in report.lines():
        log.info("pipeline %s: %s", pipeline.name, line)
    name = connector_name(pipeline)
    desired = {**connector_config(pipeline, settings), "name": name}
    try:
        current = connect.connector_config(name)
    except ConnectError as exc:
        if not str(exc).startswith("404 "):
            raise
        current = None
    if current == desired:
        # Nothing to change: no PUT, so Connect does not reconfigure a running connector.
        return current
    return connect.put_connector_config(name, desired)["config"]


def prepare_source(conninfo: str, pipeline: PipelineConfig) -> list[str]:
    """Create the signal table and (if configured) the heartbeat table when missing, and with
    `source.set_replica_identity` give tables whose key the old row lacks REPLICA IDENTITY FULL;
    return what was done."""
    tables = [
        (
            pipeline.signal_table_parts,
            sql.SQL("id varchar(64) PRIMARY KEY, type varchar(32) NOT NULL, data varchar(2048)"),
        ),
    ]
    if pipeline.heartbeat_table_parts:
        tables.append((pipeline.heartbeat_table_parts, sql.SQL("id int PRIMARY KEY, ts timestamptz")))
    done: list[str] = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for (schema, table), columns in tables:
            exists = conn.execute(
                "SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = %s", (schema, table)
            ).fetchone()
            if exists:
                continue
            conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(sql.Identifier(schema, table), columns))
            done.append(f"created table {schema}.{table}")
        done += set_full_identity(conn, pipeline)
    return done

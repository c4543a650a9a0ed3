"""The Debezium PostgreSQL connector of a pipeline: its Kafka Connect config, rendered from
`pipeline.yaml` and the settings, and the source-side tables it needs (signal, heartbeat)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from cdc_pipeline.config import PipelineConfig, TableConfig, display_name
from cdc_pipeline.jvm import DEBEZIUM_CONNECTOR_CLASS
from cdc_pipeline.kafka_connect import ConnectClient, ConnectError
from cdc_pipeline.settings import ENV_PREFIX, Settings
from cdc_pipeline.topics import ensure_topics

if TYPE_CHECKING:
    from cdc_pipeline.resources.connect import KafkaConnectResource

log = logging.getLogger(__name__)

JSON_CONVERTER = "org.apache.kafka.connect.json.JsonConverter"
# Resolved by the Connect worker's EnvVarConfigProvider: the secret never enters the stored config.
PASSWORD_REFERENCE = f"${{env:{ENV_PREFIX}POSTGRES_PASSWORD}}"


def connector_name(pipeline: PipelineConfig) -> str:
    """The Kafka Connect connector name of `pipeline`."""
    return f"cdc-{pipeline.name}-postgres"


_REGEX_PLAIN = re.compile(r"[A-Za-z0-9_]")
# Debezium compiles include/exclude lists and key columns case-insensitively; `(?-i)` makes a pattern exact.
CASE_SENSITIVE = "(?-i)"


def regex_literal(name: str) -> str:
    """`name` as a Java regex that matches exactly it, safe inside Debezium's lists: no `,` `;` `:`, no
    whitespace (Debezium splits and trims on them) and no quotes. A plain lower-case name renders as
    `re.escape` would (so existing configs render unchanged)."""
    out = []
    for char in name:
        if _REGEX_PLAIN.match(char):
            out.append(char)
        elif char == ".":
            out.append(r"\.")
        else:
            out.append("".join(f"\\x{{{ord(c):x}}}" for c in char))
    return "".join(out)


def _case_sensitive(pipeline: PipelineConfig) -> bool:
    # Only a pipeline with a name that is not all lower case needs exact (case-sensitive) patterns; all
    # lower-case pipelines render as they always did.
    names = [part for schema, table in _captured_tables(pipeline) for part in (schema, table)]
    for table in pipeline.tables:
        names += table.primary_key or []
        if table.columns:
            names += table.columns.include or table.columns.exclude or []
    return any(name != name.lower() for name in names)


def _table_regex(pipeline: PipelineConfig, schema: str, table: str) -> str:
    # Debezium include lists are comma-separated, anchored Java regexes over `schema.table` (exact names).
    flag = CASE_SENSITIVE if _case_sensitive(pipeline) else ""
    return f"{flag}{regex_literal(schema)}\\.{regex_literal(table)}"


def debezium_table_id(schema: str, table: str) -> str:
    """`schema.table` as Debezium's own identifier parser reads it (signal.data.collection): a part with a
    dot or a space in double quotes (config.py refuses helper names with quotes or commas)."""
    return ".".join(f'"{p}"' if re.search(r"[.\s]", p) else p for p in (schema, table))


def _captured_tables(pipeline: PipelineConfig) -> list[tuple[str, str]]:
    # Debezium reads signals from the WAL, and heartbeat rows advance the slot: both tables must be captured.
    helpers = [pipeline.signal_table_parts, pipeline.heartbeat_table_parts]
    return [(t.schema_name, t.table_name) for t in pipeline.tables] + [parts for parts in helpers if parts]


def _column_exclusions(pipeline: PipelineConfig, table: TableConfig) -> str | None:
    if table.columns is None:
        return None
    prefix = _table_regex(pipeline, table.schema_name, table.table_name) + r"\."
    if table.columns.exclude is not None:
        return ",".join(prefix + regex_literal(column) for column in table.columns.exclude)
    # Debezium allows only one of column.include.list / column.exclude.list for the whole connector, so an
    # allow list becomes "every column except these" via a negative lookahead.
    kept = "|".join(regex_literal(column) for column in table.columns.include or [])
    return f"{prefix}(?!(?:{kept})$).+"


def _key_columns(pipeline: PipelineConfig, table: TableConfig) -> str:
    # `<table regex>:<column>,<column>`; Debezium joins them as `<table regex>.<column>` regexes.
    columns = ",".join(regex_literal(column) for column in table.primary_key or [])
    return f"{_table_regex(pipeline, table.schema_name, table.table_name)}:{columns}"


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
    properties = {
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
        "table.include.list": ",".join(_table_regex(pipeline, *parts) for parts in _captured_tables(pipeline)),
        # Source types (precision, scale, length) in the schema let the sink create exact ClickHouse types.
        "column.propagate.source.type": ",".join(
            _table_regex(pipeline, t.schema_name, t.table_name) + r"\..+" for t in pipeline.tables
        ),
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
        "signal.data.collection": debezium_table_id(*pipeline.signal_table_parts),
        "incremental.snapshot.chunk.size": str(pipeline.source.snapshot_chunk_size),
        # Snapshot progress and completion as records on a topic: how a backfill knows it finished.
        "notification.enabled.channels": "sink",
        "notification.sink.topic.name": pipeline.notification_topic,
        "heartbeat.interval.ms": str(pipeline.source.heartbeat_interval_ms),
        # Throughput and latency of capture (README: Benchmark). Debezium hands Connect batches of up to
        # max.batch.size changes, and sleeps poll.interval.ms (its default: 500) whenever its queue is empty:
        # a change committed then waits that long before it is even produced. The queue is bounded by bytes
        # too, so wide rows cannot fill the worker's heap.
        "poll.interval.ms": "50",
        "max.batch.size": "4096",
        "max.queue.size": "16384",
        "max.queue.size.in.bytes": str(64 << 20),
        "key.converter": JSON_CONVERTER,
        "key.converter.schemas.enable": "true",
        "value.converter": JSON_CONVERTER,
        "value.converter.schemas.enable": "true",
        # One partition per table topic keeps each table's changes in commit order for the stream.
        "topic.creation.default.partitions": "1",
        "topic.creation.default.replication.factor": "-1",
    }
    if query := heartbeat_query(pipeline):
        properties["heartbeat.action.query"] = query
    exclusions = [rule for table in pipeline.tables if (rule := _column_exclusions(pipeline, table))]
    if exclusions:
        properties["column.exclude.list"] = ",".join(exclusions)
    keys = [_key_columns(pipeline, t) for t in pipeline.tables if t.primary_key]
    if keys:
        properties["message.key.columns"] = ";".join(keys)
    properties.update(pipeline.source.connector_properties)
    return properties


def provision_connector(
    connect: ConnectClient | KafkaConnectResource,
    pipeline: PipelineConfig,
    settings: Settings,
    *,
    kafka_config: Mapping[str, Any] | None = None,
    create_topics: bool = True,
) -> dict[str, Any]:
    """Create the pipeline's missing topics (see `cdc_pipeline.topics`), then create or update its
    connector and return the connector's stored config; unchanged configs are left alone.
    `create_topics=False` skips the topics (the caller created them).
    `kafka_config`: librdkafka settings of the cluster (default: the settings' bootstrap servers)."""
    if create_topics:  # False: the caller has just created them (control/provision.py)
        report = ensure_topics(kafka_config or {"bootstrap.servers": settings.kafka_bootstrap_servers}, pipeline)
        for line in report.lines():
            log.info("pipeline %s: %s", pipeline.name, line)
    name = connector_name(pipeline)
    desired = {**connector_config(pipeline, settings), "name": name}
    try:
        current = connect.connector_config(name)
    except ConnectError as exc:
        if not exc.not_found:
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
            done.append(f"created table {display_name(schema, table)}")
        from cdc_pipeline.control.source import set_full_identity  # control.source imports this module

        done += set_full_identity(conn, pipeline)
    return done

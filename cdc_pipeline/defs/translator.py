"""From pipeline config to Dagster asset specs, one method per kind of entity (as dagster-sling's
translator): subclass `CdcTranslator` and override a method to change keys, groups or metadata.

    source tables (PostgreSQL)  ->  Debezium connector  ->  Kafka topics  ->  streaming query  ->  ClickHouse tables
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import re
import typing
from collections.abc import Callable, Mapping
from typing import Any, Self

from clickhouse_connect.driver.binding import quote_identifier
from dagster import AssetKey, AssetSpec, ConfigurableResource, MetadataValue

from cdc_pipeline.config import PipelineConfig, TableConfig
from cdc_pipeline.connector import connector_config, connector_name
from cdc_pipeline.contract import CLICKHOUSE_ENGINE, CLICKHOUSE_META_COLUMNS, LIVE_ROWS
from cdc_pipeline.settings import Settings

_KEY_PART = re.compile(r"^[A-Za-z0-9_]+$")
_SECRET_KEY = re.compile(r"password|secret|token|credential|sasl\.jaas|ssl\.key", re.IGNORECASE)
MASK = "********"
DEFAULT_DATABASE = Settings.model_fields["clickhouse_database"].default
# The resources every pipeline of a code location shares: the alert channel. Every other resource key is the
# pipeline's own (`<prefix>_postgres`, ...), so two pipelines can read two source databases.
SHARED_RESOURCES = frozenset({"notifier"})


def mask_secrets(config: dict[str, Any]) -> dict[str, Any]:
    """`config` with the value of every secret-looking key replaced (config provider references too:
    they name where the secret lives, which is no business of a UI either)."""
    return {k: (MASK if _SECRET_KEY.search(k) and v else v) for k, v in config.items()}


def key_part(name: str) -> str:
    """An exact source name as an asset key component: Dagster allows only letters, digits and `_` in the
    names it derives from keys. A name with other characters gets them replaced by `_` and a short hash of
    the exact name, so `"Order Items"` and `order_items` stay two assets."""
    if _KEY_PART.match(name):
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', name)}_{digest}"


class CdcTranslator:
    """Asset keys, groups, kinds, descriptions and metadata for one pipeline.

    One instance builds everything of a code location (`build_definitions(..., translator=...)`): the
    assets and checks, and the jobs and sensors that record observations and alerts to the same keys.
    It reads no settings: `database` is the default replica database (CDC_CLICKHOUSE_DATABASE, when
    pipeline.yaml names none) and `connector` the rendered connector config shown as metadata (secrets
    masked); `from_settings` fills both from `Settings`."""

    def __init__(
        self,
        pipeline: PipelineConfig,
        *,
        database: str = DEFAULT_DATABASE,
        connector: Mapping[str, str] | None = None,
        prefix: str = "",
    ) -> None:
        self.pipeline = pipeline
        self.database = database
        self.connector = dict(connector or {})
        if prefix and not _KEY_PART.match(prefix):
            raise ValueError(f"prefix {prefix!r} of pipeline {pipeline.name}: use letters, digits and _")
        self.prefix = prefix

    @classmethod
    def from_settings(cls, pipeline: PipelineConfig, settings: Settings, *, prefix: str = "") -> Self:
        return cls(
            pipeline,
            database=settings.clickhouse_database,
            connector=connector_config(pipeline, settings),
            prefix=prefix,
        )

    # Names of the pipeline's jobs, ops, sensors, schedules and resource keys. Without a prefix (one pipeline
    # in the code location) they are the plain names (`start_stream`, `postgres`); with one, `<prefix>_<name>`,
    # so several pipelines live side by side in one code location.
    def name(self, base: str) -> str:
        """The name of this pipeline's job, op, sensor or schedule `base`."""
        return f"{self.prefix}_{base}" if self.prefix else base

    def resource_key(self, kind: str) -> str:
        """The key under which this pipeline's resource `kind` (`postgres`, `kafka`, ...) is bound."""
        return kind if kind in SHARED_RESOURCES else self.name(kind)

    def with_resource_keys(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` (an op, asset, check or sensor body) taking its resources under this pipeline's keys: its
        resource parameters (`control_plane: ControlPlaneResource`, ...) are advertised to Dagster as
        `resource_key(name)` and handed to `fn` under their own names. Unchanged without a prefix."""
        hints = typing.get_type_hints(fn)
        renamed = {
            name: self.resource_key(name)
            for name in inspect.signature(fn).parameters
            if isinstance(hints.get(name), type) and issubclass(hints[name], ConfigurableResource)
        }
        renamed = {name: key for name, key in renamed.items() if key != name}
        if not renamed:
            return fn
        original = {key: name for name, key in renamed.items()}
        signature = inspect.signature(fn)
        parameters = [
            p.replace(name=renamed.get(p.name, p.name), annotation=hints.get(p.name, p.annotation))
            for p in signature.parameters.values()
        ]

        if inspect.isgeneratorfunction(fn):  # Dagster tells generator bodies (yielding results) apart

            @functools.wraps(fn)
            def scoped_generator(*args: Any, **kwargs: Any) -> Any:
                yield from fn(*args, **{original.get(k, k): v for k, v in kwargs.items()})

            scoped: Callable[..., Any] = scoped_generator
        else:

            @functools.wraps(fn)
            def scoped_function(*args: Any, **kwargs: Any) -> Any:
                return fn(*args, **{original.get(k, k): v for k, v in kwargs.items()})

            scoped = scoped_function
        scoped.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=parameters, return_annotation=hints.get("return", signature.return_annotation)
        )
        return scoped

    # Keys. Every key starts with the pipeline name, so several pipelines share one code location.
    def source_key(self, table: TableConfig) -> AssetKey:
        return AssetKey([self.pipeline.name, "postgres", key_part(table.schema_name), key_part(table.table_name)])

    def connector_key(self) -> AssetKey:
        return AssetKey([self.pipeline.name, "debezium_connector"])

    def topic_key(self, table: TableConfig) -> AssetKey:
        return AssetKey([self.pipeline.name, "kafka", self.pipeline.topic_for(table).replace(".", "__")])

    def stream_key(self) -> AssetKey:
        return AssetKey([self.pipeline.name, "streaming_query"])

    def sink_key(self, table: TableConfig) -> AssetKey:
        return AssetKey([self.pipeline.name, "clickhouse", self.pipeline.sink_table(table)])

    def warehouse_key(self, table: TableConfig) -> AssetKey:
        return AssetKey([self.pipeline.name, "warehouse", self.pipeline.sink_table(table)])

    def replica_keys(self, table: TableConfig) -> list[AssetKey]:
        """The asset keys of `table`'s replicas, one per sink it goes to."""
        return [self.sink_key(table) if sink == "clickhouse" else self.warehouse_key(table) for sink in table.sinks]

    # Specs.
    def source_spec(self, table: TableConfig) -> AssetSpec:
        captured = "every column" if table.columns is None else table.columns.model_dump(exclude_none=True)
        return AssetSpec(
            self.source_key(table),
            description=f"PostgreSQL table {table.name}, captured by the Debezium connector ({captured}).",
            group_name=f"{self.pipeline.name}_source",
            kinds={"postgres"},
            metadata={
                "table": table.name, "primary_key": MetadataValue.json(table.primary_key or "the table's own"),
                "columns": MetadataValue.json(captured),
            },
        )  # fmt: skip

    def connector_spec(self) -> AssetSpec:
        config = {**self.connector, "name": connector_name(self.pipeline)}
        return AssetSpec(
            self.connector_key(),
            description=(
                f"Debezium PostgreSQL connector {connector_name(self.pipeline)}: logical decoding (pgoutput) from "
                f"slot {self.pipeline.slot_name} and publication {self.pipeline.publication_name} into Kafka. "
                "Materialize (the `provision` job) to check the source and create or update it (idempotent)."
            ),
            group_name=f"{self.pipeline.name}_capture",
            kinds={"debezium", "kafka"},
            deps=[self.source_key(t) for t in self.pipeline.tables],
            metadata={
                "connector": connector_name(self.pipeline),
                "slot": self.pipeline.slot_name,
                "publication": self.pipeline.publication_name,
                "signal_table": self.pipeline.source.signal_table,
                "config": MetadataValue.json(mask_secrets(config)),
            },
        )

    def topic_spec(self, table: TableConfig) -> AssetSpec:
        topic = self.pipeline.topic_for(table)
        return AssetSpec(
            self.topic_key(table),
            description=f"Kafka topic {topic}: every change of {table.name}, in commit order (one partition).",
            group_name=f"{self.pipeline.name}_capture",
            kinds={"kafka"},
            deps=[self.connector_key()],
            metadata={"topic": topic, "partitions": 1, "format": "Debezium JSON envelope with schemas"},
        )

    def stream_spec(self) -> AssetSpec:
        stream = self.pipeline.stream
        return AssetSpec(
            self.stream_key(),
            description=(
                f"Spark Structured Streaming query {self.pipeline.query_name}: applies every change to the ClickHouse "
                "replicas, exactly once in effect. Controlled by the start/stop/restart_stream jobs; its metrics "
                "(rates, batch duration, lag, dead letters) are recorded as observations by the sensors."
            ),
            group_name=f"{self.pipeline.name}_streaming",
            kinds={"spark"},
            deps=[self.topic_key(t) for t in self.pipeline.tables],
            metadata={
                "query_name": self.pipeline.query_name, "trigger_interval": stream.trigger_interval,
                "max_offsets_per_trigger": stream.max_offsets_per_trigger,
                "consumer_group": self.pipeline.consumer_group, "dlq_topic": self.pipeline.dlq_topic,
            },
        )  # fmt: skip

    def sink_spec(self, table: TableConfig) -> AssetSpec:
        database = self.pipeline.clickhouse_database(self.database)
        name = self.pipeline.sink_table(table)
        key = (
            ", ".join(quote_identifier(c) for c in table.primary_key)
            if table.primary_key
            else "the source table's primary key"
        )
        ddl = (
            f"CREATE TABLE {quote_identifier(database)}.{quote_identifier(name)} (\n"
            "  <captured columns, types from the change events' schemas>,\n  "
            + ",\n  ".join(f"{n} {t}" for n, t in CLICKHOUSE_META_COLUMNS)
            + f"\n) ENGINE = {CLICKHOUSE_ENGINE}\n"
            + (f"PARTITION BY {table.partition_by}\n" if table.partition_by else "")
            + f"ORDER BY ({key})"
        )
        return AssetSpec(
            self.sink_key(table),
            description=(
                f"ClickHouse replica of {table.name}. Query it with FINAL (deleted rows are hidden); the asset "
                "checks prove it matches the source."
            ),
            group_name=f"{self.pipeline.name}_sink",
            kinds={"clickhouse"},
            deps=[self.stream_key()],
            metadata={
                "database": database, "table": name, "source_table": table.name,
                "ddl": MetadataValue.md(f"```sql\n{ddl}\n```"),
            },
        )  # fmt: skip

    def warehouse_spec(self, table: TableConfig) -> AssetSpec:
        schema = self.pipeline.clickhouse_database(self.database)
        name = self.pipeline.sink_table(table)
        return AssetSpec(
            self.warehouse_key(table),
            description=(
                f"PostgreSQL warehouse replica of {table.name}: table {schema}.{name} (live rows in the view "
                f"{schema}.{name}_live, i.e. WHERE {LIVE_ROWS}); the asset checks prove it matches the source."
            ),
            group_name=f"{self.pipeline.name}_sink",
            kinds={"postgres"},
            deps=[self.stream_key()],
            metadata={"schema": schema, "table": name, "source_table": table.name},
        )

"""The pipeline definition (`pipeline.yaml`): which tables are captured, and how they are named in
Kafka, Spark and ClickHouse. Adding a table is a change to this file only; everything downstream
derives its names from the loaded `PipelineConfig`."""

from __future__ import annotations

import os
import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

CONFIG_ENV_VAR = "CDC_PIPELINE_CONFIG"
DEFAULT_CONFIG_FILE = Path("pipeline.yaml")

# Unquoted PostgreSQL identifiers fold to lower case, so only lower-case names mean the same in YAML and SQL.
PgIdentifier = Annotated[str, StringConstraints(pattern=r"^[a-z_][a-z0-9_]*$", max_length=63)]
PipelineName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$", max_length=48)]
SlotName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,63}$")]
QualifiedName = Annotated[str, StringConstraints(pattern=r"^[a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*$")]
TableName = Annotated[str, StringConstraints(pattern=r"^([a-z_][a-z0-9_]*\.)?[a-z_][a-z0-9_]*$")]
_CLICKHOUSE_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
ClickHouseIdentifier = Annotated[str, StringConstraints(pattern=_CLICKHOUSE_NAME, max_length=200)]
TopicName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]+$", max_length=200)]

_TRIGGER_INTERVAL = re.compile(r"^(\d+)\s+(milliseconds?|seconds?|minutes?)$")
_UNIT_MS = {"millisecond": 1, "second": 1_000, "minute": 60_000}
_SINK_PLACEHOLDERS = {"schema", "table"}


class PipelineConfigError(ValueError):
    """`pipeline.yaml` is missing, unparsable or invalid; the message names the file and each bad key."""


def split_qualified(name: str) -> tuple[str, str]:
    """`schema.table` as `(schema, table)`."""
    schema, _, table = name.partition(".")
    return schema, table


def trigger_interval_ms(interval: str) -> int:
    """A Spark trigger interval such as `5 seconds` in milliseconds; ValueError when unparsable."""
    match = _TRIGGER_INTERVAL.match(interval.strip())
    if not match:
        raise ValueError(f"{interval!r} is not '<N> milliseconds|seconds|minutes'")
    return int(match[1]) * _UNIT_MS[match[2].removesuffix("s")]


class _Model(BaseModel):
    # Unknown keys are typos: fail instead of silently ignoring them.
    model_config = ConfigDict(extra="forbid")


class ColumnFilter(_Model):
    """Which columns of a table are captured: an allow list or a deny list, not both."""

    include: list[PgIdentifier] | None = Field(None, description="Capture only these columns.")
    exclude: list[PgIdentifier] | None = Field(None, description="Capture every column except these.")

    @model_validator(mode="after")
    def _exactly_one(self) -> ColumnFilter:
        if (self.include is None) == (self.exclude is None):
            raise ValueError("set exactly one of 'include' or 'exclude'")
        if not (self.include or self.exclude):
            raise ValueError("the column list is empty")
        return self

    def captures(self, column: str) -> bool:
        """Whether `column` reaches Kafka under this filter."""
        return column in self.include if self.include is not None else column not in (self.exclude or [])


class TableConfig(_Model):
    """One captured source table and its ClickHouse replica."""

    name: TableName = Field(
        description="Source table as `schema.table`; an unqualified name means the first of `source.schemas`."
    )
    primary_key: list[PgIdentifier] | None = Field(
        None,
        min_length=1,
        description="Columns that key the Kafka messages and the replica; default: the table's primary key.",
    )
    columns: ColumnFilter | None = Field(None, description="Column filter; default: every column.")
    clickhouse_table: ClickHouseIdentifier | None = Field(
        None, description="ClickHouse table name; default: `sink.clickhouse.table_name` rendered for this table."
    )
    partition_by: str | None = Field(
        None, min_length=1, description="ClickHouse `PARTITION BY` expression of the replica, e.g. toYYYYMM(ts)."
    )

    @property
    def schema_name(self) -> str:
        """The source schema (valid once loaded: names are qualified by `PipelineConfig`)."""
        return split_qualified(self.name)[0]

    @property
    def table_name(self) -> str:
        """The source table without its schema."""
        return split_qualified(self.name)[1]


class SourceConfig(_Model):
    """The PostgreSQL side: schemas, replication slot, publication and Debezium helper tables."""

    schemas: list[PgIdentifier] = Field(
        default_factory=lambda: ["public"], min_length=1, description="Schemas that captured tables may come from."
    )
    topic_prefix: TopicName | None = Field(
        None, description="Debezium topic prefix; topics are `<prefix>.<schema>.<table>`. Default: the name."
    )
    slot_name: SlotName | None = Field(None, description="Logical replication slot. Default: `cdc_<name>`.")
    publication_name: PgIdentifier | None = Field(None, description="Publication. Default: `cdc_<name>`.")
    signal_table: QualifiedName = Field(
        "public.cdc_signal", description="Debezium signal table (`schema.table`), used for incremental snapshots."
    )
    heartbeat_table: QualifiedName | None = Field(
        None, description="Table the connector writes a heartbeat row to, so the slot advances on idle tables."
    )
    heartbeat_interval_ms: int = Field(10_000, ge=0, description="Heartbeat interval; 0 disables heartbeats.")
    snapshot_chunk_size: int = Field(1024, gt=0, description="Rows per chunk of an incremental snapshot.")
    topic_config: dict[str, str] = Field(
        default_factory=dict,
        description="Kafka topic configs for the topics provisioning creates, over the defaults "
        "cleanup.policy=delete, retention.ms=-1, retention.bytes=-1 (e.g. min.insync.replicas).",
    )
    set_replica_identity: bool = Field(
        False,
        description="Let provisioning run ALTER TABLE ... REPLICA IDENTITY FULL on captured tables whose replica "
        "identity does not carry their key (needs the tables' owner; the WAL then holds whole old rows).",
    )
    connector_properties: dict[str, str] = Field(
        default_factory=dict,
        description="Extra Debezium/Connect properties, applied last (e.g. errors.max.retries, poll.interval.ms).",
    )


class ClickHouseSinkConfig(_Model):
    """Where the replicas live in ClickHouse."""

    database: ClickHouseIdentifier | None = Field(
        None, description="ClickHouse database; default: CDC_CLICKHOUSE_DATABASE at runtime."
    )
    table_name: str = Field(
        "{schema}_{table}", description="Template of replica table names; placeholders `{schema}` and `{table}`."
    )

    @field_validator("table_name")
    @classmethod
    def _template_placeholders(cls, value: str) -> str:
        try:
            fields = {field for _, field, _, _ in string.Formatter().parse(value) if field is not None}
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a valid template: {exc}") from exc
        if unknown := fields - _SINK_PLACEHOLDERS:
            raise ValueError(f"unknown placeholder(s) {sorted(unknown)}; use {{schema}} and {{table}}")
        return value


class SinkConfig(_Model):
    """The sink systems."""

    clickhouse: ClickHouseSinkConfig = Field(default_factory=ClickHouseSinkConfig, description="ClickHouse sink.")


class StreamConfig(_Model):
    """The Spark Structured Streaming query that applies the changes."""

    trigger_interval: str = Field("5 seconds", description="Micro-batch interval: `<N> milliseconds|seconds|minutes`.")
    checkpoint_location: str | None = Field(
        None, description="Spark checkpoint directory or URI; default: `<stack dir>/checkpoints/<name>`."
    )
    max_offsets_per_trigger: int = Field(10_000, gt=0, description="Upper bound of Kafka records per micro-batch.")
    starting_offsets: Literal["earliest", "latest"] = Field(
        "earliest", description="Where a query without a checkpoint starts reading."
    )
    dlq_topic: TopicName | None = Field(
        None, description="Topic for records that cannot be applied; default: `<topic_prefix>.dlq`."
    )
    consumer_group: str | None = Field(
        None,
        min_length=1,
        description="Kafka group the stream commits processed offsets to; default: `cdc-<name>-stream`.",
    )
    query_name: PgIdentifier | None = Field(None, description="Spark streaming query name; default: `cdc_<name>`.")

    @field_validator("trigger_interval")
    @classmethod
    def _trigger_parses(cls, value: str) -> str:
        trigger_interval_ms(value)
        return value

    @property
    def trigger_interval_ms(self) -> int:
        """The trigger interval in milliseconds."""
        return trigger_interval_ms(self.trigger_interval)


class PipelineConfig(_Model):
    """A whole pipeline: source, captured tables, sink and stream. Derived names are properties."""

    name: PipelineName = Field(description="Pipeline name; the default slot, topic and group names derive from it.")
    source: SourceConfig = Field(default_factory=SourceConfig, description="PostgreSQL source.")
    tables: list[TableConfig] = Field(min_length=1, description="Captured tables.")
    sink: SinkConfig = Field(default_factory=SinkConfig, description="Sink systems.")
    stream: StreamConfig = Field(default_factory=StreamConfig, description="Streaming query.")

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineConfig:
        errors: list[InitErrorDetails] = []
        helper_tables = {self.source.signal_table, self.source.heartbeat_table} - {None}
        seen_names: dict[str, int] = {}
        seen_sinks: dict[str, int] = {}
        for i, table in enumerate(self.tables):
            if "." not in table.name:
                table.name = f"{self.source.schemas[0]}.{table.name}"
            if table.schema_name not in self.source.schemas:
                errors.append(_detail(("tables", i, "name"), f"schema {table.schema_name!r} is not in source.schemas"))
            if table.name in helper_tables:
                errors.append(_detail(("tables", i, "name"), f"{table.name} is the signal or heartbeat table"))
            if table.name in seen_names:
                errors.append(_detail(("tables", i, "name"), f"{table.name} repeats tables[{seen_names[table.name]}]"))
                continue
            seen_names[table.name] = i
            sink = self.sink_table(table)
            if not re.match(_CLICKHOUSE_NAME, sink):
                errors.append(_detail(("tables", i, "clickhouse_table"), f"{sink!r} is not a valid ClickHouse name"))
            elif sink in seen_sinks:
                errors.append(
                    _detail(
                        ("tables", i, "clickhouse_table"), f"{sink} repeats tables[{seen_sinks[sink]}]'s sink table"
                    )
                )
            seen_sinks.setdefault(sink, i)
            if table.primary_key and table.columns:
                dropped = [c for c in table.primary_key if not table.columns.captures(c)]
                if dropped:
                    errors.append(_detail(("tables", i, "primary_key"), f"{dropped} are filtered out by 'columns'"))
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self

    @property
    def topic_prefix(self) -> str:
        """Debezium's topic prefix (`source.topic_prefix`, default the pipeline name)."""
        return self.source.topic_prefix or self.name

    @property
    def slot_name(self) -> str:
        """The logical replication slot."""
        return self.source.slot_name or f"cdc_{self.name}"

    @property
    def publication_name(self) -> str:
        """The PostgreSQL publication."""
        return self.source.publication_name or f"cdc_{self.name}"

    @property
    def dlq_topic(self) -> str:
        """The dead-letter topic of the stream."""
        return self.stream.dlq_topic or f"{self.topic_prefix}.dlq"

    @property
    def notification_topic(self) -> str:
        """Debezium's notification topic (snapshot progress and completion; read by backfills)."""
        return f"{self.topic_prefix}.notifications"

    @property
    def consumer_group(self) -> str:
        """The Kafka consumer group the stream commits processed offsets to (for lag monitoring)."""
        return self.stream.consumer_group or f"cdc-{self.name}-stream"

    @property
    def query_name(self) -> str:
        """The Spark streaming query name."""
        return self.stream.query_name or f"cdc_{self.name}"

    @property
    def signal_table_parts(self) -> tuple[str, str]:
        """The signal table as `(schema, table)`."""
        return split_qualified(self.source.signal_table)

    @property
    def heartbeat_table_parts(self) -> tuple[str, str] | None:
        """The heartbeat table as `(schema, table)`, or None when heartbeats write no table."""
        return split_qualified(self.source.heartbeat_table) if self.source.heartbeat_table else None

    def checkpoint_location(self, stack_dir: Path) -> str:
        """The Spark checkpoint location: configured, or `<stack_dir>/checkpoints/<name>`."""
        return self.stream.checkpoint_location or str(stack_dir / "checkpoints" / self.name)

    def clickhouse_database(self, default: str) -> str:
        """The ClickHouse database: configured, or `default` (the CDC_CLICKHOUSE_DATABASE setting)."""
        return self.sink.clickhouse.database or default

    def table(self, name: str) -> TableConfig:
        """A captured table by `schema.table` (or unqualified, in the first schema); KeyError if not captured."""
        qualified = name if "." in name else f"{self.source.schemas[0]}.{name}"
        for table in self.tables:
            if table.name == qualified:
                return table
        raise KeyError(f"{name} is not a table of pipeline {self.name}")

    def topic_for(self, table: TableConfig) -> str:
        """The Kafka topic Debezium writes `table`'s changes to."""
        return f"{self.topic_prefix}.{table.name}"

    def topics(self) -> list[str]:
        """Every captured table's topic, in `tables` order."""
        return [self.topic_for(table) for table in self.tables]

    def table_for_topic(self, topic: str) -> TableConfig | None:
        """The captured table whose changes `topic` carries, or None (e.g. heartbeat or signal topics)."""
        return next((table for table in self.tables if self.topic_for(table) == topic), None)

    def sink_table(self, table: TableConfig) -> str:
        """The ClickHouse replica table of `table`."""
        return table.clickhouse_table or self.sink.clickhouse.table_name.format(
            schema=table.schema_name, table=table.table_name
        )


def _detail(loc: tuple[str | int, ...], message: str) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError("pipeline_config", message), loc=loc, input=None)


def default_config_path() -> Path:
    """Where the pipeline definition is read from: $CDC_PIPELINE_CONFIG (environment or `.env`), else
    `pipeline.yaml` in the cwd."""
    if os.environ.get(CONFIG_ENV_VAR):
        return Path(os.environ[CONFIG_ENV_VAR])
    from cdc_pipeline.settings import Settings  # settings never import this module

    return Settings().pipeline_config


def format_location(loc: tuple[str | int, ...]) -> str:
    """A pydantic error location as a dotted key path, e.g. `tables[2].primary_key`."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path or "(top level)"


def parse_pipeline_config(data: Any, source: str = "pipeline.yaml") -> PipelineConfig:
    """Validate already-parsed YAML; PipelineConfigError names `source` and each bad key path."""
    if not isinstance(data, dict):
        raise PipelineConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        # "Value error, " is pydantic's wrapper around our own messages: noise to a reader of the YAML.
        lines = [
            f"{source}: {format_location(e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
        ]
        raise PipelineConfigError("\n".join(lines)) from None


def load_pipeline_config(path: Path | str | None = None) -> PipelineConfig:
    """Read and validate the pipeline definition from `path`, or from `default_config_path()`."""
    config_path = Path(path) if path is not None else default_config_path()
    try:
        text = config_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineConfigError(f"{config_path}: file not found (set {CONFIG_ENV_VAR} or pass a path)") from None
    except OSError as exc:
        raise PipelineConfigError(f"{config_path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PipelineConfigError(f"{config_path}: invalid YAML: {where}{problem}") from None
    return parse_pipeline_config(data, str(config_path))

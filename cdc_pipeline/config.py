"""The pipeline definition (`pipeline.yaml`): which tables are captured, and how they are named in
Kafka, Spark and ClickHouse. Adding a table is a change to this file only; everything downstream
derives its names from the loaded `PipelineConfig`."""

from __future__ import annotations

import functools
import os
import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from cdc_pipeline.contract import IS_DELETED, VERSION
from cdc_pipeline.sqlcheck import CLICKHOUSE_CLAUSES, check_expression

CONFIG_ENV_VAR = "CDC_PIPELINE_CONFIG"

# Names the pipeline itself creates (publication, query): unquoted lower-case PostgreSQL identifiers.
PgIdentifier = Annotated[str, StringConstraints(pattern=r"^[a-z_][a-z0-9_]*$", max_length=63)]
PipelineName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$", max_length=48)]
SlotName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,63}$")]
SinkName = Literal["clickhouse", "warehouse"]  # where a table's replica goes
_CLICKHOUSE_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
ClickHouseIdentifier = Annotated[str, StringConstraints(pattern=_CLICKHOUSE_NAME, max_length=200)]
TopicName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]+$", max_length=200)]

OutOfRangePolicy = Literal["clamp", "text", "dlq"]

_TRIGGER_INTERVAL = re.compile(r"^(\d+)\s+(milliseconds?|seconds?|minutes?)$")
_UNIT_MS = {"millisecond": 1, "second": 1_000, "minute": 60_000}
_SINK_PLACEHOLDERS = {"schema", "table"}


class PipelineConfigError(ValueError):
    """`pipeline.yaml` is missing, unparsable or invalid; the message names the file and each bad key."""


# PostgreSQL's rules, as in SQL: an unquoted name is folded to lower case, a double-quoted name is exact
# (case, spaces, any character; `""` is a quote inside). Unquoted names are only accepted in lower case:
# `public.User` would silently mean `public.user`, which is rarely what a YAML author means.
_UNQUOTED_CHARS = re.compile(r"[A-Za-z0-9_$]+")
_PLAIN_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
MAX_IDENTIFIER_BYTES = 63  # NAMEDATALEN - 1: PostgreSQL truncates longer names


def quote_name(name: str) -> str:
    """`name` in pipeline.yaml (and SQL) syntax: bare when it is a plain lower-case name, else quoted."""
    return name if _PLAIN_NAME.match(name) else '"' + name.replace('"', '""') + '"'


def display_name(*parts: str) -> str:
    """Exact name parts in pipeline.yaml syntax, e.g. `public."User"`."""
    return ".".join(quote_name(part) for part in parts)


def _fold_hint(text: str, start: int, end: int) -> str:
    name = text[start:end]
    lower, exact = text[:start] + name.lower() + text[end:], text[:start] + quote_name(name) + text[end:]
    return f"write {lower} for the lower-case name, or {exact} for the exact one (in YAML: '{exact}')"


@functools.lru_cache(maxsize=4096)
def parse_name(text: str, max_parts: int = 1) -> tuple[str, ...]:
    """The exact name parts of `text` (1 to `max_parts` of them, dot-separated, each plain or quoted);
    ValueError with the fix when it is not a valid name."""
    if not isinstance(text, str) or not text:
        raise ValueError("a name cannot be empty")
    parts: list[str] = []
    pos = 0
    while True:
        if pos < len(text) and text[pos] == '"':
            end = pos + 1
            chars: list[str] = []
            while True:
                close = text.find('"', end)
                if close < 0:
                    raise ValueError(f'{text!r}: unterminated quoted name (close it with ")')
                chars.append(text[end:close])
                if text.startswith('"', close + 1):  # "" is one quote inside the name
                    chars.append('"')
                    end = close + 2
                    continue
                pos = close + 1
                break
            name = "".join(chars)
            if not name:
                raise ValueError(f"{text!r}: a quoted name cannot be empty")
        else:
            match = _UNQUOTED_CHARS.match(text, pos)
            if not match:
                found = repr(text[pos]) if pos < len(text) else "the end"
                raise ValueError(
                    f"{text!r}: expected a name at position {pos + 1}, found {found} (double-quote a name with "
                    "characters other than a-z, 0-9 and _)"
                )
            name = match.group()
            if name[0].isdigit() or "$" in name[:1]:
                raise ValueError(
                    f"{text!r}: an unquoted name cannot start with {name[0]!r}; quote it: {quote_name(name)}"
                )
            if name != name.lower():
                raise ValueError(
                    f"{text!r}: unquoted names fold to lower case in PostgreSQL, so {name} means {name.lower()}; "
                    + _fold_hint(text, pos, match.end())
                )
            pos = match.end()
        if len(name.encode()) > MAX_IDENTIFIER_BYTES:
            raise ValueError(f"{text!r}: {quote_name(name)} is longer than PostgreSQL's {MAX_IDENTIFIER_BYTES} bytes")
        parts.append(name)
        if pos == len(text):
            break
        if text[pos] != ".":
            if text[pos - 1] == '"':
                raise ValueError(
                    f"{text!r}: unexpected {text[pos]!r} at position {pos + 1}: a quoted name ends at its closing "
                    'quote (write "" for a quote inside it)'
                )
            rest = text[pos - len(name) :].split(".")[0]
            raise ValueError(
                f"{text!r}: unexpected {text[pos]!r} at position {pos + 1}: double-quote a name with characters "
                f"other than a-z, 0-9 and _, e.g. {quote_name(rest)} (in YAML: '{quote_name(rest)}')"
            )
        if len(parts) == max_parts:
            raise ValueError(f"{text!r}: expected at most {max_parts} dot-separated names, e.g. schema.table")
        pos += 1
    return tuple(parts)


def _check_captured_name(name: str) -> str:
    # Debezium limits: notifications list tables comma-separated; its publication DDL does not quote a
    # name that starts or ends with a double quote; a blank name part is dropped from topic names.
    if "," in name:
        raise ValueError(f"{quote_name(name)}: Debezium cannot capture a name containing ','")
    if name.startswith('"') or name.endswith('"'):
        raise ValueError(f"{quote_name(name)}: Debezium cannot capture a name that starts or ends with '\"'")
    if not name.strip():
        raise ValueError(f"{quote_name(name)}: a name of only spaces cannot be captured")
    return name


def _parse_column(text: str) -> str:
    return parse_name(text)[0]


def _parse_schema(text: str) -> str:
    return _check_captured_name(parse_name(text)[0])


def _canonical_table(text: str) -> str:
    parts = parse_name(text, 2)
    for part in parts:
        _check_captured_name(part)
    return display_name(*parts)


def _canonical_helper_table(text: str) -> str:
    parts = parse_name(text, 2)
    if len(parts) != 2:
        raise ValueError(f"{text!r}: expected schema.table")
    for part in parts:
        # Debezium parses signal.data.collection itself: a comma separates names, quotes are its quoting.
        if bad := {c for c in ",\"'`" if c in part}:
            raise ValueError(
                f"{text!r}: Debezium cannot use a signal or heartbeat table with {sorted(bad)} in its name"
            )
    return display_name(*parts)


# Column names as written in pipeline.yaml (`id`, `"createdAt"`), validated to their exact names.
ColumnName = Annotated[str, AfterValidator(_parse_column)]
SchemaName = Annotated[str, AfterValidator(_parse_schema)]
# `schema.table` or `table` in pipeline.yaml syntax; kept in canonical syntax (`public."User"`).
TableName = Annotated[str, AfterValidator(_canonical_table)]
HelperTableName = Annotated[str, AfterValidator(_canonical_helper_table)]


def split_qualified(name: str) -> tuple[str, str]:
    """A canonical `schema.table` (pipeline.yaml syntax) as its exact `(schema, table)` names."""
    parts = parse_name(name, 2)
    return (parts[0], parts[1]) if len(parts) == 2 else ("", parts[0])


_INVALID_TOPIC_CHAR = re.compile(r"[^A-Za-z0-9._-]")
MAX_TOPIC_LENGTH = 249


def debezium_topic_name(*parts: str) -> str:
    """The topic Debezium writes `prefix.schema.table` to: each UTF-16 unit other than a letter, digit,
    `.`, `_` or `-` becomes `_`, at most 249 characters (Debezium's AbstractTopicNamingStrategy)."""
    name = ".".join(parts)
    sanitized = _INVALID_TOPIC_CHAR.sub(lambda m: "_" * (2 if ord(m.group()) > 0xFFFF else 1), name)
    return sanitized[:MAX_TOPIC_LENGTH]


_INVALID_CLICKHOUSE_CHAR = re.compile(r"[^A-Za-z0-9_]")


def clickhouse_name_part(name: str) -> str:
    """A source name for a ClickHouse table name template: case kept, other characters than ASCII
    letters, digits and `_` replaced by `_` (the result is always quoted in SQL anyway)."""
    return _INVALID_CLICKHOUSE_CHAR.sub("_", name)


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

    include: list[ColumnName] | None = Field(None, description="Capture only these columns (exact names).")
    exclude: list[ColumnName] | None = Field(None, description="Capture every column except these (exact names).")

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
        description=(
            "Source table as `schema.table`; an unqualified name means the first of `source.schemas`. SQL rules: "
            'unquoted names are lower case, double-quoted ones exact (`public."User"`).'
        )
    )
    primary_key: list[ColumnName] | None = Field(
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
    out_of_range: dict[ColumnName, OutOfRangePolicy] | None = Field(
        None,
        description="Per column: what to do with dates/timestamps outside ClickHouse's range "
        "(clamp, text or dlq); default: `sink.clickhouse.out_of_range`.",
    )

    sinks: list[SinkName] = Field(
        default_factory=lambda: list[SinkName](["clickhouse"]),
        min_length=1,
        description="Where the replica goes: `clickhouse`, `warehouse` (the PostgreSQL warehouse of "
        "CDC_WAREHOUSE_DSN) or both; default: clickhouse.",
    )

    @field_validator("sinks")
    @classmethod
    def _distinct_sinks(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"each sink once: {value}")
        return value

    @field_validator("partition_by")
    @classmethod
    def _one_expression(cls, value: str | None) -> str | None:
        # Pasted into CREATE TABLE: one expression, not a way to add clauses or statements.
        return None if value is None else check_expression(value, "partition_by", "clickhouse", CLICKHOUSE_CLAUSES)

    @property
    def schema_name(self) -> str:
        """The exact source schema name (valid once loaded: names are qualified by `PipelineConfig`)."""
        return split_qualified(self.name)[0]

    @property
    def table_name(self) -> str:
        """The exact source table name, without its schema."""
        return split_qualified(self.name)[1]

    @property
    def collection_id(self) -> str:
        """The table as Debezium names it (in notifications, `data_collections`): `schema.table`, unquoted."""
        return f"{self.schema_name}.{self.table_name}"


class SourceConfig(_Model):
    """The PostgreSQL side: schemas, replication slot, publication and Debezium helper tables."""

    schemas: list[SchemaName] = Field(
        default_factory=lambda: ["public"], min_length=1, description="Schemas that captured tables may come from."
    )
    topic_prefix: TopicName | None = Field(
        None, description="Debezium topic prefix; topics are `<prefix>.<schema>.<table>`. Default: the name."
    )
    slot_name: SlotName | None = Field(None, description="Logical replication slot. Default: `cdc_<name>`.")
    publication_name: PgIdentifier | None = Field(None, description="Publication. Default: `cdc_<name>`.")
    signal_table: HelperTableName = Field(
        "public.cdc_signal", description="Debezium signal table (`schema.table`), used for incremental snapshots."
    )
    heartbeat_table: HelperTableName | None = Field(
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
    out_of_range: OutOfRangePolicy = Field(
        "clamp",
        description="Dates/timestamps outside ClickHouse's 1900-01-01..2299-12-31 (sentinels such as 0001-01-01, "
        "9999-12-31, 'infinity'): `clamp` stores the nearest representable value and counts it, `text` makes "
        "the column ISO 8601 text (exact), `dlq` dead-letters the row.",
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

    trigger_interval: str = Field(
        "1 second",
        description="Micro-batch interval: `<N> milliseconds|seconds|minutes`. A batch that takes longer starts the "
        "next one at once; an idle stream only asks Kafka for new offsets.",
    )
    checkpoint_location: str | None = Field(
        None, description="Spark checkpoint directory or URI; default: `<stack dir>/checkpoints/<name>`."
    )
    max_offsets_per_trigger: int = Field(
        10_000,
        gt=0,
        description="Upper bound of Kafka records per micro-batch; the stream lowers it when that many records "
        "would not fit the batch's byte budget (`max_bytes_per_trigger`).",
    )
    max_bytes_per_trigger: ByteSize | None = Field(
        None,
        gt=0,
        description="Byte budget of a micro-batch's Kafka records (key + value), e.g. `64MiB`; default: derived "
        "from the heap at start ((heap - 300 MiB) / 8: a 1 GiB driver, about 90 MiB). Offsets per trigger are "
        "lowered to fit it.",
    )
    read_parallelism: int | None = Field(
        None,
        gt=0,
        description="Spark tasks that read and decode a micro-batch (Kafka source `minPartitions`): a Kafka "
        "partition's offsets are split among them, so one busy partition uses every core. Default: Spark's "
        "default parallelism (the master's cores); 1: one task per Kafka partition.",
    )
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
    sink_retry_seconds: float = Field(
        300,
        gt=0,
        description="How long a batch retries a failing ClickHouse write (connection, timeout, memory, a detached "
        "table...) before it fails uncommitted; rows are never dead-lettered for such errors.",
    )

    @field_validator("trigger_interval")
    @classmethod
    def _trigger_parses(cls, value: str) -> str:
        trigger_interval_ms(value)
        return value

    @property
    def trigger_interval_ms(self) -> int:
        """The trigger interval in milliseconds."""
        return trigger_interval_ms(self.trigger_interval)


# --- aggregates (windowed aggregations, see cdc_pipeline/streaming/aggregates.py) --------------------------

_DURATION = re.compile(r"^(\d+)\s*(seconds?|minutes?|hours?|days?)$")
_DURATION_US = {"second": 1_000_000, "minute": 60_000_000, "hour": 3_600_000_000, "day": 86_400_000_000}
AggregateFunction = Literal["count", "sum", "avg", "min", "max", "approx_count_distinct"]
# Columns every aggregate table has besides its group and measure columns.
AGGREGATE_RESERVED = ("window_start", "window_end", VERSION, IS_DELETED)


def duration_us(text: str) -> int:
    """A duration such as `5 minutes` in microseconds; ValueError when unparsable."""
    match = _DURATION.match(text.strip()) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"{text!r} is not '<N> seconds|minutes|hours|days'")
    return int(match[1]) * _DURATION_US[match[2].removesuffix("s")]


def _duration(text: str) -> str:
    duration_us(text)
    return text


Duration = Annotated[str, AfterValidator(_duration)]


class WindowConfig(_Model):
    """A tumbling window (`size` only) or a sliding one (`size` and `slide`), aligned to the Unix epoch."""

    size: Duration = Field(description="Window length, e.g. `1 minute`, `5 minutes`, `1 hour`.")
    slide: Duration | None = Field(
        None, description="Sliding windows: a new window starts every `slide` (must divide `size`); null: tumbling."
    )

    @model_validator(mode="after")
    def _sizes(self) -> WindowConfig:
        if duration_us(self.size) == 0:
            raise ValueError("size must be positive")
        if self.slide is not None:
            size, slide = duration_us(self.size), duration_us(self.slide)
            if slide == 0 or slide > size or size % slide:
                raise ValueError(f"slide ({self.slide}) must be positive and divide size ({self.size})")
        return self

    @property
    def size_us(self) -> int:
        return duration_us(self.size)

    @property
    def slide_us(self) -> int:
        return duration_us(self.slide) if self.slide is not None else self.size_us


class MeasureConfig(_Model):
    """One output column of an aggregate: `function` of `column` per window and group."""

    name: ClickHouseIdentifier = Field(description="Output column name in the aggregate table.")
    function: AggregateFunction = Field(
        description="count (rows, or non-NULL values of `column`), sum, avg, min, max, or approx_count_distinct "
        "(ClickHouse uniq: approximate, exact for small counts)."
    )
    column: ColumnName | None = Field(None, description="Source column; required except for count.")

    @model_validator(mode="after")
    def _column(self) -> MeasureConfig:
        if self.column is None and self.function != "count":
            raise ValueError(f"function {self.function} needs a column")
        return self


class AggregateConfig(_Model):
    """A windowed aggregation over the current state of a captured table's rows (see README, Aggregates)."""

    name: PgIdentifier = Field(description="Aggregate name ([a-z_][a-z0-9_]*); asset key and default table name.")
    table: TableName = Field(description="The captured source table (as in `tables`).")
    event_time: ColumnName = Field(description="Column that places a row in windows (timestamp, timestamptz, date).")
    window: WindowConfig = Field(description="Tumbling (`size`) or sliding (`size`, `slide`) windows.")
    watermark_delay: Duration = Field(
        "0 seconds",
        description="Windows ending before (max event time seen - delay) are closed; changes to them are late.",
    )
    group_by: list[ColumnName] = Field(default_factory=list, description="Group columns (source names).")
    measures: list[MeasureConfig] = Field(min_length=1, description="Output measures.")
    filter: str | None = Field(
        None, min_length=1, description="Boolean ClickHouse expression on the replica's columns, e.g. status = 'paid'."
    )
    clickhouse_table: ClickHouseIdentifier | None = Field(None, description="Aggregate table; default `agg_<name>`.")

    @field_validator("filter")
    @classmethod
    def _one_expression(cls, value: str | None) -> str | None:
        return None if value is None else check_expression(value, "filter", "clickhouse", CLICKHOUSE_CLAUSES)

    @model_validator(mode="after")
    def _names(self) -> AggregateConfig:
        seen: dict[str, str] = {}
        for what, name in [*(("group_by", g) for g in self.group_by), *(("measures", m.name) for m in self.measures)]:
            if name in AGGREGATE_RESERVED:
                raise ValueError(f"{what}: {name!r} is reserved in aggregate tables ({', '.join(AGGREGATE_RESERVED)})")
            if name in seen:
                raise ValueError(f"{what}: {name!r} repeats a name of {seen[name]} (output columns must differ)")
            seen[name] = what
        return self

    @property
    def sink_table(self) -> str:
        return self.clickhouse_table or f"agg_{self.name}"

    def columns(self) -> list[str]:
        """Source columns the aggregate reads (besides those its filter names)."""
        used = [self.event_time, *self.group_by, *(m.column for m in self.measures if m.column)]
        return list(dict.fromkeys(used))


class PipelineConfig(_Model):
    """A whole pipeline: source, captured tables, sink and stream. Derived names are properties."""

    name: PipelineName = Field(description="Pipeline name; the default slot, topic and group names derive from it.")
    source: SourceConfig = Field(default_factory=SourceConfig, description="PostgreSQL source.")
    tables: list[TableConfig] = Field(min_length=1, description="Captured tables.")
    sink: SinkConfig = Field(default_factory=SinkConfig, description="Sink systems.")
    stream: StreamConfig = Field(default_factory=StreamConfig, description="Streaming query.")
    aggregates: list[AggregateConfig] = Field(
        default_factory=list, description="Windowed aggregations over the replicas (see README, Aggregates)."
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineConfig:
        errors: list[InitErrorDetails] = []
        helper_tables = {
            split_qualified(name) for name in (self.source.signal_table, self.source.heartbeat_table) if name
        }
        seen_names: dict[tuple[str, str], int] = {}
        seen_sinks: dict[str, int] = {}
        # Kafka refuses a topic whose name equals another's once '.' and '_' are treated alike.
        seen_topics: dict[str, tuple[str, str]] = {
            self._topic_key(self.topic_for_parts(*parts)): (display_name(*parts), "the signal or heartbeat table")
            for parts in helper_tables
        }
        for i, table in enumerate(self.tables):
            if len(parse_name(table.name, 2)) == 1:  # unqualified: the first schema
                table.name = f"{quote_name(self.source.schemas[0])}.{table.name}"
            parts = (table.schema_name, table.table_name)
            if table.schema_name not in self.source.schemas:
                hint = (
                    ""
                    if quote_name(table.schema_name) == table.schema_name
                    else f" (add it as '{quote_name(table.schema_name)}')"
                )
                errors.append(
                    _detail(("tables", i, "name"), f"schema {table.schema_name!r} is not in source.schemas{hint}")
                )
            if parts in helper_tables:
                errors.append(_detail(("tables", i, "name"), f"{table.name} is the signal or heartbeat table"))
            if parts in seen_names:
                errors.append(_detail(("tables", i, "name"), f"{table.name} repeats tables[{seen_names[parts]}]"))
                continue
            seen_names[parts] = i
            topic = self.topic_for(table)
            other = seen_topics.get(self._topic_key(topic))
            if other is not None:
                errors.append(
                    _detail(
                        ("tables", i, "name"),
                        f"{table.name} would be captured to topic {topic}, which collides with the topic of "
                        f"{other[1]} {other[0]} (Debezium replaces characters other than letters, digits, '.', '_' "
                        "and '-' with '_', and Kafka treats '.' and '_' alike): capture one of them in another "
                        "pipeline (another topic_prefix)",
                    )
                )
            seen_topics.setdefault(self._topic_key(topic), (table.name, f"tables[{i}]"))
            sink = self.sink_table(table)
            if not re.match(_CLICKHOUSE_NAME, sink):
                errors.append(
                    _detail(
                        ("tables", i, "clickhouse_table"),
                        f"{sink!r} is not a valid ClickHouse name ([A-Za-z_][A-Za-z0-9_]*): set clickhouse_table",
                    )
                )
            elif sink in seen_sinks:
                errors.append(
                    _detail(
                        ("tables", i, "clickhouse_table"),
                        f"{sink} repeats tables[{seen_sinks[sink]}]'s sink table "
                        "(set clickhouse_table to tell them apart)",
                    )
                )
            seen_sinks.setdefault(sink, i)
            if table.primary_key and table.columns:
                dropped = [c for c in table.primary_key if not table.columns.captures(c)]
                if dropped:
                    errors.append(_detail(("tables", i, "primary_key"), f"{dropped} are filtered out by 'columns'"))
        errors += self._aggregate_errors(seen_sinks)
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self

    def _aggregate_errors(self, replica_tables: dict[str, int]) -> list[InitErrorDetails]:
        errors: list[InitErrorDetails] = []
        names: dict[str, int] = {}
        tables: dict[str, int] = {}
        for i, aggregate in enumerate(self.aggregates):
            if aggregate.name in names:
                errors.append(
                    _detail(("aggregates", i, "name"), f"{aggregate.name} repeats aggregates[{names[aggregate.name]}]")
                )
            names.setdefault(aggregate.name, i)
            sink = aggregate.sink_table
            if sink in replica_tables or sink in tables:
                other = f"tables[{replica_tables[sink]}]" if sink in replica_tables else f"aggregates[{tables[sink]}]"
                errors.append(_detail(("aggregates", i, "clickhouse_table"), f"{sink} is already the table of {other}"))
            tables.setdefault(sink, i)
            try:
                table = self.table(aggregate.table)
            except KeyError:
                errors.append(
                    _detail(("aggregates", i, "table"), f"{aggregate.table} is not a captured table (add it to tables)")
                )
                continue
            aggregate.table = table.name
            if "clickhouse" not in table.sinks:
                errors.append(
                    _detail(
                        ("aggregates", i, "table"),
                        f"{table.name} has no ClickHouse replica (its sinks are {table.sinks}); aggregates are "
                        "computed from it: add clickhouse to its sinks",
                    )
                )
            if table.columns is not None:
                dropped = [quote_name(c) for c in aggregate.columns() if not table.columns.captures(c)]
                if dropped:
                    errors.append(
                        _detail(("aggregates", i), f"columns {dropped} are filtered out by {table.name}'s 'columns'")
                    )
        return errors

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
        database = self.sink.clickhouse.database or default
        if not re.fullmatch(_CLICKHOUSE_NAME, database):
            raise ValueError(f"ClickHouse database {database!r} (CDC_CLICKHOUSE_DATABASE): use letters, digits and _")
        return database

    def table(self, name: str) -> TableConfig:
        """A captured table by its pipeline.yaml name (`public.orders`, `public."User"`, or unqualified, in
        the first schema), or by Debezium's unquoted `schema.table`; KeyError if not captured."""
        try:
            parts = parse_name(name, 2)
        except ValueError:
            parts = None
        if parts is not None:
            wanted = parts if len(parts) == 2 else (self.source.schemas[0], parts[0])
            for table in self.tables:
                if (table.schema_name, table.table_name) == wanted:
                    return table
        for table in self.tables:
            if table.collection_id == name:
                return table
        raise KeyError(f"{name} is not a table of pipeline {self.name}")

    def topic_for(self, table: TableConfig) -> str:
        """The Kafka topic Debezium writes `table`'s changes to: `<prefix>.<schema>.<table>` with the exact
        names, characters Kafka does not allow replaced by `_` as Debezium does."""
        return self.topic_for_parts(table.schema_name, table.table_name)

    def topic_for_parts(self, schema: str, table: str) -> str:
        """The topic of the exact `schema`.`table` (see `topic_for`)."""
        return debezium_topic_name(self.topic_prefix, schema, table)

    @staticmethod
    def _topic_key(topic: str) -> str:
        return topic.replace(".", "_")

    def topics(self) -> list[str]:
        """Every captured table's topic, in `tables` order."""
        return [self.topic_for(table) for table in self.tables]

    def table_for_topic(self, topic: str) -> TableConfig | None:
        """The captured table whose changes `topic` carries, or None (e.g. heartbeat or signal topics)."""
        return next((table for table in self.tables if self.topic_for(table) == topic), None)

    def sink_table(self, table: TableConfig) -> str:
        """The ClickHouse replica table of `table`: `clickhouse_table`, or the template rendered with the
        exact names, case kept and other characters than letters, digits and `_` replaced by `_`."""
        return table.clickhouse_table or self.sink.clickhouse.table_name.format(
            schema=clickhouse_name_part(table.schema_name), table=clickhouse_name_part(table.table_name)
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

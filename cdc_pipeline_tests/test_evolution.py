"""Schema evolution decisions (streaming/evolution.py): pure logic as units; PostgreSQL's catalog and the
ClickHouse DDL against the real stack (no Spark). The whole pipeline is in test_schema_evolution_e2e.py."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from clickhouse_connect.driver.client import Client

from cdc_pipeline.clickhouse_client import connect_clickhouse
from cdc_pipeline.config import parse_pipeline_config
from cdc_pipeline.settings import Settings
from cdc_pipeline.stack.lifecycle import LocalStack
from cdc_pipeline.streaming.envelope import version
from cdc_pipeline.streaming.evolution import (
    Action,
    ChangeRecord,
    SchemaChangeError,
    SchemaEvolution,
    SourceCatalog,
    SourceColumn,
    clickhouse_literal,
    normalize_type,
    partial_columns,
    plan_new_column,
    plan_type_change,
)
from cdc_pipeline.streaming.sink import ClickHouseSink, ReplicaTable
from cdc_pipeline.streaming.types import columns_from_schema

DATA = Path(__file__).parent / "data" / "debezium"
TS = datetime(2026, 1, 1, tzinfo=UTC)


def field(column: str, kind: str, optional: bool = True, **extra: Any) -> dict[str, Any]:
    return {"field": column, "type": kind, "optional": optional, **extra}


def envelope(*fields: dict[str, Any]) -> dict[str, Any]:
    return {"fields": [{"field": "after", "type": "struct", "fields": list(fields)}]}


def spec(column: str, kind: str, optional: bool = True, **extra: Any):  # noqa: ANN201
    return columns_from_schema(envelope(field(column, kind, optional, **extra)))[0]


# --- units -------------------------------------------------------------------------------------------------


def test_a_constant_default_becomes_the_clickhouse_default() -> None:
    column = spec("c", "string", default="x")
    facts = SourceColumn(True, "text", has_missing=True, missing_text="x", default_sql="'x'::text",
                         default_matches_missing=True)  # fmt: skip
    plan = plan_new_column(column, facts)
    assert plan.action is Action.DEFAULT
    assert plan.default_sql == "CAST('x', 'Nullable(String)')"


def test_a_default_evaluated_when_the_column_was_added_is_re_read() -> None:
    # now(): PostgreSQL stored the ALTER time for existing rows, Debezium's schema says the epoch.
    column = spec("v", "string", name="io.debezium.time.ZonedTimestamp", default="1970-01-01T00:00:00.000000Z")
    facts = SourceColumn(True, "timestamp with time zone", has_missing=True, missing_text="2026-12-01 14:01:32+00",
                         default_sql="now()", default_matches_missing=False)  # fmt: skip
    plan = plan_new_column(column, facts)
    assert plan.action is Action.RESNAPSHOT and "now()" in plan.reason


@pytest.mark.parametrize(
    ("facts", "action"),
    [
        (SourceColumn(True, "uuid", default_sql="gen_random_uuid()"), Action.RESNAPSHOT),  # volatile: table rewrite
        (SourceColumn(True, "integer", generated=True, default_sql="(price * 2)"), Action.RESNAPSHOT),
        (SourceColumn(True, "text", default_sql="'y'::text"), Action.RESNAPSHOT),  # default set after a plain ADD
        (SourceColumn(True, "text"), Action.PLAIN),  # no default: NULL in PostgreSQL too
        (SourceColumn(True, "text", default_sql="NULL::text", default_is_null=True), Action.PLAIN),
        (SourceColumn(False), Action.PLAIN),  # dropped again since
        (None, Action.PLAIN),  # no catalog access
        # ADD ... DEFAULT 'a' then SET DEFAULT 'b': rows read 'a', Debezium says 'b'
        (SourceColumn(True, "text", has_missing=True, missing_text="a", default_sql="'b'::text",
                      default_matches_missing=False), Action.RESNAPSHOT),
    ],
)  # fmt: skip
def test_new_column_plans(facts: SourceColumn | None, action: Action) -> None:
    assert plan_new_column(spec("c", "string", default="y"), facts).action is action


@pytest.mark.parametrize(
    ("replica", "incoming", "expected"),
    [
        ("Nullable(String)", "Nullable(String)", None),
        ("Nullable(Decimal(10, 2))", "Nullable(Decimal(10,2))", None),  # spacing
        ("LowCardinality(Nullable(String))", "Nullable(String)", None),  # enum -> text: same values
        ("Nullable(Int32)", "Int32", None),  # SET NOT NULL: the replica stays Nullable (deletion markers)
        ("Int32", "Nullable(Int32)", ("Nullable(Int32)", False)),  # DROP NOT NULL
        ("Nullable(Int32)", "Nullable(Int64)", ("Nullable(Int64)", True)),
        ("Nullable(Int32)", "Int64", ("Nullable(Int64)", True)),  # keeps NULL-able
        ("Nullable(Decimal(10, 2))", "Nullable(Decimal(12, 2))", ("Nullable(Decimal(12, 2))", True)),
        ("Array(Nullable(Int32))", "Array(Nullable(Int64))", ("Array(Nullable(Int64))", True)),
        ("Nullable(String)", "Array(String)", ("Array(String)", True)),
    ],
)
def test_type_changes(replica: str, incoming: str, expected: tuple[str, bool] | None) -> None:
    change = plan_type_change("c", replica, incoming)
    assert (change and (change.new_type, change.resnapshot)) == expected


def test_unconstrained_numeric_from_snapshot_and_stream_is_one_type() -> None:
    snapshot = spec("n", "string", parameters={"__debezium.source.column.type": "NUMERIC",
                                              "__debezium.source.column.length": "0"})  # fmt: skip
    streamed = spec("n", "string", parameters={"__debezium.source.column.type": "NUMERIC",
                                              "__debezium.source.column.length": "131089",
                                              "__debezium.source.column.scale": "0"})  # fmt: skip
    assert plan_type_change("n", snapshot.clickhouse_type, streamed.clickhouse_type) is None


@pytest.mark.parametrize(
    ("value", "ch_type", "expected"),
    [
        ("it's", "String", "CAST('it\\'s', 'String')"),
        (42, "Int32", "CAST(42, 'Int32')"),
        (Decimal("1.50"), "Nullable(Decimal(12, 2))", "CAST('1.50', 'Nullable(Decimal(12, 2))')"),
        (date(2020, 2, 3), "Nullable(Date32)", "CAST('2020-02-03', 'Nullable(Date32)')"),
        (datetime(1970, 1, 1, 0, 0, 1, 5, tzinfo=UTC), "DateTime64(6, 'UTC')",
         "CAST(fromUnixTimestamp64Micro(1000005, 'UTC'), 'DateTime64(6, \\'UTC\\')')"),
        (True, "Bool", "CAST(true, 'Bool')"),
        (b"\x01\xff", "String", "CAST(unhex('01ff'), 'String')"),
        ([1, None], "Array(Nullable(Int32))", "CAST([1, NULL], 'Array(Nullable(Int32))')"),
        (timedelta(hours=1, microseconds=5), "Time64(6)", "CAST('01:00:00.000005', 'Time64(6)')"),
        (None, "Nullable(String)", "CAST(NULL, 'Nullable(String)')"),
    ],
)  # fmt: skip
def test_clickhouse_literals(value: Any, ch_type: str, expected: str) -> None:
    assert clickhouse_literal(value, ch_type) == expected


def test_naive_datetimes_have_no_literal() -> None:
    with pytest.raises(TypeError):
        clickhouse_literal(datetime(2020, 1, 1), "DateTime64(6)")


def test_partial_columns_are_those_some_schemas_lack() -> None:
    old = envelope(field("id", "int32", False), field("name", "string"))
    new = envelope(field("id", "int32", False), field("name", "string"), field("c", "string"))
    assert partial_columns([old, new]) == {"c"}
    assert partial_columns([new, new]) == set()
    assert partial_columns([]) == set()


def test_normalize_type_drops_spaces_and_low_cardinality() -> None:
    assert normalize_type("Array(LowCardinality(Nullable(String)))") == "Array(Nullable(String))"
    assert normalize_type("DateTime64(6, 'UTC')") == "DateTime64(6,'UTC')"


# --- PostgreSQL's catalog (real stack) ---------------------------------------------------------------------


@pytest.fixture
def source_table(settings: Settings, local_stack: LocalStack, unique_name: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(settings.postgres_conninfo(), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{unique_name}"')
        conn.execute(f'CREATE TABLE "{unique_name}".t (id int PRIMARY KEY, price int)')
        conn.execute(f'INSERT INTO "{unique_name}".t SELECT g, g FROM generate_series(1, 3) g')
        try:
            yield conn
        finally:
            conn.execute(f'DROP SCHEMA "{unique_name}" CASCADE')


def _pipeline(name: str):  # noqa: ANN202
    return parse_pipeline_config(
        {"name": name, "source": {"schemas": [name], "signal_table": f"{name}.cdc_signal"},
         "tables": [{"name": f"{name}.t"}]}
    )  # fmt: skip


@pytest.mark.integration
def test_the_catalog_tells_constant_defaults_from_evaluated_ones(
    settings: Settings, source_table: psycopg.Connection, unique_name: str
) -> None:
    t = f'"{unique_name}".t'
    for ddl in [
        "ADD COLUMN c text DEFAULT 'x'", "ADD COLUMN v timestamptz DEFAULT now()",
        "ADD COLUMN w int DEFAULT 42 NOT NULL",
        "ADD COLUMN n numeric(12,2) DEFAULT 1.5", "ADD COLUMN d date DEFAULT '2020-02-03'",
        "ADD COLUMN ts timestamp DEFAULT '2020-01-01 10:00:00.123456'", "ADD COLUMN e text",
        "ALTER COLUMN e SET DEFAULT 'y'", "ADD COLUMN f text DEFAULT 'a'", "ALTER COLUMN f SET DEFAULT 'b'",
        "ADD COLUMN g text", "ADD COLUMN j jsonb DEFAULT '{\"a\": 1}'", "ADD COLUMN arr int[] DEFAULT '{1,2}'",
    ]:  # fmt: skip
        source_table.execute(f"ALTER TABLE {t} {ddl}")
    text = {"__debezium.source.column.type": "TEXT"}
    specs = [
        spec("c", "string", default="x", parameters=text),
        spec("v", "string", name="io.debezium.time.ZonedTimestamp", default="1970-01-01T00:00:00.000000Z"),
        spec("w", "int32", optional=False, default=42),
        spec("n", "string", default="1.50", parameters={"__debezium.source.column.type": "NUMERIC",
             "__debezium.source.column.length": "12", "__debezium.source.column.scale": "2"}),
        spec("d", "int32", name="io.debezium.time.Date", default=18295),
        spec("ts", "int64", name="io.debezium.time.MicroTimestamp", default=1577872800123456),
        spec("e", "string", default="y", parameters=text),
        spec("f", "string", default="b", parameters=text),
        spec("g", "string", parameters=text),
        spec("j", "string", name="io.debezium.data.Json", default='{"a": 1}'),
        spec("arr", "array", items={"type": "int32", "optional": True}, default=[1, 2]),
        spec("gone", "string"),
    ]  # fmt: skip
    evolution = SchemaEvolution(
        _pipeline(unique_name), SourceCatalog(_pipeline(unique_name), settings.postgres_conninfo)
    )
    plans = {p.column: p.action for p in evolution.plan_new_columns(f"{unique_name}.t", specs)}
    assert plans == {
        "c": Action.DEFAULT, "v": Action.RESNAPSHOT, "w": Action.DEFAULT, "n": Action.DEFAULT, "d": Action.DEFAULT,
        "ts": Action.DEFAULT, "e": Action.RESNAPSHOT, "f": Action.RESNAPSHOT, "g": Action.PLAIN, "j": Action.DEFAULT,
        "arr": Action.DEFAULT, "gone": Action.PLAIN,
    }  # fmt: skip

    # A volatile default rewrites the table: no stored missing value for any column any more, so every
    # column with a default is re-read (a STORED generated column too).
    source_table.execute(f"ALTER TABLE {t} ADD COLUMN u uuid DEFAULT gen_random_uuid()")
    source_table.execute(f"ALTER TABLE {t} ADD COLUMN gen int GENERATED ALWAYS AS (price * 2) STORED")
    rewritten = evolution.plan_new_columns(
        f"{unique_name}.t", [specs[0], spec("u", "string", name="io.debezium.data.Uuid"), spec("gen", "int32")]
    )
    assert [p.action for p in rewritten] == [Action.RESNAPSHOT] * 3


@pytest.mark.integration
def test_an_unreachable_catalog_stops_with_the_fix(unique_name: str) -> None:
    pipeline = _pipeline(unique_name)
    evolution = SchemaEvolution(pipeline, SourceCatalog(pipeline, lambda: "postgresql://nobody@127.0.0.1:1/none"))
    with pytest.raises(SchemaChangeError, match="CDC_POSTGRES_DSN"):
        evolution.plan_new_columns(f"{unique_name}.t", [spec("c", "string", default="x")])


# --- ClickHouse DDL (real endpoint) ------------------------------------------------------------------------


@pytest.fixture
def sink(local_stack: LocalStack, unique_name: str) -> Iterator[tuple[ClickHouseSink, ReplicaTable, Client]]:
    settings = local_stack.settings
    client = connect_clickhouse(
        settings.clickhouse_endpoint, settings.clickhouse_user, settings.clickhouse_password.get_secret_value()
    )
    client.command(f"CREATE DATABASE {unique_name}")
    try:
        yield ClickHouseSink(client), ReplicaTable(unique_name, "items", ("id",)), client
    finally:
        client.command(f"DROP DATABASE {unique_name}")
        client.close()


BASE = [field("id", "int32", False), field("qty", "int32")]


@pytest.mark.integration
def test_defaults_serve_rows_written_before_the_column(sink) -> None:  # noqa: ANN001
    sink_, table, client = sink
    sink_.ensure_table(table, columns_from_schema(envelope(*BASE)))
    sink_.upsert(table, ["id", "qty"], [[1, 10, version(5, 1), 0, TS], [2, 20, version(5, 2), 0, TS]])
    wider = columns_from_schema(envelope(*BASE, field("c", "string", default="x")))
    plan = plan_new_column(wider[2], SourceColumn(True, "text", has_missing=True, missing_text="x",
                                                  default_sql="'x'::text", default_matches_missing=True))  # fmt: skip
    ddl = f"ALTER TABLE {table.qualified} ADD COLUMN c Nullable(String) DEFAULT {plan.default_sql}"
    client.command(ddl)
    assert client.query(f"SELECT id, c FROM {table.qualified} FINAL ORDER BY id").result_rows == [(1, "x"), (2, "x")]


@pytest.mark.integration
def test_a_type_change_converts_the_column_and_the_cache_sees_it(sink) -> None:  # noqa: ANN001
    sink_, table, client = sink
    sink_.ensure_table(table, columns_from_schema(envelope(*BASE)))
    sink_.upsert(table, ["id", "qty"], [[1, 10, version(5, 1), 0, TS]])
    bigger = columns_from_schema(envelope(field("id", "int32", False), field("qty", "int64")))
    ran = sink_.ensure_table(table, bigger)
    assert len(ran) == 1 and "MODIFY COLUMN `qty` Nullable(Int64)" in ran[0]
    assert sink_.existing_column_types(table)["qty"] == "Nullable(Int64)"
    sink_.upsert(table, ["id", "qty"], [[2, 2**40, version(6, 1), 0, TS]])
    assert client.query(f"SELECT id, qty FROM {table.qualified} FINAL ORDER BY id").result_rows == [(1, 10), (2, 2**40)]
    assert sink_.ensure_table(table, bigger) == []  # known now: no DDL, no query


@pytest.mark.integration
def test_an_impossible_conversion_stops_with_the_fix_and_leaves_the_table_readable(sink) -> None:  # noqa: ANN001
    sink_, table, client = sink
    sink_.ensure_table(
        table, columns_from_schema(envelope(field("id", "int32", False), field("code", "string", False)))
    )
    sink_.upsert(table, ["id", "code"], [[1, "A-1", version(5, 1), 0, TS]])
    as_int = columns_from_schema(envelope(field("id", "int32", False), field("code", "int64", False)))
    with pytest.raises(SchemaChangeError, match=r"column 'code' changed type .*DROP TABLE"):
        sink_.ensure_table(table, as_int)
    assert client.query(f"SELECT id, code FROM {table.qualified}").result_rows == [(1, "A-1")]


@pytest.mark.integration
def test_every_mapped_type_reads_back_as_no_change(sink) -> None:  # noqa: ANN001
    """No false type changes: a table created from real snapshot events, compared with the types of real
    streamed events of the same table (whose parameters differ, e.g. unconstrained numeric)."""
    sink_, _, _ = sink
    snapshot = json.loads((DATA / "snapshot.json").read_text())[0]["value"]["schema"]
    table = ReplicaTable(sink[1].database, "all_types", ("id",))
    sink_.ensure_table(table, columns_from_schema(snapshot))
    replica = sink_.existing_column_types(table)
    for source in ("snapshot.json", "stream_edge_values.json"):
        for message in json.loads((DATA / source).read_text()):
            for column in columns_from_schema(message["value"]["schema"]):
                assert plan_type_change(column.name, replica[column.name], column.clickhouse_type) is None, column.name


def test_uuid_literal() -> None:
    value = uuid.UUID(int=1)
    assert clickhouse_literal(value, "UUID") == "CAST('00000000-0000-0000-0000-000000000001', 'UUID')"


@pytest.mark.integration
def test_a_key_column_type_change_rebuilds_the_table(sink) -> None:  # noqa: ANN001
    """ClickHouse refuses MODIFY COLUMN on a sorting-key column: the table is copied and swapped."""
    sink_, table, client = sink
    sink_.ensure_table(table, columns_from_schema(envelope(*BASE)))
    sink_.upsert(table, ["id", "qty"], [[1, 10, version(5, 1), 0, TS], [2, 20, version(5, 2), 0, TS]])
    sink_.delete(table, [[2, version(6, 1), 1, TS]])
    client.command(f"ALTER TABLE {table.qualified} ADD COLUMN c Nullable(String) DEFAULT 'x' AFTER qty")
    wide_key = columns_from_schema(envelope(field("id", "int64", False), field("qty", "int32"), field("c", "string")))
    ran = sink_.ensure_table(table, wide_key)
    assert len(ran) == 1 and "ORDER BY (id)" in ran[0]
    types = sink_.existing_column_types(table)
    assert (types["id"], types["c"]) == ("Int64", "Nullable(String)")
    sink_.upsert(table, ["id", "qty", "c"], [[2**40, 1, "y", version(7, 1), 0, TS]])
    rows = client.query(f"SELECT id, qty, c FROM {table.qualified} FINAL ORDER BY id").result_rows
    assert rows == [(1, 10, "x"), (2**40, 1, "y")]  # the deleted row stays deleted, the DEFAULT stays
    assert client.query(f"EXISTS TABLE {table.database}.items__cdc_rebuild").result_rows == [(0,)]


class CountingCatalog(SourceCatalog):
    """The real catalog, except that signals are counted instead of sent to a connector."""

    def __init__(self, pipeline) -> None:  # noqa: ANN001
        super().__init__(pipeline, lambda: "")
        self.signals = 0

    def request_resnapshot(self, table) -> str:  # noqa: ANN001
        self.signals += 1
        return f"schema-change-{self.signals}"


@pytest.mark.integration
def test_a_change_is_re_snapshotted_once_even_when_its_batch_is_replayed(sink, unique_name: str) -> None:  # noqa: ANN001
    _, table, client = sink
    pipeline = _pipeline(unique_name)
    catalog = CountingCatalog(pipeline)
    evolution = SchemaEvolution(pipeline, catalog)
    record = ChangeRecord("items", f"{unique_name}.t", "qty", "type_change", "Int32", "Int64", "modify", "test")
    assert evolution.resnapshot(client, table.database, [record])[0].signal_id == "schema-change-1"
    assert evolution.resnapshot(client, table.database, [record])[0].signal_id == "schema-change-1"  # replayed
    back = ChangeRecord("items", f"{unique_name}.t", "qty", "type_change", "Int64", "Int32", "modify", "test")
    assert evolution.resnapshot(client, table.database, [back])[0].signal_id == "schema-change-2"
    assert evolution.resnapshot(client, table.database, [record])[0].signal_id == "schema-change-3"  # changed again
    assert catalog.signals == 3

"""The PostgreSQL warehouse sink against the local stack's warehouse database: exact types, ordering by
source position (a late or replayed change never regresses a row), tombstones, truncates, added columns,
content errors told apart from everything else."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from cdc_pipeline.settings import Settings
from cdc_pipeline.streaming.envelope import version
from cdc_pipeline.streaming.sink import ReplicaTable
from cdc_pipeline.streaming.types import SOURCE_LENGTH, SOURCE_SCALE, SOURCE_TYPE, columns_from_schema
from cdc_pipeline.streaming.warehouse import WarehouseContentError, WarehouseSink, postgres_type

pytestmark = pytest.mark.integration
TS = datetime(2026, 1, 1, tzinfo=UTC)


def field(name: str, kind: str, source: str, optional: bool = True, logical: str | None = None, **params: str) -> dict:
    spec: dict[str, Any] = {"field": name, "type": kind, "optional": optional, "parameters": {SOURCE_TYPE: source}}
    spec["parameters"].update(params)
    if logical:
        spec["name"] = logical
    return spec


FIELDS = [
    field("id", "int64", "INT8", optional=False),
    field("small", "int16", "INT2"),
    field("name", "string", "TEXT"),
    field("price", "string", "NUMERIC", **{SOURCE_LENGTH: "12", SOURCE_SCALE: "2"}),
    field("blob", "bytes", "BYTEA"),
    field("doc", "string", "JSONB", logical="io.debezium.data.Json"),
    field("ref", "string", "UUID", logical="io.debezium.data.Uuid"),
    field("day", "int32", "DATE", logical="io.debezium.time.Date"),
    field("at", "int64", "TIMESTAMP", logical="io.debezium.time.MicroTimestamp"),
    field("at_tz", "string", "TIMESTAMPTZ", logical="io.debezium.time.ZonedTimestamp"),
    field("clock", "int64", "TIME", logical="io.debezium.time.MicroTime"),
    field("ok", "boolean", "BOOL"),
    {"field": "tags", "type": "array", "optional": True, "items": {"type": "string", "optional": True},
     "parameters": {SOURCE_TYPE: "_TEXT"}},
]  # fmt: skip


def schema(fields: list[dict]) -> dict:
    return {"fields": [{"field": "after", "type": "struct", "fields": fields}]}


@pytest.fixture
def sink(
    settings: Settings, warehouse: psycopg.Connection, unique_name: str
) -> Iterator[tuple[WarehouseSink, ReplicaTable]]:
    sink = WarehouseSink(settings.warehouse_conninfo)
    try:
        yield sink, ReplicaTable(unique_name, "items", ("id",))
    finally:
        sink.close()
        warehouse.execute(f'DROP SCHEMA IF EXISTS "{unique_name}" CASCADE')


def row(specs: list, values: dict[str, Any], pos: int, deleted: int = 0) -> list[Any]:
    return [values.get(s.name) for s in specs] + [version(pos, 1), deleted, TS]


def live(warehouse: psycopg.Connection, table: ReplicaTable, columns: str = "id, name") -> list[tuple]:
    return warehouse.execute(f'SELECT {columns} FROM "{table.database}"."{table.name}_live" ORDER BY id').fetchall()


def test_types_map_and_values_arrive_exactly(sink, warehouse: psycopg.Connection) -> None:  # noqa: ANN001
    writer, table = sink
    specs = columns_from_schema(schema(FIELDS))
    assert {s.name: postgres_type(s) for s in specs} == {
        "id": "bigint", "small": "smallint", "name": "text", "price": "numeric(12,2)", "blob": "bytea",
        "doc": "jsonb", "ref": "uuid", "day": "date", "at": "timestamp(6)", "at_tz": "timestamptz(6)",
        "clock": "time(6)", "ok": "boolean", "tags": "text[]",
    }  # fmt: skip
    ddl = writer.ensure_table(table, specs)
    assert any("CREATE TABLE" in d for d in ddl)
    assert writer.ensure_table(table, specs) == []  # known: nothing to do
    ref = uuid.uuid4()
    values = {
        "id": 1, "small": -3, "name": "Zoë ☃", "price": Decimal("1234567890.12"), "blob": b"\x00\xff\x10",
        "doc": '{"a": [1, 2.5, "x"]}', "ref": ref, "day": date(1, 1, 1),
        "at": datetime(2024, 2, 29, 23, 59, 59, 999999),
        "at_tz": datetime(2024, 1, 1, 12, tzinfo=UTC), "clock": timedelta(hours=23, minutes=59, microseconds=1),
        "ok": True, "tags": ["a", None, "c,d"],
    }  # fmt: skip
    names = [s.name for s in specs]
    writer.upsert(table, names, [row(specs, values, 10), row(specs, {"id": 2, "clock": timedelta(hours=24)}, 10)])
    got = warehouse.execute(f'SELECT {", ".join(names)} FROM "{table.database}".items WHERE id = 1').fetchone()
    assert dict(zip(names, got, strict=True)) == {
        **values, "doc": {"a": [1, 2.5, "x"]}, "clock": time(23, 59, 0, 1),
    }  # fmt: skip
    assert warehouse.execute(f'SELECT clock::text FROM "{table.database}".items WHERE id = 2').fetchone() == (
        "24:00:00",
    )


def test_the_stored_version_decides(sink, warehouse: psycopg.Connection) -> None:  # noqa: ANN001
    writer, table = sink
    specs = columns_from_schema(schema(FIELDS[:3]))
    names = [s.name for s in specs]
    writer.ensure_table(table, specs)
    writer.upsert(table, names, [row(specs, {"id": 1, "name": "v2"}, 20), row(specs, {"id": 2, "name": "b"}, 20)])
    writer.upsert(table, names, [row(specs, {"id": 1, "name": "v1"}, 10)])  # late, older: ignored
    writer.upsert(table, names, [row(specs, {"id": 1, "name": "v2"}, 20)])  # replay: same state
    # Two changes of one key in one batch: the newer wins whatever the order.
    writer.upsert(table, names, [row(specs, {"id": 3, "name": "new"}, 31), row(specs, {"id": 3, "name": "old"}, 30)])
    assert live(warehouse, table) == [(1, "v2"), (2, "b"), (3, "new")]
    writer.delete(table, [[2, version(40, 1), 1, TS]])
    writer.upsert(table, names, [row(specs, {"id": 2, "name": "late"}, 35)])  # older than the delete
    assert live(warehouse, table) == [(1, "v2"), (3, "new")]
    writer.delete(table, [[9, version(40, 2), 1, TS]])  # a delete of a row never seen: a tombstone
    writer.upsert(table, names, [row(specs, {"id": 9, "name": "resurrected?"}, 39)])
    assert live(warehouse, table) == [(1, "v2"), (3, "new")]
    assert writer.current_rows(table, [[1], [2], [3]], ["name"]) == {(1,): {"name": "v2"}, (3,): {"name": "new"}}
    assert writer.existing_key(table.database, table.name) == ("id",)
    assert writer.existing_key(table.database, "absent") == ()


def test_truncate_deletes_older_rows_only(sink, warehouse: psycopg.Connection) -> None:  # noqa: ANN001
    writer, table = sink
    assert writer.truncate(table, version(1, 1), TS) is False  # no table yet
    specs = columns_from_schema(schema(FIELDS[:3]))
    names = [s.name for s in specs]
    writer.ensure_table(table, specs)
    writer.upsert(table, names, [row(specs, {"id": 1, "name": "old"}, 10), row(specs, {"id": 2, "name": "new"}, 50)])
    assert writer.truncate(table, version(40, 0), TS) is True
    writer.upsert(table, names, [row(specs, {"id": 1, "name": "replayed"}, 10)])
    assert live(warehouse, table) == [(2, "new")]


def test_added_column_and_content_errors(sink, warehouse: psycopg.Connection) -> None:  # noqa: ANN001
    writer, table = sink
    specs = columns_from_schema(schema(FIELDS[:3]))
    writer.ensure_table(table, specs)
    wider = columns_from_schema(schema([*FIELDS[:3], field("age", "int32", "INT4")]))
    ran = writer.ensure_table(table, wider)
    assert len(ran) == 2 and "ADD COLUMN" in ran[0]  # and the live view is recreated with it
    names = [s.name for s in wider]
    writer.upsert(table, names, [row(wider, {"id": 1, "name": "a", "age": 7}, 10)])
    assert live(warehouse, table, "id, age") == [(1, 7)]
    with pytest.raises(WarehouseContentError, match="NUL|0x00"):
        writer.upsert(table, names, [row(wider, {"id": 2, "name": "nul \x00 byte"}, 11)])
    writer.upsert(table, names, [row(wider, {"id": 3, "name": "after the error"}, 12)])  # the connection recovers
    assert live(warehouse, table) == [(1, "a"), (3, "after the error")]
    # Not a content error: a wrong password is retried by the apply path, never dead-lettered.
    bad = WarehouseSink(lambda: writer._conninfo() + " password=wrong")
    with pytest.raises(psycopg.OperationalError):
        bad.upsert(table, names, [row(wider, {"id": 4}, 13)])


def test_an_added_column_with_a_constant_default_gives_old_rows_its_value(
    settings: Settings, source: psycopg.Connection, warehouse: psycopg.Connection, unique_name: str
) -> None:
    from cdc_pipeline.config import parse_pipeline_config
    from cdc_pipeline.streaming.evolution import SchemaEvolution

    source.execute(f'CREATE SCHEMA "{unique_name}"')
    try:
        source.execute(f'CREATE TABLE "{unique_name}".items (id bigint PRIMARY KEY, name text)')
        source.execute(f"INSERT INTO \"{unique_name}\".items VALUES (1, 'a')")
        source.execute(f"ALTER TABLE \"{unique_name}\".items ADD COLUMN label text DEFAULT 'plain'")
        pipeline = parse_pipeline_config(
            {"name": unique_name, "source": {"schemas": [unique_name]},
             "tables": [{"name": f"{unique_name}.items", "sinks": ["warehouse"]}]}
        )  # fmt: skip
        writer = WarehouseSink(settings.warehouse_conninfo, SchemaEvolution.from_settings(pipeline, settings))
        table = ReplicaTable(unique_name, "items", ("id",), source=f"{unique_name}.items")
        try:
            specs = columns_from_schema(schema(FIELDS[:3]))
            writer.ensure_table(table, specs)
            writer.upsert(table, [s.name for s in specs], [row(specs, {"id": 1, "name": "a"}, 10)])
            label = {**field("label", "string", "TEXT"), "default": "plain"}
            ran = writer.ensure_table(table, columns_from_schema(schema([*FIELDS[:3], label])))
            assert "DEFAULT 'plain'" in ran[0], ran
            assert live(warehouse, table, "id, label") == [(1, "plain")]
            # Created by a batch in which some rows predate the column: those rows read the default too.
            fresh = ReplicaTable(unique_name, "items_again", ("id",), source=f"{unique_name}.items")
            wider = columns_from_schema(schema([*FIELDS[:3], label]))
            ran = writer.ensure_table(fresh, wider, partial={"label"})
            assert "DEFAULT 'plain'" in ran[1], ran
            writer.upsert(fresh, [s.name for s in specs], [row(specs, {"id": 1, "name": "a"}, 10)])
            assert live(warehouse, fresh, "id, label") == [(1, "plain")]
        finally:
            writer.close()
    finally:
        source.execute(f'DROP SCHEMA "{unique_name}" CASCADE')

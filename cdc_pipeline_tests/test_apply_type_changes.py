"""A column type change inside one micro-batch writes each row in its own schema's type, and a type change
ClickHouse cannot convert the replica to (or would turn live values into NULL) dead-letters the rows that
need it while the rest applies. Real Spark and the test stack's ClickHouse."""

from __future__ import annotations

import json
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from cdc_pipeline.config import parse_pipeline_config
from cdc_pipeline.streaming.apply import ChangeApplier
from cdc_pipeline.streaming.sink import ClickHouseSink

pytestmark = pytest.mark.integration

TOPIC = "cap.public.control"


class RecordingDeadLetters:
    def __init__(self) -> None:
        self.letters: list[tuple[int, str, bytes | None]] = []

    def send(self, key: Any, value: Any, reason: str, topic: str, partition: int, offset: int) -> None:
        self.letters.append((offset, reason, bytes(value) if value is not None else None))

    def flush(self, timeout: float = 60.0) -> None:
        pass


def compact(message: Any) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


@pytest.fixture
def writer(clickhouse: Client, unique_name: str):  # noqa: ANN201
    clickhouse.command(f"CREATE DATABASE IF NOT EXISTS `{unique_name}`")
    pipeline = parse_pipeline_config(
        {"name": "cap", "tables": [{"name": "public.control"}], "sink": {"clickhouse": {"database": unique_name}}}
    )
    dead = RecordingDeadLetters()
    applier = ChangeApplier(pipeline, unique_name, ClickHouseSink(clickhouse), dead, retry_seconds=5)  # type: ignore[arg-type]
    return applier, dead, None


def run(spark: Any, applier: ChangeApplier, batch_id: int, records: list[tuple[bytes, bytes]]) -> None:
    rows = [(key, value, TOPIC, 0, batch_id * 100 + i) for i, (key, value) in enumerate(records)]
    applier(spark.createDataFrame(rows, "key binary, value binary, topic string, partition int, offset long"), batch_id)


def qty_change(key: int, qty: str, lsn: int, numeric: bool, optional: bool = True) -> tuple[bytes, bytes]:
    """A change of `public.control` (id bigint, qty): qty is numeric(10,2) (decimal.handling.mode=string)
    or, after an `ALTER COLUMN qty TYPE text`, text; NOT NULL unless `optional`."""
    params = {"__debezium.source.column.type": "NUMERIC" if numeric else "TEXT"}
    if numeric:
        params |= {"__debezium.source.column.length": "10", "__debezium.source.column.scale": "2"}
    fields = [
        {"type": "int64", "optional": False, "field": "id"},
        {"type": "string", "optional": optional, "parameters": params, "field": "qty"},
    ]
    schema = {
        "type": "struct",
        "fields": [
            {"type": "struct", "fields": fields, "optional": True, "field": "before"},
            {"type": "struct", "fields": fields, "optional": True, "field": "after"},
            {"type": "struct", "fields": [], "optional": False, "field": "source"},
            {"type": "string", "optional": False, "field": "op"},
        ],
    }
    source = {"lsn": lsn, "sequence": json.dumps([str(lsn), str(lsn)]), "ts_ms": 1_700_000_000_000}
    payload = {"op": "c", "before": None, "after": {"id": key, "qty": qty}, "source": source}
    key_schema = {"type": "struct", "fields": [{"type": "int64", "optional": False, "field": "id"}]}
    return compact({"schema": key_schema, "payload": {"id": key}}), compact({"schema": schema, "payload": payload})


def quantities(clickhouse: Client, database: str) -> tuple[str, dict[int, Any]]:
    table = f"`{database}`.`public_control`"
    column_type = clickhouse.command(f"SELECT toTypeName(qty) FROM {table} LIMIT 1")
    return column_type, dict(clickhouse.query(f"SELECT id, toString(qty) FROM {table} FINAL").result_rows)


def test_a_type_change_within_a_batch_writes_each_row_in_its_own_schemas_type(
    spark: Any, clickhouse: Client, unique_name: str, writer: Any
) -> None:
    """numeric -> text inside one batch: the rows before the ALTER are written as Decimal and converted by
    ClickHouse with the rest of the replica, never handed to the String column as Decimal objects (a zero
    used to become '' and any other value failed the batch)."""
    applier, dead, _ = writer
    run(spark, applier, 1, [qty_change(1, "7.25", 10, numeric=True)])
    run(
        spark,
        applier,
        2,
        [qty_change(2, "0.00", 20, numeric=True), qty_change(3, "2.50", 21, numeric=True)]
        + [qty_change(4, "four", 30, numeric=False)],
    )
    column_type, rows = quantities(clickhouse, unique_name)
    assert column_type == "Nullable(String)"
    assert rows == {1: "7.25", 2: "0", 3: "2.5", 4: "four"} or rows == {1: "7.25", 2: "0.00", 3: "2.50", 4: "four"}
    assert dead.letters == []


def test_a_type_change_the_replica_cannot_take_dead_letters_its_rows_and_the_rest_applies(
    spark: Any, clickhouse: Client, unique_name: str, writer: Any
) -> None:
    """text -> numeric (NOT NULL) over a replica holding non-numeric text: ClickHouse cannot convert the
    column. The rows that need the new type are dead-lettered with the fix (not written as text, and the
    batch does not fail); the column keeps its type and the batch's other rows apply."""
    applier, dead, _ = writer
    run(spark, applier, 1, [qty_change(1, "not a number", 10, numeric=False, optional=False)])
    refused = qty_change(2, "1.00", 20, numeric=True, optional=False)
    run(spark, applier, 2, [refused, qty_change(3, "three", 30, numeric=False, optional=False)])
    assert quantities(clickhouse, unique_name) == ("String", {1: "not a number", 3: "three"})
    assert [(offset, value) for offset, _, value in dead.letters] == [(200, refused[1])]
    reason = dead.letters[0][1]
    assert "schema change refused" in reason and "'qty'" in reason and "DROP TABLE" in reason, reason
    # The next batch of the new type is refused the same way.
    run(spark, applier, 3, [qty_change(5, "5.00", 40, numeric=True, optional=False)])
    assert [offset for offset, _, _ in dead.letters] == [200, 300]


def test_a_type_change_that_would_turn_values_into_null_is_refused(
    spark: Any, clickhouse: Client, unique_name: str, writer: Any
) -> None:
    """text -> numeric on a nullable column: ClickHouse would turn the text it cannot parse into NULL. The
    change is refused like one that fails (the rows that need it are dead-lettered), no value is lost."""
    applier, dead, _ = writer
    run(spark, applier, 1, [qty_change(1, "not a number", 10, numeric=False)])
    refused = qty_change(2, "1.00", 20, numeric=True)
    run(spark, applier, 2, [refused, qty_change(3, "three", 30, numeric=False)])
    assert quantities(clickhouse, unique_name) == ("Nullable(String)", {1: "not a number", 3: "three"})
    assert [(offset, value) for offset, _, value in dead.letters] == [(200, refused[1])]
    assert "would become NULL" in dead.letters[0][1], dead.letters[0][1]

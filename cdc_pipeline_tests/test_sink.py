"""Given row states, deletion markers and truncates written through the sink, ClickHouse `FINAL`
shows the latest state per key, whatever order the writes arrive in."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from clickhouse_connect.driver.client import Client

from cdc_pipeline.clickhouse_client import connect_clickhouse
from cdc_pipeline.stack.lifecycle import LocalStack
from cdc_pipeline.streaming.envelope import version
from cdc_pipeline.streaming.sink import ClickHouseSink, ReplicaTable
from cdc_pipeline.streaming.types import columns_from_schema

pytestmark = pytest.mark.integration
SCHEMA = {
    "fields": [
        {
            "field": "after",
            "type": "struct",
            "fields": [
                {"field": "id", "type": "int64", "optional": False},
                {"field": "name", "type": "string", "optional": True},
            ],
        }
    ]
}
TS = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def sink_table(local_stack: LocalStack, unique_name: str) -> Iterator[tuple[ClickHouseSink, ReplicaTable, Client]]:
    client = connect_clickhouse(
        local_stack.settings.clickhouse_endpoint, password=local_stack.settings.clickhouse_password.get_secret_value()
    )
    client.command(f"CREATE DATABASE {unique_name}")
    try:
        yield ClickHouseSink(client), ReplicaTable(unique_name, "people", ("id",)), client
    finally:
        client.command(f"DROP DATABASE {unique_name}")
        client.close()


def live(client: Client, table: ReplicaTable) -> list[tuple]:
    return client.query(f"SELECT id, name FROM {table.qualified} FINAL ORDER BY id").result_rows


def test_replayed_or_late_writes_never_regress_a_row(sink_table) -> None:  # noqa: ANN001
    sink, table, client = sink_table
    assert sink.truncate(table, version(1, 1), TS) is False  # no table yet: nothing to delete
    sink.ensure_table(table, columns_from_schema(SCHEMA))
    sink.upsert(table, ["id", "name"], [[1, "v2", version(20, 5), 0, TS], [2, "b", version(20, 6), 0, TS]])
    sink.upsert(table, ["id", "name"], [[1, "v1", version(10, 5), 0, TS]])  # late, older: ignored
    sink.upsert(table, ["id", "name"], [[1, "v2", version(20, 5), 0, TS]])  # replay: same state
    assert live(client, table) == [(1, "v2"), (2, "b")]
    sink.delete(table, [[2, version(30, 1), 1, TS]])
    assert live(client, table) == [(1, "v2")]


def test_truncate_deletes_older_rows_only(sink_table) -> None:  # noqa: ANN001
    sink, table, client = sink_table
    sink.ensure_table(table, columns_from_schema(SCHEMA))
    sink.upsert(table, ["id", "name"], [[1, "old", version(10, 1), 0, TS], [2, "new", version(50, 1), 0, TS]])
    assert sink.truncate(table, version(40, 0), TS) is True
    assert live(client, table) == [(2, "new")]


def test_new_source_column_is_added_before_the_bookkeeping_columns(sink_table) -> None:  # noqa: ANN001
    sink, table, client = sink_table
    sink.ensure_table(table, columns_from_schema(SCHEMA))
    after = SCHEMA["fields"][0]
    age = {"field": "age", "type": "int32", "optional": True}
    wider = {"fields": [{**after, "fields": [*after["fields"], age]}]}
    ran = sink.ensure_table(table, columns_from_schema(wider))
    assert len(ran) == 1 and "ADD COLUMN" in ran[0]
    assert sink.existing_columns(table) == ["id", "name", "age", "_version", "_is_deleted", "_source_ts"]
    assert sink.ensure_table(table, columns_from_schema(wider)) == []  # known: no DDL, no query


def test_existing_key_is_read_back_column_by_column(sink_table) -> None:  # noqa: ANN001
    """A batch whose records carry no key schema (produced by hand) writes with the replica's own key."""
    sink, table, client = sink_table
    assert sink.existing_key(table.database, "odd") == ()  # no table yet
    odd = ReplicaTable(table.database, "odd", ("Tenant Id", "a,b", "id"))
    fields = [
        {"field": "Tenant Id", "type": "string", "optional": False},
        {"field": "a,b", "type": "int32", "optional": False},
        {"field": "id", "type": "int64", "optional": False},
    ]
    sink.ensure_table(odd, columns_from_schema({"fields": [{"field": "after", "type": "struct", "fields": fields}]}))
    assert sink.existing_key(table.database, "odd") == ("Tenant Id", "a,b", "id")
    client.command(
        f"CREATE TABLE {table.database}.expr (ts DateTime, id Int64) ENGINE = MergeTree ORDER BY (toDate(ts), id)"
    )
    assert sink.existing_key(table.database, "expr") == ()  # not a plain list of columns

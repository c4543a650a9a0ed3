"""Schema changes that rewrite rows without change events, end to end on the real stack: after each,
the ClickHouse replica (`FINAL`) equals PostgreSQL row for row, every column, old rows included."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from clickhouse_connect.driver.client import Client

from cdc_pipeline.settings import Settings
from cdc_pipeline.streaming.evolution import SCHEMA_CHANGES_TABLE
from cdc_pipeline_tests.replica import RunningPipeline, pipeline_for_schema

pytestmark = pytest.mark.integration


@pytest.fixture
def items(
    settings: Settings, source: psycopg.Connection, clickhouse: Client, unique_name: str, tmp_path: Path
) -> Iterator[RunningPipeline]:
    """A table of 40 rows, replicated and caught up."""
    source.execute(f'CREATE SCHEMA "{unique_name}"')
    source.execute(
        f'CREATE TABLE "{unique_name}".items (id int PRIMARY KEY, name text NOT NULL, qty int, price numeric(10,2))'
    )
    source.execute(
        f"INSERT INTO \"{unique_name}\".items SELECT g, 'item ' || g, g, g * 1.25 FROM generate_series(1, 40) g"
    )
    with pipeline_for_schema(settings, unique_name, ["items"], tmp_path) as running:
        running.start_stream()
        running.wait_until_replica_matches(source, clickhouse, ["items"], timeout=300)
        yield running


def alter(source: psycopg.Connection, running: RunningPipeline, *changes: str) -> None:
    for change in changes:
        source.execute(f'ALTER TABLE "{running.schema}".items {change}')


def touch_one_row(source: psycopg.Connection, running: RunningPipeline, qty: str = "qty + 1") -> None:
    """One change event, so the stream sees the new schema (DDL itself sends none)."""
    source.execute(f'UPDATE "{running.schema}".items SET qty = {qty} WHERE id = 1')


def schema_changes(clickhouse: Client, running: RunningPipeline) -> dict[str, tuple[str, str, str]]:
    rows = clickhouse.query(
        f"SELECT column, change, action, signal_id FROM `{running.database}`.{SCHEMA_CHANGES_TABLE} "
        "ORDER BY recorded_at"
    ).result_rows
    return {column: (change, action, signal) for column, change, action, signal in rows}


def physical_rows(clickhouse: Client, running: RunningPipeline) -> int:
    return clickhouse.query(f"SELECT count() FROM `{running.database}`.items").result_rows[0][0]


def test_constant_defaults_reach_existing_rows_without_re_reading(
    items: RunningPipeline, source: psycopg.Connection, clickhouse: Client
) -> None:
    before = physical_rows(clickhouse, items)
    alter(
        source, items, "ADD COLUMN c text DEFAULT 'x'", "ADD COLUMN w int DEFAULT 42 NOT NULL",
        "ADD COLUMN n numeric(12,2) DEFAULT 1.5", "ADD COLUMN d date DEFAULT '2020-02-03'",
    )  # fmt: skip
    touch_one_row(source, items)
    assert items.wait_until_replica_matches(source, clickhouse, ["items"], timeout=300) == 40
    changes = schema_changes(clickhouse, items)
    assert changes == {column: ("add_column", "default", "") for column in ("c", "w", "n", "d")}
    # Nothing was re-read: one new row version (the update), the 39 others read the ClickHouse DEFAULTs.
    assert physical_rows(clickhouse, items) <= before + 1


def test_evaluated_defaults_are_re_read_from_the_source(
    items: RunningPipeline, source: psycopg.Connection, clickhouse: Client
) -> None:
    # now() is stable: PostgreSQL stores the ALTER time for existing rows (Debezium's schema says the epoch);
    # gen_random_uuid() is volatile: the table is rewritten, every row gets its own value.
    alter(source, items, "ADD COLUMN v timestamptz DEFAULT now()", "ADD COLUMN u uuid DEFAULT gen_random_uuid()")
    touch_one_row(source, items)
    assert items.wait_until_replica_matches(source, clickhouse, ["items"], timeout=480) == 40
    changes = schema_changes(clickhouse, items)
    assert {column: change[:2] for column, change in changes.items()} == {
        "v": ("add_column", "resnapshot"),
        "u": ("add_column", "resnapshot"),
    }
    assert all(signal.startswith("schema-change-") for _, _, signal in changes.values())
    # Later changes apply as usual on the re-read table.
    source.execute(f'UPDATE "{items.schema}".items SET u = gen_random_uuid(), v = now() WHERE id <= 5')
    items.wait_until_replica_matches(source, clickhouse, ["items"], timeout=300)


def test_type_changes_convert_the_replica_and_re_read_changed_values(
    items: RunningPipeline, source: psycopg.Connection, clickhouse: Client
) -> None:
    alter(source, items, "ALTER COLUMN qty TYPE bigint", "ALTER COLUMN price TYPE numeric(12,2) USING price * 2")
    touch_one_row(source, items, qty=str(2**40))  # does not fit the old Int32
    assert items.wait_until_replica_matches(source, clickhouse, ["items"], timeout=480) == 40
    types = dict(
        clickhouse.query(
            "SELECT name, type FROM system.columns WHERE database = {d:String} AND table = 'items'",
            parameters={"d": items.database},
        ).result_rows
    )
    assert (types["qty"], types["price"]) == ("Nullable(Int64)", "Nullable(Decimal(12, 2))")
    changes = schema_changes(clickhouse, items)
    assert {column: change[:2] for column, change in changes.items()} == {
        "qty": ("type_change", "modify"),
        "price": ("type_change", "modify"),
    }
    assert all(signal.startswith("schema-change-") for _, _, signal in changes.values())


def test_a_primary_key_type_change_rebuilds_the_replica(
    items: RunningPipeline, source: psycopg.Connection, clickhouse: Client
) -> None:
    # int -> bigint keys are common; ClickHouse cannot MODIFY a sorting-key column, so the replica is rebuilt.
    source.execute(f'DELETE FROM "{items.schema}".items WHERE id = 40')
    items.wait_until_replica_matches(source, clickhouse, ["items"], timeout=300)
    alter(source, items, "ALTER COLUMN id TYPE bigint")
    source.execute(f"INSERT INTO \"{items.schema}\".items VALUES ({2**40}, 'big', 1, 1.00)")
    assert items.wait_until_replica_matches(source, clickhouse, ["items"], timeout=480) == 40
    changes = schema_changes(clickhouse, items)
    assert changes["id"][:2] == ("type_change", "modify")
    # the rebuilt table keeps deletion markers: the row deleted before the change stays deleted
    source.execute(f'UPDATE "{items.schema}".items SET qty = 7 WHERE id <= 3')
    items.wait_until_replica_matches(source, clickhouse, ["items"], timeout=300)

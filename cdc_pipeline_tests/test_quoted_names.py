"""Tables with quoted (case-sensitive, odd-character) names, as ORMs such as Prisma create them, end to
end on the real stack: a mixed-case schema, `"User"` with camelCase columns and a filtered-out column
with a space, `"OrderItem"` with a composite camelCase key, `"Order Items"` with a space in its name.
Snapshot, inserts, updates (key changes included) and deletes arrive exactly; an incremental snapshot
signal names each table as Debezium parses it; reconcile and the source checks read the exact names."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from clickhouse_connect.driver.client import Client
from psycopg import sql

from cdc_pipeline.clickhouse_client import connect_clickhouse
from cdc_pipeline.config import PipelineConfig, TableConfig, parse_pipeline_config
from cdc_pipeline.control.backfill import SnapshotProgress, end_offsets, follow_snapshot
from cdc_pipeline.control.reconcile import reconcile
from cdc_pipeline.control.replicas import ClickHouseReplica
from cdc_pipeline.control.source import (
    check_source,
    exact_count,
    primary_key,
    request_incremental_snapshot,
    source_columns,
)
from cdc_pipeline.definitions import build_definitions
from cdc_pipeline.defs.translator import key_part
from cdc_pipeline.resources import KafkaResource
from cdc_pipeline.settings import Settings
from cdc_pipeline.stack.lifecycle import LocalStack
from cdc_pipeline_tests.replica import RunningPipeline, pipeline_for_schema
from cdc_pipeline_tests.test_stack_services import wait_for

USER, ORDER_ITEM, SPACED = '"User"', '"OrderItem"', '"Order Items"'
TABLE_ENTRIES = [
    {"name": USER, "columns": {"exclude": ['"Secret Note"']}},
    # An override equal to the real key, to render message.key.columns with quoted columns.
    {"name": ORDER_ITEM, "primary_key": ['"orderId"', '"lineNo"']},
    {"name": SPACED},
]
DDL = """
CREATE TABLE {schema}."User" (
    "id" bigint PRIMARY KEY,
    "createdAt" timestamptz NOT NULL,
    "displayName" text,
    email text,
    "Secret Note" text
);
CREATE TABLE {schema}."OrderItem" (
    "orderId" bigint NOT NULL,
    "lineNo" integer NOT NULL,
    "productName" text NOT NULL,
    qty integer NOT NULL,
    "unitPrice" numeric(10, 2),
    PRIMARY KEY ("orderId", "lineNo")
);
ALTER TABLE {schema}."OrderItem" REPLICA IDENTITY FULL;
CREATE TABLE {schema}."Order Items" (
    id integer PRIMARY KEY,
    "Note" text
);
"""


class QuotedWorkload:
    """Random inserts, updates (including key changes) and deletes on the three tables."""

    def __init__(self, schema: str, seed: int) -> None:
        self.schema = sql.Identifier(schema)
        self.rng = random.Random(seed)
        self.users: list[int] = []
        self.items: list[tuple[int, int]] = []
        self.notes: list[int] = []
        self.next = 1

    def _id(self) -> int:
        self.next += 1
        return self.next

    def _t(self, name: str) -> sql.Composed:
        return sql.SQL("{}.{}").format(self.schema, sql.Identifier(name))

    def insert(self, conn: psycopg.Connection) -> None:
        uid = self._id()
        created = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(seconds=self.rng.randrange(10**8), microseconds=123)
        conn.execute(
            sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s)").format(self._t("User")),
            (uid, created, f"Name {uid} ÄÖ", f"u{uid}@example.com", f"secret {uid}"),
        )
        self.users.append(uid)
        key = (self._id(), self.rng.randrange(1, 5))
        conn.execute(
            sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s)").format(self._t("OrderItem")),
            (*key, f"product {key}", self.rng.randrange(1, 9), Decimal(self.rng.randrange(1, 10**6)) / 100),
        )
        self.items.append(key)
        nid = self._id()
        conn.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s)").format(self._t("Order Items")), (nid, f"note {nid}"))
        self.notes.append(nid)

    def change(self, conn: psycopg.Connection) -> None:
        kind = self.rng.random()
        if kind < 0.25 or not (self.users and self.items and self.notes):
            self.insert(conn)
        elif kind < 0.4:
            uid = self.rng.choice(self.users)
            conn.execute(
                sql.SQL('UPDATE {} SET "displayName" = %s, "createdAt" = "createdAt" + interval \'1 day\' '
                        'WHERE "id" = %s').format(self._t("User")),
                (f"renamed {self.rng.random():.6f}", uid),
            )  # fmt: skip
        elif kind < 0.47:
            # Only the filtered-out column changes: the event carries nothing the replica stores.
            uid = self.rng.choice(self.users)
            conn.execute(
                sql.SQL('UPDATE {} SET "Secret Note" = %s WHERE "id" = %s').format(self._t("User")), ("new", uid)
            )
        elif kind < 0.55:
            uid = self.users.pop(self.rng.randrange(len(self.users)))
            conn.execute(sql.SQL('DELETE FROM {} WHERE "id" = %s').format(self._t("User")), (uid,))
        elif kind < 0.68:
            key = self.rng.choice(self.items)
            conn.execute(
                sql.SQL('UPDATE {} SET qty = qty + 1, "unitPrice" = NULL WHERE "orderId" = %s AND "lineNo" = %s')
                .format(self._t("OrderItem")),
                key,
            )  # fmt: skip
        elif kind < 0.76:
            # A key change: the old key must disappear from the replica.
            old = self.items.pop(self.rng.randrange(len(self.items)))
            new = (old[0], old[1] + 100)
            conn.execute(
                sql.SQL('UPDATE {} SET "lineNo" = %s WHERE "orderId" = %s AND "lineNo" = %s').format(
                    self._t("OrderItem")
                ),
                (new[1], *old),
            )
            self.items.append(new)
        elif kind < 0.84:
            key = self.items.pop(self.rng.randrange(len(self.items)))
            conn.execute(
                sql.SQL('DELETE FROM {} WHERE "orderId" = %s AND "lineNo" = %s').format(self._t("OrderItem")), key
            )
        elif kind < 0.93:
            nid = self.rng.choice(self.notes)
            conn.execute(
                sql.SQL('UPDATE {} SET "Note" = %s WHERE id = %s').format(self._t("Order Items")), ("edited", nid)
            )
        else:
            nid = self.notes.pop(self.rng.randrange(len(self.notes)))
            conn.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(self._t("Order Items")), (nid,))

    def run(self, conn: psycopg.Connection, changes: int) -> None:
        for _ in range(changes):
            self.change(conn)


def quoted_pipeline(name: str, schema: str) -> PipelineConfig:
    return parse_pipeline_config({
        "name": name,
        "source": {"schemas": [f'"{schema}"'], "signal_table": f'"{schema}".cdc_signal', "heartbeat_table": None},
        "tables": TABLE_ENTRIES,
    })  # fmt: skip


def test_quoted_pipeline_loads_into_dagster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Asset keys and check names derived from quoted names are valid Dagster names, and distinct."""
    monkeypatch.setenv("CDC_POSTGRES_PASSWORD", "unused")
    pipeline = quoted_pipeline("quoted", "Sales Dept")
    definitions = build_definitions(pipeline, tmp_path / "pipeline.yaml")
    keys = {key.to_user_string() for key in definitions.resolve_all_asset_keys()}
    schema = key_part("Sales Dept")
    assert re.fullmatch(r"Sales_Dept_[0-9a-f]{8}", schema)
    assert {
        f"quoted/postgres/{schema}/User",
        f"quoted/postgres/{schema}/OrderItem",
        f"quoted/postgres/{schema}/{key_part('Order Items')}",
        "quoted/kafka/quoted__Sales_Dept__User",
        "quoted/kafka/quoted__Sales_Dept__Order_Items",
        "quoted/clickhouse/Sales_Dept_User",
        "quoted/clickhouse/Sales_Dept_Order_Items",
    } <= keys
    assert key_part("Order Items") != key_part("order_items") == "order_items"
    checks = {key.name for key in definitions.resolve_asset_graph().asset_check_keys}
    assert "no_schema_drift" in checks


@pytest.fixture
def quoted_source(settings: Settings, local_stack: LocalStack, unique_name: str) -> Iterator[tuple[str, str]]:
    """A mixed-case schema (`Q<unique name>`) holding the three tables; dropped afterwards."""
    schema = f"Q{unique_name}"
    with psycopg.connect(settings.postgres_conninfo(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL(DDL).format(schema=sql.Identifier(schema)))
    yield unique_name, schema
    with psycopg.connect(settings.postgres_conninfo(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.mark.integration
def test_quoted_tables_replicate_exactly(settings: Settings, quoted_source: tuple[str, str], tmp_path: Path) -> None:
    name, schema = quoted_source
    workload = QuotedWorkload(schema, seed=int(name[2:], 16) % 10_000)
    client: Client = connect_clickhouse(
        settings.clickhouse_endpoint, settings.clickhouse_user, settings.clickhouse_password.get_secret_value()
    )
    tables = [USER, ORDER_ITEM, SPACED]
    try:
        with psycopg.connect(settings.postgres_conninfo(), autocommit=True) as conn:
            for _ in range(20):
                workload.insert(conn)  # rows before the connector exists: the initial snapshot
            with pipeline_for_schema(
                settings, name, TABLE_ENTRIES, tmp_path, schema=f'"{schema}"'
            ) as running:  # fmt: skip
                config = running.config
                assert [config.topic_for(t) for t in config.tables] == [
                    f"{name}.{schema}.User",
                    f"{name}.{schema}.OrderItem",
                    f"{name}.{schema}.Order_Items",
                ]
                assert [config.sink_table(t) for t in config.tables] == [
                    f"{schema}_User",
                    f"{schema}_OrderItem",
                    f"{schema}_Order_Items",
                ]
                running.start_stream()
                workload.run(conn, 400)
                assert running.wait_until_replica_matches(conn, client, tables, timeout=600) > 30

                _replica_has_the_exact_columns(client, running)
                _debezium_used_the_exact_names(settings, conn, running)

                # Backfills: Debezium's snapshot signal names "User" as an exact regex and "Order Items" in
                # double quotes. Each re-reads its table into the emptied replica: first the rows matching a
                # condition (Debezium applies it only if its pattern matched the name: it scans only those),
                # then the whole table; Debezium's notifications name the tables exactly.
                kafka = KafkaResource(bootstrap_servers=settings.kafka_bootstrap_servers)
                for table, condition in ((config.table(USER), '"id" % 2 = 1'), (config.table(SPACED), "id % 2 = 0")):
                    client.command(f"TRUNCATE TABLE `{name}`.`{config.sink_table(table)}`")
                    for where in (condition, None):
                        progress = _backfill(kafka, conn, config, table, where)
                        assert progress.rows_scanned == exact_count(conn, table, where) > 0, (table.name, where)
                workload.run(conn, 100)
                running.wait_until_replica_matches(conn, client, tables, timeout=600)

                # The control plane's reconcile reads both sides by the exact names: no differences.
                for table in config.tables:
                    key = primary_key(conn, table)
                    captured = source_columns(conn, table)
                    replica = ClickHouseReplica(client, name, config.sink_table(table))
                    diff = reconcile(conn, replica, table.schema_name, table.table_name, key, captured)
                    assert diff.total == 0 and diff.source_rows > 0, (table.name, diff)
                assert running.stream_alive(), running.log_tail()
    finally:
        client.close()


def _backfill(
    kafka: KafkaResource, conn: psycopg.Connection, config: PipelineConfig, table: TableConfig, where: str | None
) -> SnapshotProgress:
    """An incremental snapshot of `table`, followed through Debezium's notifications until its scan completed."""
    consumer = kafka.consumer(f"{config.consumer_group}-backfill", **{"enable.partition.eof": False})
    try:
        topic = config.topic_for(table)
        start, notification_start = end_offsets(consumer, topic), end_offsets(consumer, config.notification_topic)
        signal_id = request_incremental_snapshot(conn, config, table, where)
        return follow_snapshot(
            consumer, topic=topic, notification_topic=config.notification_topic, start=start,
            notification_start=notification_start, signal_id=signal_id, table=table.collection_id,
            expected=exact_count(conn, table, where), timeout=300,
        )  # fmt: skip
    finally:
        consumer.close()


def _replica_has_the_exact_columns(client: Client, running: RunningPipeline) -> None:
    def columns(table: str) -> list[str]:
        return client.query(
            "SELECT name FROM system.columns WHERE database = {d:String} AND table = {t:String} ORDER BY position",
            parameters={"d": running.database, "t": running.config.sink_table(running.config.table(table))},
        ).result_columns[0]

    # Case kept, the filtered-out column never reaches ClickHouse.
    assert columns(USER)[:4] == ["id", "createdAt", "displayName", "email"]
    assert "Secret Note" not in columns(USER)
    assert columns(ORDER_ITEM)[:5] == ["orderId", "lineNo", "productName", "qty", "unitPrice"]
    assert columns(SPACED)[:2] == ["id", "Note"]
    order_by = client.command(
        "SELECT sorting_key FROM system.tables WHERE database = {d:String} AND name = {t:String}",
        parameters={"d": running.database, "t": running.config.sink_table(running.config.table(ORDER_ITEM))},
    )
    assert order_by == "orderId, lineNo"


def _debezium_used_the_exact_names(settings: Settings, conn: psycopg.Connection, running: RunningPipeline) -> None:
    config = running.config
    published = conn.execute(
        "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (config.publication_name,)
    ).fetchall()
    schema = config.source.schemas[0]
    assert set(published) == {(schema, "User"), (schema, "OrderItem"), (schema, "Order Items"), (schema, "cdc_signal")}
    admin = KafkaResource(bootstrap_servers=settings.kafka_bootstrap_servers).admin()
    wait_for(lambda: set(config.topics()) <= set(admin.list_topics(timeout=10).topics), 60, "the table topics")
    checks = check_source(conn, config)
    assert all(check.ok for check in checks), [check.line() for check in checks if not check.ok]

"""The aggregates' stream hooks against the real ClickHouse endpoint, without Spark: the hooks are
called around replica writes as the batch writer calls them, including a writer that dies between the
replica write and the recompute, a truncate, and late changes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from cdc_pipeline.config import PipelineConfig, parse_pipeline_config
from cdc_pipeline.streaming.aggregates import LATE_TABLE, PENDING_TABLE, StreamAggregates, compare
from cdc_pipeline.streaming.sink import ReplicaTable

pytestmark = pytest.mark.integration

BASE = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def pipeline_for(database: str) -> PipelineConfig:
    measures = [{"name": "orders", "function": "count"}, {"name": "revenue", "function": "sum", "column": "total"}]
    return parse_pipeline_config(
        {
            "name": "aggtest",
            "tables": [{"name": "public.orders", "clickhouse_table": "orders"}],
            "sink": {"clickhouse": {"database": database}},
            "aggregates": [
                {"name": "per_minute", "table": "public.orders", "event_time": "created_at",
                 "window": {"size": "1 minute"}, "group_by": ["status"], "measures": measures},
                {"name": "sliding", "table": "public.orders", "event_time": "created_at",
                 "window": {"size": "3 minutes", "slide": "1 minute"}, "watermark_delay": "1 minute",
                 "filter": "status <> 'cancelled'", "measures": measures},
            ],
        }
    )  # fmt: skip


class Replica:
    """A replica table written the way the stream writes it (versions, deletion markers)."""

    def __init__(self, client: Client, database: str) -> None:
        self.client = client
        self.table = ReplicaTable(database, "orders", ("id",))
        self.version = 0
        client.command(f"CREATE DATABASE IF NOT EXISTS `{database}`")
        client.command(
            f"CREATE TABLE {self.table.qualified} (id Int64, status String, total Decimal(14, 2), "
            "created_at DateTime64(6, 'UTC'), _version UInt128, _is_deleted UInt8, _source_ts DateTime64(3, 'UTC')) "
            "ENGINE = ReplacingMergeTree(_version, _is_deleted) ORDER BY id"
        )

    def write(self, rows: list[tuple[int, str | None, Any, Any]]) -> None:
        """(id, status, total, minutes after BASE) upserts; status None deletes the row."""
        data = []
        for key, status, total, minutes in rows:
            self.version += 1
            deleted = status is None
            at = BASE + timedelta(minutes=minutes or 0)
            data.append([key, status or "", Decimal(total or 0), at, self.version, int(deleted), BASE])
        self.client.insert(
            self.table.qualified, data,
            column_names=["id", "status", "total", "created_at", "_version", "_is_deleted", "_source_ts"],
        )  # fmt: skip

    def truncate(self) -> None:
        self.version += 1
        self.client.command(
            f"INSERT INTO {self.table.qualified} (id, _version, _is_deleted, _source_ts) "
            f"SELECT id, {self.version}, 1, _source_ts FROM {self.table.qualified} FINAL"
        )


def batch(hooks: StreamAggregates, replica: Replica, rows: list[tuple], *, crash: bool = False) -> None:
    hooks.before_write(replica.table, [(r[0],) for r in rows])
    replica.write(rows)
    if not crash:
        hooks.after_write(replica.table)


def assert_exact(client: Client, pipeline: PipelineConfig, database: str) -> None:
    for aggregate in pipeline.aggregates:
        result = compare(client, pipeline, database, aggregate, closed_only=False)
        assert result.ok, result.summary()


def utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def live(client: Client, database: str, table: str) -> list[tuple]:
    rows = client.query(
        f"SELECT window_start, status, orders, revenue FROM `{database}`.`{table}` FINAL WHERE _is_deleted = 0 "
        "ORDER BY ALL",
        query_tz="UTC",
    ).result_rows
    return [(utc(r[0]), *r[1:]) for r in rows]


def test_updates_deletes_a_crash_a_truncate_and_late_changes(clickhouse: Client, unique_name: str) -> None:
    database = unique_name
    pipeline = pipeline_for(database)
    replica = Replica(clickhouse, database)
    hooks = StreamAggregates(pipeline, database, clickhouse)

    batch(hooks, replica, [(1, "paid", 10, 0.5), (2, "paid", 5, 0.7), (3, "new", 1, 1.5), (4, "cancelled", 7, 2.5)])
    assert_exact(clickhouse, pipeline, database)
    assert live(clickhouse, database, "agg_per_minute") == [
        (BASE, "paid", 2, Decimal(15)),
        (BASE + timedelta(minutes=1), "new", 1, Decimal(1)),
        (BASE + timedelta(minutes=2), "cancelled", 1, Decimal(7)),
    ]

    # An amount change, a status change (another group), a move to another window, a delete.
    batch(hooks, replica, [(1, "paid", 12, 0.5), (2, "new", 5, 0.7), (3, "new", 1, 4.2), (4, None, None, None)])
    assert_exact(clickhouse, pipeline, database)
    assert live(clickhouse, database, "agg_per_minute") == [
        (BASE, "new", 1, Decimal(5)),
        (BASE, "paid", 1, Decimal(12)),
        (BASE + timedelta(minutes=4), "new", 1, Decimal(1)),
    ]
    # Re-running the same batch (Spark after a crash, a replay) changes nothing.
    batch(hooks, replica, [(1, "paid", 12, 0.5), (2, "new", 5, 0.7), (3, "new", 1, 4.2), (4, None, None, None)])
    assert_exact(clickhouse, pipeline, database)

    # The writer dies between the replica write and the recompute: the old windows stay pending...
    batch(hooks, replica, [(1, None, None, None), (2, "new", 5, 9.0)], crash=True)
    assert not compare(clickhouse, pipeline, database, pipeline.aggregates[0], closed_only=False).ok
    pending = clickhouse.command(f"SELECT count() FROM `{database}`.{PENDING_TABLE} FINAL WHERE _is_deleted = 0")
    assert int(pending) > 0
    # ...and the next writer recomputes them at its first batch, which is the same batch again (Spark re-runs
    # a batch it did not commit). Re-running alone would not do: the rows' old positions are gone from the
    # replica by then, and only the pending log still names their windows.
    restarted = StreamAggregates(pipeline, database, clickhouse)
    batch(restarted, replica, [(1, None, None, None), (2, "new", 5, 9.0)])
    assert_exact(clickhouse, pipeline, database)
    assert live(clickhouse, database, "agg_per_minute") == [
        (BASE + timedelta(minutes=4), "new", 1, Decimal(1)),
        (BASE + timedelta(minutes=9), "new", 1, Decimal(5)),
    ]
    assert int(clickhouse.command(f"SELECT count() FROM `{database}`.{PENDING_TABLE} FINAL WHERE _is_deleted = 0")) == 0

    # Late: the newest event time is now minute 60; a change at minute 1 touches closed windows.
    batch(restarted, replica, [(5, "paid", 3, 60.0)])
    batch(restarted, replica, [(6, "paid", 4, 1.0)])
    assert_exact(clickhouse, pipeline, database)
    late = clickhouse.query(
        f"SELECT aggregate, window_start, row_key, position, lateness_s FROM `{database}`.{LATE_TABLE} FINAL "
        "WHERE row_key = '[6]' ORDER BY aggregate, window_start",
        query_tz="UTC",
    ).result_rows
    assert [(r[0], utc(r[1]), r[3]) for r in late] == [
        ("per_minute", BASE + timedelta(minutes=1), "after"),
        ("sliding", BASE - timedelta(minutes=1), "after"),
        ("sliding", BASE, "after"),
        ("sliding", BASE + timedelta(minutes=1), "after"),
    ]
    assert json.loads(late[0][2]) == [6] and late[0][4] == pytest.approx(60 * 60 - 2 * 60)  # watermark 60 - end 2

    # An aggregate added to pipeline.yaml later is built from the replica at the writer's first batch.
    added = pipeline.model_copy(deep=True)
    added.aggregates.append(
        added.aggregates[0].model_copy(update={"name": "per_hour", "window": added.aggregates[0].window.model_copy(
            update={"size": "1 hour"})})
    )  # fmt: skip
    StreamAggregates(added, database, clickhouse).before_write(ReplicaTable(database, "other", ("id",)), [])
    assert live(clickhouse, database, "agg_per_hour") == [
        (BASE, "new", 2, Decimal(6)),
        (BASE, "paid", 1, Decimal(4)),
        (BASE + timedelta(hours=1), "paid", 1, Decimal(3)),
    ]
    assert_exact(clickhouse, added, database)

    # A truncate empties every window.
    restarted.before_truncate(replica.table)
    replica.truncate()
    restarted.after_write(replica.table)
    assert_exact(clickhouse, pipeline, database)
    assert live(clickhouse, database, "agg_per_minute") == []

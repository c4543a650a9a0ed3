"""Aggregates without a stack: window math, the pipeline.yaml section and its errors, the SQL's shape."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import pytest

from cdc_pipeline.config import PipelineConfigError, load_pipeline_config, parse_pipeline_config
from cdc_pipeline.streaming.aggregates import (
    from_micros,
    is_closed,
    recompute_sql,
    results_sql,
    to_micros,
    window_starts,
)
from cdc_pipeline_tests.conftest import REPO_ROOT

MINUTE = 60_000_000


def test_tumbling_windows_hold_each_event_once() -> None:
    t = to_micros(datetime(2024, 1, 1, 12, 34, 56, 789, tzinfo=UTC))
    assert window_starts(t, MINUTE, MINUTE) == [to_micros(datetime(2024, 1, 1, 12, 34, tzinfo=UTC))]
    # A window is [start, end): an event on a boundary opens the next window.
    boundary = to_micros(datetime(2024, 1, 1, 12, 35, tzinfo=UTC))
    assert window_starts(boundary, MINUTE, MINUTE) == [boundary]
    assert window_starts(boundary - 1, MINUTE, MINUTE) == [boundary - MINUTE]


def test_sliding_windows_hold_each_event_size_over_slide_times() -> None:
    t = to_micros(datetime(2024, 1, 1, 12, 34, 30, tzinfo=UTC))
    starts = window_starts(t, 5 * MINUTE, MINUTE)
    assert [from_micros(s).strftime("%H:%M") for s in starts] == ["12:34", "12:33", "12:32", "12:31", "12:30"]
    assert all(s <= t < s + 5 * MINUTE for s in starts)


def test_windows_before_1970_floor_instead_of_truncating() -> None:
    t = to_micros(datetime(1969, 12, 31, 23, 59, 30, tzinfo=UTC))
    assert t < 0
    assert window_starts(t, MINUTE, MINUTE) == [-MINUTE]
    assert window_starts(-MINUTE, MINUTE, MINUTE) == [-MINUTE]


def test_naive_datetimes_and_dates_are_utc() -> None:
    assert to_micros(datetime(2024, 1, 1)) == to_micros(datetime(2024, 1, 1, tzinfo=UTC))
    assert to_micros(date(2024, 1, 1)) == to_micros(datetime(2024, 1, 1, tzinfo=UTC))
    assert from_micros(to_micros(datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC))) == datetime(
        2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC
    )


def test_a_window_closes_when_its_end_reaches_the_watermark() -> None:
    assert not is_closed(0, MINUTE, None)
    assert not is_closed(0, MINUTE, MINUTE - 1)
    assert is_closed(0, MINUTE, MINUTE)


def test_shipped_pipeline_yaml_has_the_example_aggregates() -> None:
    pipeline = load_pipeline_config(REPO_ROOT / "pipeline.yaml")
    by_name = {a.name: a for a in pipeline.aggregates}
    assert set(by_name) == {"orders_per_minute", "revenue_5m_sliding", "customers_per_hour"}
    sliding = by_name["revenue_5m_sliding"]
    assert (sliding.window.size_us, sliding.window.slide_us) == (5 * MINUTE, MINUTE)
    assert sliding.filter == "status <> 'cancelled'"
    assert by_name["orders_per_minute"].sink_table == "agg_orders_per_minute"


def config(**aggregate: Any) -> dict[str, Any]:
    base = {
        "name": "orders_per_minute",
        "table": "public.orders",
        "event_time": "created_at",
        "window": {"size": "1 minute"},
        "measures": [{"name": "orders", "function": "count"}],
    }
    return {
        "name": "shop",
        "tables": [
            {"name": "public.orders"},
            {"name": "public.customers", "columns": {"exclude": ["email"]}},
            {"name": "public.events", "sinks": ["warehouse"]},
        ],
        "aggregates": [{**base, **aggregate}],
    }


def test_an_unqualified_table_name_resolves() -> None:
    pipeline = parse_pipeline_config(config(table="orders"))
    assert pipeline.aggregates[0].table == "public.orders"


@pytest.mark.parametrize(
    ("aggregate", "expected"),
    [
        ({"table": "public.missing"}, "aggregates[0].table: public.missing is not a captured table"),
        ({"window": {"size": "5 minutes", "slide": "2 minutes"}}, "aggregates[0].window: slide (2 minutes) must"),
        ({"window": {"size": "1 minute", "slide": "2 minutes"}}, "aggregates[0].window: slide (2 minutes) must"),
        ({"window": {"size": "5 minuets"}}, "aggregates[0].window.size: '5 minuets' is not"),
        ({"window": {"size": "0 seconds"}}, "aggregates[0].window: size must be positive"),
        ({"watermark_delay": "soon"}, "aggregates[0].watermark_delay: 'soon' is not"),
        ({"measures": [{"name": "s", "function": "sum"}]}, "aggregates[0].measures[0]: function sum needs a column"),
        ({"measures": [{"name": "s", "function": "median", "column": "x"}]}, "aggregates[0].measures[0].function"),
        ({"measures": []}, "aggregates[0].measures: List should have at least 1 item"),
        ({"group_by": ["Status"]}, "aggregates[0].group_by[0]: 'Status': unquoted names fold to lower case"),
        ({"group_by": ["status"], "measures": [{"name": "status", "function": "count"}]}, "'status' repeats"),
        ({"measures": [{"name": "window_start", "function": "count"}]}, "'window_start' is reserved"),
        ({"filter": "status = 'paid'; DROP TABLE x"}, "aggregates[0].filter: filter must be a single expression"),
        ({"filter": "1 SETTINGS max_threads = 1"}, "aggregates[0].filter: filter must be a single expression"),
        ({"filter": "a) OR (1"}, "aggregates[0].filter: filter closes a parenthesis"),
        ({"name": "Orders"}, "aggregates[0].name: String should match pattern"),
        ({"clickhouse_table": "public_orders"}, "clickhouse_table: public_orders is already the table of tables[0]"),
        ({"table": "public.customers", "group_by": ["email"]}, "aggregates[0]: columns ['email'] are filtered out"),
        ({"size": "1 minute"}, "aggregates[0].size: Extra inputs are not permitted"),
        ({"table": "public.events"}, "aggregates[0].table: public.events has no ClickHouse replica"),
    ],
)
def test_aggregate_errors_name_their_key(aggregate: dict[str, Any], expected: str) -> None:
    with pytest.raises(PipelineConfigError) as excinfo:
        parse_pipeline_config(config(**aggregate))
    assert expected in str(excinfo.value)


def test_repeated_aggregate_names_are_refused() -> None:
    data = config()
    data["aggregates"].append(dict(data["aggregates"][0], clickhouse_table="other"))
    with pytest.raises(PipelineConfigError, match=r"aggregates\[1\]\.name: orders_per_minute repeats aggregates\[0\]"):
        parse_pipeline_config(data)


def test_sql_recomputes_only_the_touched_windows_with_tombstones_first() -> None:
    pipeline = parse_pipeline_config(
        config(window={"size": "5 minutes", "slide": "1 minute"}, group_by=["status"], filter="status <> 'x'")
    )
    aggregate = pipeline.aggregates[0]
    select = results_sql(aggregate, "`db`.`orders`", [0, MINUTE])
    assert "FINAL" in select and "_is_deleted = 0" in select and "(status <> 'x')" in select
    assert "arrayJoin(range(0, 5))" in select and "__cdc_ws IN (0, 60000000)" in select
    tumbling = parse_pipeline_config(config()).aggregates[0]
    assert "arrayJoin" not in results_sql(tumbling, "`db`.`orders`")
    insert = recompute_sql(aggregate, "db", "`db`.`orders`", [MINUTE])
    tombstones, fresh = insert.split("UNION ALL")
    assert "__cdc_v, 1 FROM `db`.`agg_orders_per_minute` FINAL" in tombstones
    assert "IN (60000000)" in tombstones
    assert "__cdc_v + 1, 0" in fresh

"""The jobs' Dagster-free rules on fakes (no stack): reconcile's settling and report (control/reconcile.py),
the repair's key filter, plan and SQL (control/repair.py), the replay's offset range
(control/replay_range.py) and the backfill's notification topic (control/notifications.py); and that
the jobs package builds the same jobs as before it was split. Real stack: test_control_plane.py's
backfill, replay and reconcile tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg import sql

from cdc_pipeline.config import TableConfig, parse_pipeline_config
from cdc_pipeline.control import reconcile, repair
from cdc_pipeline.control.notifications import NotificationsUnavailable, notification_topic
from cdc_pipeline.control.reconcile import Differences
from cdc_pipeline.control.replay_range import ReplayRangeError, offset_for_time, replay_range


def table(name: str = "public.orders", **extra: Any) -> TableConfig:
    return parse_pipeline_config({"name": "shop", "tables": [{"name": name, **extra}]}).tables[0]


class FakeConnection:
    """Enough of a psycopg connection for the repair's SQL: renders each query, answers from `rows`."""

    adapters = psycopg.adapters  # what `Composable.as_string` needs of a connection (with `connection`)
    connection = None

    def __init__(self, rows: list[tuple[Any, ...]] | None = None) -> None:
        self.rows = rows or []
        self.queries: list[str] = []

    def execute(self, query: sql.Composable, params: Any = None) -> list[tuple[Any, ...]]:
        text = query.as_string(self)
        self.queries.append(text)
        return [row for row in self.rows if any(repr(v) in text or str(v) in text for v in row)]


class FakeReplica:
    kind = "clickhouse"
    qualified = "`shop`.`orders`"

    def __init__(self, live: dict[tuple[Any, ...], int] | None = None) -> None:
        self.live = live or {}
        self.marked: list[tuple[list[str], dict[tuple[Any, ...], tuple[tuple[Any, ...], int]]]] = []

    def live_versions(
        self, key: list[str], keys: list[tuple[Any, ...]]
    ) -> dict[tuple[Any, ...], tuple[tuple[Any, ...], int]]:
        return {k: (k, self.live[k]) for k in keys if k in self.live}

    def mark_deleted(self, key: list[str], stale: dict[tuple[Any, ...], tuple[tuple[Any, ...], int]]) -> None:
        self.marked.append((key, stale))


def connector(*states: str, channels: str = "sink", topic: str | None = "shop.notifications") -> tuple[dict, dict]:
    status = {"connector": {"state": states[0]}, "tasks": [{"id": i, "state": s} for i, s in enumerate(states[1:])]}
    stored = {"notification.enabled.channels": channels}
    if topic:
        stored["notification.sink.topic.name"] = topic
    return status, stored


# --- control/repair.py ------------------------------------------------------------------------------


def test_the_key_filter_selects_rows_by_single_and_composite_keys_with_quoted_names_and_values() -> None:
    assert repair.key_filter(None, ["id"], [(1,), (2,)]) == '("id") IN ((1), (2))'
    assert (
        repair.key_filter(None, ["Tenant", "id"], [("o'k", 1)]) == "(\"Tenant\", \"id\") IN (('o''k', 1))"
    )  # a quote in a value is doubled, a mixed-case column is quoted


def test_existing_keys_asks_the_source_in_batches_and_normalizes_like_the_diff() -> None:
    moment = datetime(2026, 1, 1, 12, tzinfo=UTC)
    conn = FakeConnection(rows=[(7, moment)])
    keys = [(i, moment) for i in range(repair.EXISTING_KEYS_BATCH * 2 + 1)]
    found = repair.existing_keys(conn, table('public."Order"'), ["id", "at"], keys)
    assert len(conn.queries) == 3
    assert conn.queries[0].startswith('SELECT "id", "at" FROM "public"."Order" WHERE ("id", "at") IN ((0, ')
    assert found == {(7, datetime(2026, 1, 1, 12))}  # naive UTC, as `normalize` makes the diff's keys


def test_the_repair_plan_filters_the_snapshot_on_the_keys_and_marks_only_rows_the_source_lacks() -> None:
    diff = Differences(3, 3, missing=[(2,)], extra=[(8,), (9,)], different={(1,): {"total": (1, 2)}})
    replica = FakeReplica(live={(8,): 4, (9,): 6})
    conn = FakeConnection(rows=[(9,)])  # key 9 reappeared in the source: the stream brings it
    plan = repair.plan_repair(conn, table(primary_key=["id"]), diff, replica, max_filter_keys=10)
    assert plan.key == ["id"]
    assert plan.backfill_keys == [(2,), (1,)]  # missing first, then different
    assert plan.condition == '("id") IN ((2), (1))'
    assert plan.extra == {(8,): ((8,), 4)}


def test_too_many_keys_or_a_filter_too_long_for_the_signal_table_backfill_the_whole_table() -> None:
    many = Differences(20, 0, missing=[(i,) for i in range(20)])
    plan = repair.plan_repair(FakeConnection(), table(primary_key=["id"]), many, FakeReplica(), max_filter_keys=19)
    assert plan.condition is None and len(plan.backfill_keys) == 20
    long_keys = Differences(2, 0, missing=[("x" * 1000,), ("y" * 1000,)])
    plan = repair.plan_repair(FakeConnection(), table(primary_key=["id"]), long_keys, FakeReplica(), 500)
    assert plan.condition is None  # would exceed MAX_SIGNAL_FILTER_CHARS


def test_repair_marks_extra_rows_deleted_then_backfills_the_keys_and_reports_both() -> None:
    diff = Differences(2, 2, missing=[(2,)], extra=[(8,)])
    replica = FakeReplica(live={(8,): 4})
    conditions: list[str | None] = []
    logged: list[str] = []

    @contextmanager
    def connect() -> Iterator[Any]:
        yield FakeConnection()

    def backfill(condition: str | None) -> dict[str, Any]:
        conditions.append(condition)
        return {"table": "public.orders", "applied": True}

    result = repair.repair(connect, table(primary_key=["id"]), diff, replica, 500, backfill, logged.append)
    assert replica.marked == [(["id"], {(8,): ((8,), 4)})]
    assert conditions == ['("id") IN ((2))']
    assert logged == ["backfilling 1 rows of public.orders"]
    assert result == {"extra_marked_deleted": 1, "table": "public.orders", "applied": True}

    logged.clear()
    whole = repair.repair(connect, table(primary_key=["id"]), diff, FakeReplica(), 0, backfill, logged.append)
    assert conditions[-1] is None and logged == ["backfilling 1 rows of public.orders (whole table: too many keys)"]
    assert "extra_marked_deleted" not in whole  # the extra row is no longer live in the replica


def test_repair_without_keys_to_backfill_does_not_backfill() -> None:
    @contextmanager
    def connect() -> Iterator[Any]:
        yield FakeConnection()

    def backfill(condition: str | None) -> dict[str, Any]:
        raise AssertionError("nothing to backfill")

    diff = Differences(1, 2, extra=[(8,)])
    replica = FakeReplica(live={(8,): 1})
    assert repair.repair(connect, table(primary_key=["id"]), diff, replica, 500, backfill, print) == {
        "extra_marked_deleted": 1
    }


# --- control/reconcile.py: settling and the report -----------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class SourceColumns:
    """A connection answering the information_schema query of `control.source.source_columns`."""

    def execute(self, query: str, params: Any = None) -> Any:
        class Result:
            def fetchall(self) -> list[tuple[str]]:
                return [("id",), ("total",)]

        return Result()


def settle(
    monkeypatch: pytest.MonkeyPatch, lags: list[int], passes: list[Differences], settle_s: float = 30
) -> tuple[Differences, FakeClock, list[str], list[tuple[Any, ...]]]:
    calls: list[tuple[Any, ...]] = []

    def fake_reconcile(conn: Any, replica: Any, schema: str, name: str, key: list[str], captured: Any) -> Differences:
        calls.append((schema, name, key, captured))
        return passes[len(calls) - 1]

    monkeypatch.setattr(reconcile, "reconcile", fake_reconcile)
    readings = iter(lags)
    clock, warnings = FakeClock(), []

    @contextmanager
    def connect() -> Iterator[Any]:
        yield SourceColumns()

    result = reconcile.reconcile_settled(
        connect, lambda: next(readings), FakeReplica(), table(primary_key=["id"]), settle_s, warnings.append,
        sleep=clock.sleep, clock=clock,
    )  # fmt: skip
    return result, clock, warnings, calls


def test_reconcile_waits_for_the_stream_to_catch_up_then_compares_once_when_equal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result, clock, warnings, calls = settle(monkeypatch, [5, 3, 0], [Differences(2, 2)])
    assert clock.sleeps == [2, 2] and warnings == [] and result.unsettled_lag == 0
    assert calls == [("public", "orders", ["id"], ["id", "total"])]


def test_reconcile_warns_when_the_stream_still_lags_and_keeps_only_differences_seen_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = Differences(3, 3, missing=[(1,), (2,)], extra=[(8,)], different={(3,): {"t": (1, 2)}, (4,): {"t": (1, 3)}})
    second = Differences(3, 3, missing=[(2,), (5,)], extra=[], different={(4,): {"t": (1, 4)}, (6,): {"t": (0, 1)}})
    result, clock, warnings, _ = settle(monkeypatch, [7] * 10, [first, second], settle_s=4)
    assert warnings == [
        "public.orders: the stream still lags by 7 after 4 s; differences may be in flight (is the stream running?)"
    ]
    assert clock.sleeps == [2, 2, 4]  # two polls until the deadline, then the pause before the second pass
    assert result.missing == [(2,)] and result.extra == [] and result.different == {(4,): {"t": (1, 4)}}
    assert result.unsettled_lag == 7


def test_the_report_names_the_replica_counts_and_keys_as_json() -> None:
    diff = Differences(5, 4, missing=[(1, "a")], extra=[(2, "b")], different={(3, "c"): {"t": (1, 2)}})
    diff.unsettled_lag = 3
    warehouse = FakeReplica()
    warehouse.kind = "warehouse"
    assert reconcile.replica_label(table(), FakeReplica()) == "public.orders"
    assert reconcile.replica_label(table(), warehouse) == "public.orders (warehouse)"
    assert reconcile.counts(diff) == {"missing": 1, "extra": 1, "different": 1}
    assert reconcile.summary(diff, "warehouse") == {
        "sink": "warehouse", "source_rows": 5, "replica_rows": 4, "missing": 1, "extra": 1, "different": 1,
        "missing_keys": [["1", "a"]], "extra_keys": [["2", "b"]], "different_keys": [["3", "c"]],
        "columns_not_in_replica": [], "replica_exists": True, "lag_at_compare": 3,
    }  # fmt: skip
    assert (
        len(reconcile.summary(Differences(0, 0, missing=[(i,) for i in range(150)]), "clickhouse")["missing_keys"])
        == 100
    )


def test_the_differences_markdown_lists_each_kind_up_to_the_limit() -> None:
    diff = Differences(3, 3, missing=[(1,), (2,)], extra=[(8,)], different={(3,): {"total": (1, "x" * 400)}})
    lines = reconcile.differences_md(diff, limit=1).splitlines()
    assert lines[:4] == ["| kind | key | columns (source → replica) |", "|---|---|---|", "| missing | (1,) | |",
                         "| extra | (8,) | |"]  # fmt: skip
    assert lines[4].startswith("| different | (3,) | total: 1 → 'xxx") and len(lines) == 5
    assert len(lines[4]) == len("| different | (3,) | ") + 300 + len(" |")  # long values are cut
    assert reconcile.differences_md(Differences(0, 0)).splitlines() == lines[:2]


# --- control/notifications.py -------------------------------------------------------------------------


def test_the_notification_topic_of_a_running_connector_with_the_sink_channel() -> None:
    assert notification_topic("shop", *connector("RUNNING", "RUNNING", channels="log, sink")) == "shop.notifications"


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (connector("RUNNING", "FAILED"), r"connector shop is not running \(\['RUNNING', 'FAILED'\]\)"),
        (connector("RUNNING"), r"connector shop is not running \(\['RUNNING'\]\): the snapshot would never start"),
        (connector("RUNNING", "RUNNING", channels="log"), "does not publish Debezium notifications.*provision job"),
        (connector("RUNNING", "RUNNING", topic=None), "does not publish Debezium notifications"),
    ],
)
def test_a_backfill_needs_a_running_connector_that_publishes_notifications(
    status: tuple[dict, dict], message: str
) -> None:
    with pytest.raises(NotificationsUnavailable, match=message):
        notification_topic("shop", *status)


# --- control/replay_range.py ------------------------------------------------------------------------


class FakeConsumer:
    """Partition 0 holds offsets [low, high); record `n` was written at second 1000 + n (epoch)."""

    def __init__(self, low: int = 10, high: int = 50) -> None:
        self.low, self.high = low, high
        self.asked: list[int] = []

    def get_watermark_offsets(self, partition: Any, timeout: float, cached: bool) -> tuple[int, int]:
        return self.low, self.high

    def offsets_for_times(self, partitions: list[Any], timeout: float) -> list[Any]:
        found = []
        for tp in partitions:
            self.asked.append(tp.offset)
            offset = max(self.low, tp.offset // 1000 - 1000)
            tp.offset = offset if offset < self.high else -1
            found.append(tp)
        return found


def test_a_time_without_zone_is_utc_and_a_time_past_the_end_gives_the_default() -> None:
    consumer = FakeConsumer()
    assert offset_for_time(consumer, "t", 0, "1970-01-01T00:16:52", default=50) == 12
    assert consumer.asked == [1012_000]
    assert offset_for_time(consumer, "t", 0, "1970-01-01T01:16:52+01:00", default=50) == 12
    assert offset_for_time(consumer, "t", 0, "2026-01-01T00:00:00", default=50) == 50


def test_the_replay_range_from_offsets_or_times_ends_at_the_topics_end() -> None:
    consumer: Any = FakeConsumer()
    assert replay_range(consumer, "t", start_offset=20) == (20, 50)
    assert replay_range(consumer, "t", start_offset=20, end_offset=99) == (20, 50)
    assert replay_range(consumer, "t", start_offset=20, end_offset=30) == (20, 30)
    assert replay_range(consumer, "t", start_time="1970-01-01T00:16:55", end_time="1970-01-01T00:17:00") == (15, 20)
    assert replay_range(consumer, "t", start_time="1970-01-01T00:16:55") == (15, 50)


def test_a_replay_range_whose_start_is_gone_or_missing_is_refused() -> None:
    consumer: Any = FakeConsumer()
    with pytest.raises(ReplayRangeError, match=r"offset 3 of t is gone \(retention\); the earliest is 10: backfill"):
        replay_range(consumer, "t", start_offset=3)
    with pytest.raises(ReplayRangeError, match="give exactly one of start_offset or start_time"):
        replay_range(consumer, "t")


# --- defs/jobs/: the package builds the same jobs ----------------------------------------------------


def test_the_jobs_package_builds_every_job_under_the_translators_names() -> None:
    from cdc_pipeline.defs.jobs import build_jobs, run_backfill
    from cdc_pipeline.defs.translator import CdcTranslator

    assert callable(run_backfill)  # imported by the real-stack backfill tests
    pipeline = parse_pipeline_config({"name": "shop", "tables": [{"name": "public.orders"}]})
    for prefix in ("", "two"):
        jobs = build_jobs(CdcTranslator(pipeline, prefix=prefix))
        names = ["start_stream", "stop_stream", "restart_stream", "stream_status", "pause_connector",
                 "resume_connector", "backfill_table", "replay", "reconcile_tables"]  # fmt: skip
        expected = [f"{prefix}_{n}" if prefix else n for n in names]
        assert [job.name for job in jobs] == expected
        assert [[node.name for node in job.graph.node_defs] for job in jobs] == [
            [f"{name}_op"] for name in expected[:-1]
        ] + [[f"{prefix}_reconcile_op" if prefix else "reconcile_op"]]

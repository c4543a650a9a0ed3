"""The asset checks without Dagster or the stack (control/checks.py, control/aggregate_checks.py) and
waiting until the connector runs (control/provision.py): made-up readings, fake replicas, consumers,
Connect and ClickHouse clients, and a fake clock, so the waits take no time."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from dagster import AssetCheckSeverity, AssetKey, JsonMetadataValue, MarkdownMetadataValue

from cdc_pipeline.config import PipelineConfig, parse_pipeline_config
from cdc_pipeline.control import aggregate_checks, checks
from cdc_pipeline.control.aggregate_checks import check_aggregate, read_aggregate_metrics, rebuild_aggregate
from cdc_pipeline.control.checks import (
    CHECKS,
    CheckOutcome,
    FreshnessReading,
    Json,
    Markdown,
    capture_state,
    duplicate_keys_outcome,
    freshness_outcome,
    in_flight_changes,
    oldest_pending_ts,
    replica_checks,
    row_count_outcome,
    schema_drift_outcome,
    source_observations,
)
from cdc_pipeline.control.lag import LagSnapshot, PartitionLag
from cdc_pipeline.control.provision import ConnectorFailed, wait_connector_running
from cdc_pipeline.defs.assets import check_result
from cdc_pipeline.kafka_connect import ConnectError
from cdc_pipeline.streaming.aggregates import AggregateError, Comparison


def pipeline_config(**extra: Any) -> PipelineConfig:
    return parse_pipeline_config({"name": "shop", "tables": [{"name": "public.orders"}], **extra})


def snapshot(lag: int, end: int = 100, committed: int | None = 90) -> LagSnapshot:
    return LagSnapshot(0.0, (PartitionLag("shop.public.orders", 0, end, committed, lag),))


class Clock:
    """monotonic(), time() and sleep() that only move when slept."""

    def __init__(self) -> None:
        self.t = 1_000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.t

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds


# --- verdicts ---------------------------------------------------------------------------------------------


def test_equal_counts_pass() -> None:
    outcome = row_count_outcome(10, 10, lag=0, in_flight=0)
    assert outcome.passed and outcome.severity == "ERROR" and outcome.description == "equal"
    assert outcome.metadata == {
        "source_rows": 10, "replica_rows": 10, "difference": 0, "consumer_lag": 0, "changes_in_flight": 0,
        "explained_by_lag": False,
    }  # fmt: skip


def test_a_difference_within_the_changes_in_flight_passes() -> None:
    outcome = row_count_outcome(12, 10, lag=1, in_flight=3)
    assert outcome.passed
    assert outcome.description == "differs by 2, within the 3 changes not applied yet"
    assert outcome.metadata["explained_by_lag"] is True


def test_a_difference_beyond_the_changes_in_flight_fails_and_names_the_fix() -> None:
    outcome = row_count_outcome(10, 14, lag=0, in_flight=3)
    assert not outcome.passed
    assert outcome.description is not None
    assert outcome.description.startswith("differs by -4 with 3 changes in flight")
    assert "run the reconcile job" in outcome.description
    assert outcome.metadata["explained_by_lag"] is False


def test_in_flight_adds_what_debezium_captured_since() -> None:
    assert in_flight_changes(snapshot(5, end=100), snapshot(0, end=107)) == 12
    assert in_flight_changes(snapshot(5, end=100), snapshot(0, end=100)) == 5


def test_duplicate_keys() -> None:
    clean = duplicate_keys_outcome(["id"], [])
    assert clean.passed and clean.description is None and clean.severity == "ERROR"
    dirty = duplicate_keys_outcome(["a", "b"], [(1, "x", 2)])
    assert not dirty.passed
    assert dirty.metadata == {"duplicate_keys": 1, "key": "a, b", "examples": Json([["1", "x", "2"]])}


def test_freshness_verdicts() -> None:
    stopped = freshness_outcome(FreshnessReading(None, "PAUSED", 0, 0.0, None), max_age_s=600)
    assert not stopped.passed and stopped.severity == "WARN"
    assert stopped.description == "the connector is PAUSED: source changes are not being captured"
    assert stopped.metadata["newest_applied_change"] == "none" and stopped.metadata["slot_retained_wal_bytes"] == 0

    waiting = freshness_outcome(FreshnessReading("2026-01-01", "RUNNING", 4, 700.04, 123), max_age_s=600)
    assert not waiting.passed
    assert waiting.description == "4 changes wait, the oldest for 700 s (limit 600 s): is the stream running?"
    assert waiting.metadata == {
        "newest_applied_change": "2026-01-01", "pending_changes": 4, "oldest_pending_age_s": 700.0,
        "max_age_s": 600, "connector": "RUNNING", "slot_retained_wal_bytes": 123,
    }  # fmt: skip

    assert freshness_outcome(FreshnessReading(None, "RUNNING", 4, 10.0, 0), max_age_s=600).passed
    applied = freshness_outcome(FreshnessReading(None, "RUNNING", 0, 0.0, 0), max_age_s=600)
    assert applied.passed and applied.description == "every captured change is applied"


def test_schema_drift() -> None:
    same = schema_drift_outcome(["id", "total"], ["id", "total", "legacy"], "CREATE TABLE t")
    assert same.passed and same.severity == "WARN"
    assert same.metadata["only_in_replica"] == Json(["legacy"])
    assert same.metadata["ddl"] == Markdown("```sql\nCREATE TABLE t\n```")
    drift = schema_drift_outcome(["id", "note"], ["id"], "(not created yet)")
    assert not drift.passed and drift.metadata["missing_in_replica"] == Json(["note"])
    assert drift.description is not None and "backfill the table" in drift.description


def test_check_result_converts_the_outcome_for_dagster() -> None:
    outcome = CheckOutcome("freshness", False, "WARN", "late", {"n": 1, "j": Json([1]), "m": Markdown("*x*")})
    result = check_result(outcome, AssetKey(["shop", "orders"]))
    assert result.asset_key == AssetKey(["shop", "orders"]) and result.check_name == "freshness"
    assert not result.passed and result.severity == AssetCheckSeverity.WARN and result.description == "late"
    assert result.metadata["n"].value == 1
    assert isinstance(result.metadata["j"], JsonMetadataValue) and result.metadata["j"].value == [1]
    assert isinstance(result.metadata["m"], MarkdownMetadataValue) and result.metadata["m"].value == "*x*"
    plain = check_result(CheckOutcome("no_duplicate_keys", True), AssetKey("t"))
    assert plain.severity == AssetCheckSeverity.ERROR and plain.description is None


# --- the four checks from readings -------------------------------------------------------------------------


class FakeReadings:
    def __init__(self, counts: list[int], lags: list[LagSnapshot], capture: str = "RUNNING") -> None:
        self.counts, self.lags, self.capture = counts, lags, capture
        self.probed: list[int | None] = []

    def primary_key(self) -> list[str]:
        return ["id"]

    def source_columns(self) -> list[str]:
        return ["id", "total"]

    def source_count(self) -> int:
        return self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]

    def lag(self) -> LagSnapshot:
        return self.lags.pop(0) if len(self.lags) > 1 else self.lags[0]

    def capture_state(self) -> str:
        return self.capture

    def oldest_pending_ts(self, committed: int | None) -> float | None:
        self.probed.append(committed)
        return 900.0

    def retained_wal_bytes(self) -> int | None:
        return 4096


class FakeReplica:
    kind = "clickhouse"
    qualified = "`shop`.`orders`"

    def __init__(self, counts: list[int], exists: bool = True) -> None:
        self.counts, self._exists = counts, exists

    def exists(self) -> bool:
        return self._exists

    def live_count(self) -> int:
        return self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]

    def duplicate_keys(self, keys: list[str], limit: int = 20) -> list[tuple[Any, ...]]:
        return []

    def newest_source_ts(self) -> Any:
        return "2026-12-01 00:00:00"

    def columns(self) -> list[str]:
        return ["id", "total"]

    def ddl(self) -> str:
        return "CREATE TABLE shop.orders"

    def rows(self, columns: list[str], binary: set[str]) -> list[tuple[Any, ...]]:
        return []

    def live_versions(self, key: list[str], keys: list[tuple[Any, ...]]) -> dict[Any, Any]:
        return {}

    def mark_deleted(self, key: list[str], stale: dict[Any, Any]) -> None:
        pass


def run_checks(readings: FakeReadings, replica: FakeReplica, clock: Clock, wait: float = 120) -> list[CheckOutcome]:
    return replica_checks(
        readings, replica, check_wait_s=wait, freshness_max_age_s=600,
        sleep=clock.sleep, monotonic=clock.monotonic, now=clock.now,
    )  # fmt: skip


def test_the_four_checks_in_order_when_everything_agrees() -> None:
    clock = Clock()
    outcomes = run_checks(FakeReadings([5], [snapshot(0)]), FakeReplica([5]), clock)
    assert tuple(o.check_name for o in outcomes) == CHECKS
    assert all(o.passed for o in outcomes)
    assert clock.slept == []  # nothing to wait for
    assert outcomes[2].metadata["slot_retained_wal_bytes"] == 4096


def test_the_row_count_waits_until_the_stream_catches_up() -> None:
    clock = Clock()
    readings = FakeReadings([5], [snapshot(2), snapshot(1), snapshot(0)])
    outcomes = run_checks(readings, FakeReplica([3, 4, 5]), clock)
    assert outcomes[0].passed and outcomes[0].description == "equal"
    assert clock.slept == [checks.MEASURE_PAUSE_S, checks.MEASURE_PAUSE_S]


def test_with_zero_lag_the_row_count_waits_only_the_grace_period() -> None:
    clock = Clock()
    outcomes = run_checks(FakeReadings([5], [snapshot(0)]), FakeReplica([4]), clock)
    row_count = outcomes[0]
    assert not row_count.passed and row_count.metadata["difference"] == 1
    waited = [s for s in clock.slept if s == checks.MEASURE_PAUSE_S]
    assert checks.ZERO_LAG_GRACE_S <= len(waited) * checks.MEASURE_PAUSE_S < checks.ZERO_LAG_GRACE_S + 6
    assert clock.slept[-1] == checks.IN_FLIGHT_SETTLE_S  # then reads the changes captured meanwhile


def test_a_steady_write_load_is_explained_by_the_changes_in_flight() -> None:
    clock = Clock()
    lags = [snapshot(3, end=100)] * 3 + [snapshot(3, end=104)]
    readings = FakeReadings([10], lags)
    outcomes = run_checks(readings, FakeReplica([8]), clock, wait=6)
    assert outcomes[0].passed and outcomes[0].metadata["changes_in_flight"] >= 3
    assert outcomes[0].metadata["explained_by_lag"] is True
    assert readings.probed == [90]  # the oldest pending change is read after the committed offset
    assert outcomes[2].metadata["oldest_pending_age_s"] == round(clock.t - 900.0, 1)


def test_a_replica_not_created_yet() -> None:
    clock = Clock()
    outcomes = run_checks(FakeReadings([0], [snapshot(0)]), FakeReplica([99], exists=False), clock)
    by_name = {o.check_name: o for o in outcomes}
    assert by_name["row_count_matches_source"].passed
    assert by_name["freshness"].metadata["newest_applied_change"] == "none"
    drift = by_name["no_schema_drift"]
    assert not drift.passed and drift.metadata["ddl"] == Markdown("```sql\n(not created yet)\n```")


# --- the live readings' Kafka and Connect parts -------------------------------------------------------------


class FakeConnect:
    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def connector_status(self, name: str) -> dict[str, Any]:
        self.asked.append(name)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return dict(answer)


def status(state: str, *tasks: str, trace: str = "") -> dict[str, Any]:
    return {
        "connector": {"state": state, "worker_id": "w:8083"},
        "tasks": [{"id": i, "state": s, "trace": trace} for i, s in enumerate(tasks)],
    }


def test_capture_state() -> None:
    pipeline = pipeline_config()
    connect = FakeConnect([status("RUNNING", "RUNNING")])
    assert capture_state(connect, pipeline) == "RUNNING"
    assert connect.asked == ["cdc-shop-postgres"]
    assert capture_state(FakeConnect([status("RUNNING", "FAILED")]), pipeline) == "FAILED"
    assert capture_state(FakeConnect([status("RUNNING")]), pipeline) == "without tasks"
    down = FakeConnect([RuntimeError("connection refused\nmore")])
    assert capture_state(down, pipeline) == "unknown (connection refused)"


class FakeMessage:
    def __init__(self, ts_ms: int, error: Any = None) -> None:
        self.ts_ms, self._error = ts_ms, error

    def error(self) -> Any:
        return self._error

    def timestamp(self) -> tuple[int, int]:
        return 1, self.ts_ms


class FakeConsumer:
    def __init__(self, message: FakeMessage | None) -> None:
        self.message = message
        self.assigned: list[Any] = []

    def assign(self, partitions: list[Any]) -> None:
        self.assigned = partitions

    def poll(self, timeout: float) -> FakeMessage | None:
        return self.message


def test_oldest_pending_ts_reads_the_first_record_after_the_committed_offset() -> None:
    consumer = FakeConsumer(FakeMessage(1_700_000_000_500))
    assert oldest_pending_ts(consumer, "shop.public.orders", 42) == 1_700_000_000.5
    assert (consumer.assigned[0].topic, consumer.assigned[0].offset) == ("shop.public.orders", 42)
    beginning = FakeConsumer(None)
    assert oldest_pending_ts(beginning, "t", None) is None
    assert beginning.assigned[0].offset == -2  # OFFSET_BEGINNING
    assert oldest_pending_ts(FakeConsumer(FakeMessage(0)), "t", 1) is None
    assert oldest_pending_ts(FakeConsumer(FakeMessage(5, error="boom")), "t", 1) is None


def test_source_observations_count_small_tables_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = parse_pipeline_config(
        {"name": "shop", "tables": [{"name": "public.orders"}, {"name": "public.big"}, {"name": "public.gone"}]}
    )
    stats = {
        "public.orders": {"exists": True, "total_bytes": 10},
        "public.big": {"exists": True, "total_bytes": checks.EXACT_COUNT_BYTES},
        "public.gone": {"exists": False},
    }
    monkeypatch.setattr(checks, "wal_position", lambda conn, p: {"current_wal_lsn": "0/1"})
    monkeypatch.setattr(checks, "table_stats", lambda conn, t: dict(stats[t.name]))
    monkeypatch.setattr(checks, "exact_count", lambda conn, t: 7)
    observed = {t.name: m for t, m in source_observations(None, pipeline, {"public.orders", "public.big"})}
    assert observed == {
        "public.orders": {"exists": True, "total_bytes": 10, "row_count": 7, "current_wal_lsn": "0/1"},
        "public.big": {"exists": True, "total_bytes": checks.EXACT_COUNT_BYTES, "current_wal_lsn": "0/1"},
    }


# --- waiting until the connector runs -----------------------------------------------------------------------


URL = "http://connect:8083"


def wait(connect: FakeConnect, clock: Clock, timeout: float = 120) -> dict[str, Any]:
    return wait_connector_running(connect, "cdc-shop-postgres", timeout, sleep=clock.sleep, monotonic=clock.monotonic)


def test_wait_connector_running_waits_through_404_and_unassigned_tasks() -> None:
    clock = Clock()
    connect = FakeConnect(
        [
            ConnectError(404, "GET", "/connectors/cdc-shop-postgres/status", "No status found", url=URL),
            status("RUNNING", "UNASSIGNED"),
            status("RUNNING", "RUNNING"),
        ]
    )
    assert wait(connect, clock) == status("RUNNING", "RUNNING")
    assert clock.slept == [2, 2]


def test_wait_connector_running_names_the_failed_task_and_its_error() -> None:
    connect = FakeConnect(
        [status("RUNNING", "RUNNING", "FAILED", trace="org.postgresql.PSQLException: no slot\n\tat x")]
    )
    with pytest.raises(
        ConnectorFailed, match=r"connector cdc-shop-postgres failed: org.postgresql.PSQLException: no slot$"
    ):
        wait(connect, Clock())
    with pytest.raises(ConnectorFailed, match="failed: no trace"):
        wait(FakeConnect([status("FAILED")]), Clock())


def test_wait_connector_running_passes_other_connect_errors_and_times_out() -> None:
    with pytest.raises(RuntimeError, match="^500 "):
        wait(FakeConnect([ConnectError(500, "GET", "/connectors/x/status", "boom", url=URL)]), Clock())
    clock = Clock()
    with pytest.raises(ConnectorFailed, match=r"not RUNNING after 10 s: .*PAUSED"):
        wait(FakeConnect([status("PAUSED", "PAUSED")]), clock, timeout=10)
    assert sum(clock.slept) >= 10


# --- aggregates ----------------------------------------------------------------------------------------------


class FakeResult:
    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.result_rows = rows


class FakeClickHouse:
    """Answers `command` with `commands[...]` by the first matching word and `query` from a list, in order."""

    def __init__(self, commands: dict[str, Any], queries: list[list[tuple[Any, ...]]]) -> None:
        self.commands, self.queries = commands, queries
        self.sql: list[str] = []

    def command(self, query: str, parameters: Any = None) -> Any:
        self.sql.append(query)
        return next(value for word, value in self.commands.items() if word in query)

    def query(self, query: str, parameters: Any = None, query_tz: Any = None) -> FakeResult:
        self.sql.append(query)
        return FakeResult(self.queries.pop(0))


AGGREGATE = {
    "name": "orders_per_minute",
    "table": "public.orders",
    "event_time": "created_at",
    "window": {"size": "1 minute"},
    "measures": [{"name": "orders", "function": "count"}],
}


def test_the_aggregate_check_compares_again_before_failing(monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = pipeline_config(aggregates=[AGGREGATE])
    watermark = datetime(2026, 12, 1, tzinfo=UTC)
    answers = [
        Comparison("orders_per_minute", 3, watermark, missing=["w1"]),
        Comparison("orders_per_minute", 3, watermark),
    ]
    monkeypatch.setattr(aggregate_checks, "compare", lambda *args: answers.pop(0))
    client = FakeClickHouse({"EXISTS": 1}, [[(2, 1.5)]])
    slept: list[float] = []
    outcome = check_aggregate(client, pipeline, "cdc", pipeline.aggregates[0], sleep=slept.append)
    assert outcome.passed and outcome.check_name == "matches_replica" and outcome.severity == "ERROR"
    assert slept == [aggregate_checks.CHECK_PAUSE_S]
    assert outcome.description == "closed windows: 3 (window, group) rows equal a recomputation from the replica"
    assert outcome.metadata["late_changes"] == 2 and outcome.metadata["max_lateness_s"] == 1.5
    assert outcome.metadata["watermark"] == str(watermark) and outcome.metadata["examples"] == Json([])


def test_the_aggregate_check_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = pipeline_config(aggregates=[AGGREGATE])
    aggregate = pipeline.aggregates[0]
    watermark = datetime(2026, 12, 1, tzinfo=UTC)
    monkeypatch.setattr(aggregate_checks, "compare", lambda *a: Comparison("o", 2, watermark, extra=["w9"]))
    slept: list[float] = []
    client = FakeClickHouse({"EXISTS": 0}, [])
    outcome = check_aggregate(client, pipeline, "cdc", aggregate, sleep=slept.append)
    assert not outcome.passed and len(slept) == aggregate_checks.CHECK_ATTEMPTS - 1
    assert outcome.description is not None and "rebuild_aggregates job" in outcome.description
    assert outcome.metadata["extra"] == 1 and outcome.metadata["late_changes"] == 0

    monkeypatch.setattr(aggregate_checks, "compare", lambda *a: Comparison("o", replica_exists=False))
    missing = check_aggregate(client, pipeline, "cdc", aggregate, sleep=slept.append)
    assert missing.description == "the replica of public.orders does not exist yet: nothing to compare"
    assert "late_changes" not in missing.metadata

    def refuse(*args: Any) -> Comparison:
        raise AggregateError("aggregate orders_per_minute: column created_at is not in the replica")

    monkeypatch.setattr(aggregate_checks, "compare", refuse)
    refused = check_aggregate(client, pipeline, "cdc", aggregate)
    assert not refused.passed and refused.metadata == {} and "created_at" in (refused.description or "")


def test_rebuild_counts_the_live_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = pipeline_config(aggregates=[AGGREGATE])
    aggregate = pipeline.aggregates[0]
    monkeypatch.setattr(aggregate_checks, "recompute", lambda *a: -1)
    monkeypatch.setattr(aggregate_checks, "watermark_of", lambda *a: None)
    client = FakeClickHouse({"count()": 12}, [])
    rebuilt = rebuild_aggregate(client, pipeline, "cdc", aggregate)
    assert (rebuilt.rows, rebuilt.replica_exists, rebuilt.watermark) == (12, True, None)
    assert "FINAL WHERE" in client.sql[0]
    assert rebuilt.line(aggregate) == "orders_per_minute: 12 (window, group) rows recomputed from the replica"
    monkeypatch.setattr(aggregate_checks, "recompute", lambda *a: 0)
    assert rebuild_aggregate(client, pipeline, "cdc", aggregate).rows == 0


def test_aggregate_metrics_per_known_aggregate() -> None:
    after = datetime(2026, 12, 1, 0, 0, tzinfo=UTC)
    last = datetime(2026, 12, 1, 0, 0, 20)  # naive: ClickHouse's UTC
    rows = [
        ("orders_per_minute", 4, 100, 6, 1, datetime(2026, 12, 1, 0, 0, 5), last, "e", datetime(2026, 12, 1, 0, 0, 8)),
        ("dropped_aggregate", 1, 1, 1, 0, last, last, None, None),
    ]
    client = FakeClickHouse({"EXISTS": 1}, [rows, [(3.25,)]])
    metrics, newest = read_aggregate_metrics(client, "cdc", after, {"orders_per_minute"})
    assert newest == last.replace(tzinfo=UTC)
    assert metrics == [
        (
            "orders_per_minute",
            {
                "batches": 4, "changes": 100, "changes_per_second": 5.0, "windows_recomputed": 6, "late_changes": 1,
                "max_lateness_s": 3.25, "max_event_time": "e", "watermark": "2026-12-01 00:00:08",
                "watermark_age_s": 12.0,
            },
        )
    ]  # fmt: skip
    assert read_aggregate_metrics(FakeClickHouse({"EXISTS": 0}, []), "cdc", after, set()) == ([], None)


# --- the Dagster side: definitions and the conversion of outcomes ---------------------------------------------


def test_the_dagster_checks_keep_their_names_and_run_the_control_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    from contextlib import nullcontext

    from cdc_pipeline.defs import assets
    from cdc_pipeline.defs.translator import CdcTranslator

    pipeline = parse_pipeline_config(
        {"name": "shop", "tables": [{"name": "public.orders"}, {"name": "public.events", "sinks": ["warehouse"]}]}
    )
    translator = CdcTranslator(pipeline)
    definitions = assets.build_checks(pipeline, translator)
    assert [d.node_def.name for d in definitions] == [
        "shop_public_orders_checks",
        "shop_public_events_warehouse_checks",
    ]
    assert sorted(key.name for d in definitions for key in d.check_keys) == sorted(CHECKS * 2)

    class Resource:
        check_wait_s, freshness_max_age_s = 7.0, 600.0

        def connect(self, autocommit: bool) -> Any:
            return nullcontext("conn")

        def consumer(self, group: str) -> Any:
            raise AssertionError("the fake checks read nothing")

    seen: dict[str, Any] = {}

    def fake_checks(readings: Any, replica: Any, *, check_wait_s: float, freshness_max_age_s: float) -> list[Any]:
        seen.update(conn=readings.conn, topic=readings.topic, wait=check_wait_s, replica=replica)
        return [CheckOutcome(name, name != "freshness", "WARN" if name == "freshness" else "ERROR") for name in CHECKS]

    class Log:
        lines: list[str] = []

        def info(self, line: str) -> None:
            self.lines.append(line)

    monkeypatch.setattr(assets, "replica_checks", fake_checks)
    key = translator.sink_key(pipeline.tables[0])
    resource, log = Resource(), Log()
    results = assets.table_checks(
        pipeline.tables[0], pipeline, resource, resource, resource, "replica", resource, key, log
    )
    assert seen == {"conn": "conn", "topic": pipeline.topic_for(pipeline.tables[0]), "wait": 7.0, "replica": "replica"}
    assert [(r.check_name, r.passed, r.asset_key) for r in results] == [(n, n != "freshness", key) for n in CHECKS]
    assert log.lines == [
        "row_count_matches_source: passed; no_duplicate_keys: passed; freshness: FAILED; no_schema_drift: passed"
    ]

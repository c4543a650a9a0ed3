"""The sensors' Dagster-free parts: typed cursors (control/cursors.py: round trip, tolerant of old or broken
JSON), the connector-status and replication rules (control/rules.py) and the alerts built from their
verdicts (control/sensor_alerts.py). Made-up observations; no Dagster, no stack."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from cdc_pipeline.config import PipelineConfig
from cdc_pipeline.control.alerts import Incidents
from cdc_pipeline.control.cursors import (
    ConnectorCursor,
    IncidentsCursor,
    ReplicationCursor,
    RunFailureCursor,
    progress_cursor,
)
from cdc_pipeline.control.lag import LagSnapshot, PartitionLag
from cdc_pipeline.control.rules import (
    CheckOutcome,
    ConnectorReading,
    ReplicationLimits,
    SlotObservation,
    connector_health,
    replication_health,
)
from cdc_pipeline.control.sensor_alerts import (
    StreamPlace,
    check_failure_update,
    checkpoint_update,
    connector_failed_update,
    connector_gone_update,
    kafka_update,
    lag_update,
    redact_url,
    replication_updates,
    run_failure_alert,
)
from cdc_pipeline.control.stream_rules import StreamHealth, lag_rule, started_at_epoch, stream_restart_step

PIPELINE = PipelineConfig.model_validate({"name": "shop", "tables": [{"name": "public.customers"}]})
LIMITS = ReplicationLimits(
    slot_max_retained_bytes=1000, slot_max_retention_age_s=100, connector_max_paused_s=100, connector_missing_grace_s=50
)
RUNNING = {"connector": {"state": "RUNNING"}, "tasks": [{"id": 0, "state": "RUNNING"}]}
FAILED_TASK = {
    "connector": {"state": "RUNNING"},
    "tasks": [{"id": 0, "state": "FAILED", "worker_id": "w1:8083", "trace": "ERROR boom\nat x"}],
}
BROKEN = (None, "", "not json", "[1]", '"text"', "{")


def test_the_sensor_modules_of_control_do_not_import_dagster() -> None:
    code = (
        "import sys; import cdc_pipeline.control.sensor_alerts, cdc_pipeline.control.cursors, "
        "cdc_pipeline.control.rules, cdc_pipeline.control.stream_rules; "
        "assert not [m for m in sys.modules if m.split('.')[0] == 'dagster'], 'dagster imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- cursors


def test_the_incidents_cursor_round_trips_and_tolerates_broken_json() -> None:
    cursor = IncidentsCursor({"check:a:b": "2026-01-01T00:00:00+00:00"})
    assert IncidentsCursor.parse(cursor.serialize()) == cursor
    for text in (*BROKEN, '{"incidents": [1]}'):
        assert IncidentsCursor.parse(text) == IncidentsCursor()


def test_the_connector_cursor_round_trips_and_reads_older_cursors() -> None:
    cursor = ConnectorCursor({"connector:shop": "t"}, {"attempts": 2, "next_at": 5.0})
    assert ConnectorCursor.parse(cursor.serialize()) == cursor
    # The cursor stored after the connector was deleted had no restart state.
    assert ConnectorCursor.parse('{"incidents": {}}') == ConnectorCursor()
    for text in (*BROKEN, '{"incidents": 1, "restart": "x"}'):
        assert ConnectorCursor.parse(text) == ConnectorCursor()


def test_the_replication_cursor_round_trips_and_keeps_the_well_formed_parts() -> None:
    cursor = ReplicationCursor({"connector_paused:shop": "t"}, {"lsn": "0/10", "since": 3.0}, 7.0, None)
    assert ReplicationCursor.parse(cursor.serialize()) == cursor
    assert json.loads(cursor.serialize()) == {
        "incidents": {"connector_paused:shop": "t"},
        "slot": {"lsn": "0/10", "since": 3.0},
        "paused_since": 7.0,
        "missing_since": None,
    }
    for text in BROKEN:
        assert ReplicationCursor.parse(text) == ReplicationCursor()
    broken = json.dumps({"incidents": {}, "slot": [1], "paused_since": "soon", "missing_since": True})
    assert ReplicationCursor.parse(broken) == ReplicationCursor()
    assert ReplicationCursor.parse('{"slot": {}, "missing_since": 4}') == ReplicationCursor({}, {}, None, 4)


def test_the_run_failure_cursor_reads_dagsters_record_id_and_drops_bad_entries() -> None:
    cursor = RunFailureCursor(12, ["run-a", "run-b"])
    assert RunFailureCursor.parse(cursor.serialize()) == cursor
    assert RunFailureCursor.parse('{"record_id": 5}') == RunFailureCursor(5, [])
    assert RunFailureCursor.parse('{"after": 3, "record_id": 5}').after == 3
    assert RunFailureCursor.parse('{"after": 3, "pending": ["a", 1, null]}') == RunFailureCursor(3, ["a"])
    for text in (*BROKEN, '{"after": "3"}', '{"after": true}'):
        assert RunFailureCursor.parse(text).after is None  # the first evaluation again


def test_the_progress_cursor_is_utc() -> None:
    naive = datetime(2026, 1, 2, 3, 4, 5, 600000)  # DateTime64(3, 'UTC') read back without a zone
    assert progress_cursor(naive) == "2026-01-02T03:04:05.600000+00:00"
    east = datetime(2026, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    assert progress_cursor(east) == "2026-01-02T03:04:05+00:00"
    assert progress_cursor("2026-01-02 03:04:05") == "2026-01-02 03:04:05"


def test_the_stream_start_time_parses_to_epoch_or_zero() -> None:
    assert started_at_epoch("2026-01-01T00:00:00+00:00") == datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    assert started_at_epoch(None) == started_at_epoch("") == started_at_epoch("yesterday") == 0.0


def test_the_stream_restart_step() -> None:
    dead = StreamHealth({"dead": "not running"}, settling=False, restart=True)
    assert stream_restart_step(dead, restart_now=True) == "restart"
    assert stream_restart_step(dead, restart_now=False) == "wait"  # backoff, or a restart run is queued
    assert stream_restart_step(StreamHealth({}, settling=False, restart=False), restart_now=False) == "healthy"
    assert stream_restart_step(StreamHealth({}, settling=True, restart=False), restart_now=False) == "none"


# --- connector status


def test_a_failed_task_is_restarted_when_enabled_and_due_else_waits() -> None:
    reading = ConnectorReading(status=FAILED_TASK)
    health = connector_health(reading, restart_enabled=True, restart_due=True)
    assert health.step == "restart" and [t["id"] for t in health.failed] == [0]
    assert health.problem == "task 0 FAILED on w1:8083: ERROR boom"
    assert connector_health(reading, restart_enabled=True, restart_due=False).step == "wait"
    assert connector_health(reading, restart_enabled=False, restart_due=True).step == "none"


def test_a_running_connector_is_healthy_and_an_unreadable_one_is_a_problem() -> None:
    assert connector_health(ConnectorReading(status=RUNNING), True, True) == connector_health(
        ConnectorReading(status=RUNNING), False, False
    )
    healthy = connector_health(ConnectorReading(status=RUNNING), True, True)
    assert (healthy.step, healthy.problem, healthy.failed) == ("healthy", "", [])
    down = connector_health(
        ConnectorReading(error="Kafka Connect at http://c is unreachable: TimeoutError"), True, True
    )
    assert (down.step, down.problem) == ("none", "Kafka Connect at http://c is unreachable: TimeoutError")


def test_a_connector_reading_says_whether_it_exists() -> None:
    assert ConnectorReading(status=RUNNING).exists is True and ConnectorReading(status=RUNNING).state == "RUNNING"
    assert ConnectorReading(missing=True).exists is False and ConnectorReading(missing=True).state is None
    assert ConnectorReading(error="refused").exists is None


# --- replication health


def test_replication_rules_keep_their_state_when_nothing_could_be_read() -> None:
    cursor = ReplicationCursor({"x": "t"}, {"lsn": "0/1", "since": 1.0}, 2.0, 3.0)
    verdict = replication_health(None, ConnectorReading(error="down"), cursor, 100.0, LIMITS)
    assert (verdict.slot_bytes, verdict.slot_age, verdict.paused, verdict.missing) == (None, None, None, None)
    assert verdict.cursor == cursor and verdict.cursor.incidents is not cursor.incidents
    assert replication_updates(PIPELINE, "cdc-shop", "http://c", verdict) == []


def test_a_slot_that_stops_advancing_and_a_connector_paused_too_long_alert() -> None:
    slot = SlotObservation("cdc_shop", True, False, "0/10", 500)
    paused = ConnectorReading(status={"connector": {"state": "PAUSED"}, "tasks": []})
    cursor = ReplicationCursor()
    actives = []
    for now in (0.0, 60.0, 120.0):
        verdict = replication_health(slot, paused, cursor, now, LIMITS)
        cursor = verdict.cursor
        actives.append([u.active for u in replication_updates(PIPELINE, "cdc-shop", "http://u:p@c:8083", verdict)])
    assert actives == [[False, False, False, False], [False, False, False, False], [False, True, True, False]]
    assert cursor == ReplicationCursor({}, {"lsn": "0/10", "since": 0.0}, 0.0, None)
    updates = replication_updates(PIPELINE, "cdc-shop", "http://u:p@c:8083", verdict)
    assert [u.incident for u in updates] == [
        "slot_retention_bytes:shop",
        "slot_retention_age:shop",
        "connector_paused:shop",
        "connector_missing:shop",
    ]
    alert = updates[2].make(False)
    assert alert.title == "Debezium connector cdc-shop has been paused too long"
    assert alert.where == "Kafka Connect http://c:8083, connector cdc-shop"  # no credentials
    assert "PUT /connectors/cdc-shop/resume" in alert.action
    assert updates[1].make(True).title == "Replication slot cdc_shop advances again"
    assert "pg_drop_replication_slot('cdc_shop')" in updates[1].make(False).action


def test_a_missing_connector_alerts_after_its_grace() -> None:
    cursor = ReplicationCursor()
    for now in (0.0, 49.0, 50.0):
        verdict = replication_health(None, ConnectorReading(missing=True), cursor, now, LIMITS)
        cursor = verdict.cursor
        assert verdict.missing is not None and verdict.missing.active == (now >= 50)
    assert cursor.missing_since == 0.0 and cursor.slot is None
    verdict = replication_health(None, ConnectorReading(status=RUNNING), cursor, 60.0, LIMITS)
    assert verdict.missing is not None and not verdict.missing.active and verdict.cursor.missing_since is None
    update = replication_updates(PIPELINE, "cdc-shop", "http://c", verdict)[-1]
    assert update.make(True).title == "Debezium connector cdc-shop exists again"


# --- alerts


def deliver(incidents: Incidents, update: Any) -> list[Any]:
    sent: list[Any] = []
    incidents.update(update.incident, update.active, update.make, sent.append)
    return sent


def test_kafka_and_lag_alerts_open_and_clear_once() -> None:
    incidents = Incidents()
    [opened] = deliver(incidents, kafka_update(PIPELINE, "k:9092", "RuntimeError: no brokers"))
    assert opened.title == "Kafka is unreachable for pipeline shop" and opened.summary.endswith("no brokers")
    assert deliver(incidents, kafka_update(PIPELINE, "k:9092", "again")) == []
    [cleared] = deliver(incidents, kafka_update(PIPELINE, "k:9092", None))
    assert cleared.resolved and cleared.summary == "lag can be measured again"

    window: list[dict[str, Any]] = []
    for lag in (50, 60):
        snap = LagSnapshot(0.0, (PartitionLag("t", 0, 100 + lag, 100, lag), PartitionLag("t", 1, 1, 1, 0)))
        verdict, window = lag_rule(window, snap, 5, 2)
    [lag_alert] = deliver(incidents, lag_update(PIPELINE, snap, verdict, 5))
    assert lag_alert.incident == "lag:shop" and lag_alert.severity == "critical"  # stalled
    assert lag_alert.where == "consumer group cdc-shop-stream, query cdc_shop"
    assert lag_alert.details == {"total_lag": 60, "worst": "t[0]=60, t[1]=0"}


def test_the_checkpoint_alert_tells_how_to_recover() -> None:
    place = StreamPlace("/ckpt", None, "/log", "?", "unknown")
    update = checkpoint_update(PIPELINE, {"unreadable": "checkpoint /ckpt is unreadable: x"}, place, True)
    alert = update.make(False)
    assert (
        update.active
        and "restore the checkpoint" in alert.action
        and alert.where == "checkpoint /ckpt, pid -, log /log"
    )
    dead = checkpoint_update(PIPELINE, {"dead": "not running"}, place, True).make(False)
    assert dead.action.endswith("(automatic restart is on, with backoff)")
    assert not checkpoint_update(PIPELINE, {}, place, False).active


def test_connector_alerts_name_the_connector_without_credentials() -> None:
    update = connector_failed_update(PIPELINE, "cdc-shop", "https://u:secret@c:8083/", "task 0 FAILED", True)
    alert = update.make(False)
    assert update.active and alert.details == {"restarted": True} and "secret" not in alert.text()
    assert "POST /connectors/cdc-shop/restart?onlyFailed=true" in alert.action
    assert update.make(True).summary == "every task is RUNNING"
    gone = connector_gone_update(PIPELINE, "cdc-shop")
    assert (gone.incident, gone.active) == ("connector:shop", False)
    assert gone.make(True).title == "Debezium connector cdc-shop no longer exists"


def test_a_failed_error_check_alerts_and_a_warning_does_not() -> None:
    failed = CheckOutcome("shop/customers", "row_count", False, "ERROR", "3 rows missing", {"run": "r1"})
    update = check_failure_update("shop/customers", "row_count", "public.customers", failed)
    assert update is not None and update.incident == "check:shop/customers:row_count" and update.active
    alert = update.make(False)
    assert alert.title == "Check row_count failed on shop/customers" and alert.details == {"run": "r1"}
    assert alert.where == "asset shop/customers, table public.customers"
    warned = CheckOutcome("shop/customers", "row_count", False, "WARN")
    assert check_failure_update("shop/customers", "row_count", "public.customers", warned) is None
    assert check_failure_update("shop/customers", "row_count", "public.customers", None) is None


@pytest.mark.parametrize(
    ("tags", "launched_by"),
    [({"dagster/schedule_name": "nightly"}, "nightly"), ({"dagster/sensor_name": "s"}, "s"), ({}, "a user")],
)
def test_the_run_failure_alert(tags: dict[str, str], launched_by: str) -> None:
    alert = run_failure_alert("r1", "backfill", tags, ["op: boom"])
    assert (alert.title, alert.where, alert.summary) == ("Run of backfill failed", "job backfill, run r1", "op: boom")
    assert alert.details == {"launched_by": launched_by} and alert.severity == "warning"
    assert run_failure_alert("r1", "j", {}, []).summary.startswith("the run failed before any step ran")


def test_urls_lose_their_credentials() -> None:
    assert redact_url("https://user:secret@connect.example:8083/") == "https://connect.example:8083/"
    assert redact_url("http://127.0.0.1:8083") == "http://127.0.0.1:8083"

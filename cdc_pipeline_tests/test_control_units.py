"""Pure control-plane logic: lag window rules, incidents, alert payloads, checkpoint reading,
secret masking, backfill filters."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cdc_pipeline.control.alerts import Alert, Incidents
from cdc_pipeline.control.backfill import SnapshotFailed, SnapshotProgress, apply_notification
from cdc_pipeline.control.backoff import RestartBackoff
from cdc_pipeline.control.checkpoint import UnsupportedCheckpoint, inspect_checkpoint
from cdc_pipeline.control.lag import evaluate_window
from cdc_pipeline.control.reconcile import compare
from cdc_pipeline.defs.translator import MASK, mask_secrets


def window(*totals: int, committed: list[int] | None = None) -> list[dict]:
    committed = committed or list(range(len(totals)))
    return [{"at": i, "total": t, "committed": c} for i, (t, c) in enumerate(zip(totals, committed, strict=True))]


def test_a_short_window_or_any_zero_is_ok() -> None:
    assert evaluate_window(window(500, 900), threshold=100, size=3).ok
    assert evaluate_window(window(500, 0, 900), threshold=100, size=3).ok


def test_lag_over_threshold_growing_and_stalled() -> None:
    over = evaluate_window(window(500, 400, 300), threshold=100, size=3)
    assert over.over_threshold and not over.growing and not over.stalled
    growing = evaluate_window(window(5, 7, 9), threshold=100, size=3)
    assert growing.growing and not growing.over_threshold
    stalled = evaluate_window(window(5, 5, 5, committed=[10, 10, 10]), threshold=100, size=3)
    assert stalled.stalled and not stalled.growing
    assert evaluate_window(window(9, 7, 5), threshold=100, size=3).ok  # draining: fine
    assert "grew" in " ".join(growing.reasons(100))


def test_incidents_alert_once_and_recover_once() -> None:
    sent: list[Alert] = []

    def make(resolved: bool) -> Alert:
        return Alert("lag:x", "Lag", "group g", "summary", "do this", resolved=resolved)

    incidents = Incidents()
    for active in (False, True, True, True, False, False):
        incidents.update("lag:x", active, make, sent.append)
        incidents = Incidents(json.loads(json.dumps(incidents.state)))  # through a cursor
    assert [a.resolved for a in sent] == [False, True]


def test_an_undelivered_alert_is_tried_again() -> None:
    incidents = Incidents()

    def fail(_alert: Alert) -> None:
        raise RuntimeError("webhook down")

    make = lambda resolved: Alert("i", "t", "w", "s", "a", resolved=resolved)  # noqa: E731
    with pytest.raises(RuntimeError):
        incidents.update("i", True, make, fail)
    assert not incidents.is_open("i")
    sent: list[Alert] = []
    incidents.update("i", True, make, sent.append)
    assert len(sent) == 1 and incidents.is_open("i")


def test_restarts_back_off_exponentially_and_reset_when_healthy() -> None:
    backoff = RestartBackoff()
    assert backoff.due(0)
    delays = []
    for now in (0, 60, 180, 420, 900, 1860):
        assert backoff.due(now)
        delays.append(backoff.record_attempt(now, first_delay_s=60, max_delay_s=600))
        assert not backoff.due(now + delays[-1] - 1)
        backoff = RestartBackoff(json.loads(json.dumps(backoff.state)))  # through a cursor
    assert delays == [60, 120, 240, 480, 600, 600]
    # A brief recovery between failures does not reset the backoff; a stable one does.
    backoff.healthy(3000, stable_after_s=600)
    backoff.failing()
    backoff.healthy(3100, stable_after_s=600)
    backoff.healthy(3600, stable_after_s=600)
    assert backoff.attempts == 6
    backoff.healthy(3700, stable_after_s=600)
    assert backoff.due(0) and backoff.attempts == 0


def test_slack_payload() -> None:
    alert = Alert("c:x", "Connector failed", "worker 1", "task 0 FAILED", "restart it", details={"task": 0})
    payload = alert.slack_payload()
    assert payload["text"].startswith("[CRITICAL] Connector failed")
    assert "what to do: restart it" in payload["text"]
    assert payload["blocks"][0]["type"] == "section"
    resolved = Alert("c:x", "Connector", "w", "running", "restart it", resolved=True).slack_payload()
    assert resolved["text"].startswith("[RESOLVED]") and "what to do" not in resolved["text"]


def _checkpoint(root: Path, started: int, committed: int) -> None:
    (root / "offsets").mkdir(parents=True)
    (root / "commits").mkdir()
    (root / "metadata").write_text(json.dumps({"id": "q-1"}))
    for batch in range(started + 1):
        (root / "offsets" / str(batch)).write_text(f'v1\n{{"batchWatermarkMs":0}}\n{{"t":{{"0":{batch * 10}}}}}\n')
    for batch in range(committed + 1):
        (root / "commits" / str(batch)).write_text('v1\n{"nextBatchWatermarkMs":0}\n')


def test_checkpoint_reading(tmp_path: Path) -> None:
    healthy = tmp_path / "healthy"
    _checkpoint(healthy, started=3, committed=3)
    state = inspect_checkpoint(str(healthy))
    assert state.readable and state.query_id == "q-1" and state.pending_batch is None
    assert state.last_committed_batch == 3 and state.end_offsets == {"t": {"0": 30}}

    pending = tmp_path / "pending"
    _checkpoint(pending, started=4, committed=3)
    old = time.time() - 600
    os.utime(pending / "offsets" / "4", (old, old))
    state = inspect_checkpoint(f"file://{pending}")
    assert state.pending_batch == 4 and state.pending_since == pytest.approx(old, abs=1)

    broken = tmp_path / "broken"
    _checkpoint(broken, started=2, committed=2)
    (broken / "commits" / "2").write_text("garbage")
    state = inspect_checkpoint(str(broken))
    assert not state.readable and "version line" in state.error

    assert not inspect_checkpoint(str(tmp_path / "absent")).exists
    with pytest.raises(UnsupportedCheckpoint):
        inspect_checkpoint("s3a://bucket/checkpoints/shop")


def test_secrets_are_masked() -> None:
    masked = mask_secrets({"database.password": "${env:X}", "database.user": "cdc", "sasl.jaas.config": "secret"})
    assert masked == {"database.password": MASK, "database.user": "cdc", "sasl.jaas.config": MASK}


def test_compare_reports_missing_extra_and_different_by_key() -> None:
    source = {(1,): {"id": 1, "v": "a"}, (2,): {"id": 2, "v": "b"}, (3,): {"id": 3, "v": "c"}}
    replica = {(1,): {"id": 1, "v": "a"}, (2,): {"id": 2, "v": "B"}, (4,): {"id": 4, "v": "d"}}
    diff = compare(source, replica)
    assert diff.missing == [(3,)] and diff.extra == [(4,)] and diff.different == {(2,): {"v": ("b", "B")}}
    assert diff.keys_to_backfill() == [(3,), (2,)]


def test_credentials_are_removed_from_urls_in_alerts() -> None:
    from cdc_pipeline.defs.sensors import redact_url

    assert redact_url("https://user:secret@connect.example:8083/") == "https://connect.example:8083/"
    assert redact_url("http://127.0.0.1:8083") == "http://127.0.0.1:8083"


def test_schedules_produce_valid_run_config() -> None:
    from dagster import build_schedule_context, validate_run_config

    from cdc_pipeline.config import load_pipeline_config
    from cdc_pipeline.definitions import build_definitions
    from cdc_pipeline_tests.conftest import REPO_ROOT

    path = REPO_ROOT / "pipeline.yaml"
    defs = build_definitions(load_pipeline_config(path), path)
    for name in ("nightly_reconcile", "weekly_backfill_example", "observe_source_tables_schedule"):
        schedule = defs.resolve_schedule_def(name)
        when = datetime(2026, 11, 22, 4, tzinfo=UTC)
        requests = schedule.evaluate_tick(build_schedule_context(scheduled_execution_time=when)).run_requests
        assert len(requests) == 1
        validate_run_config(defs.resolve_job_def(schedule.job_name), requests[0].run_config)


def _captured_notifications() -> dict:
    path = Path(__file__).parent / "data" / "debezium" / "incremental_snapshot_notifications.json"
    return json.loads(path.read_text())


def _follow(signal: str, table: str) -> SnapshotProgress:
    """Feed the captured notifications, in order, to one backfill's progress."""
    captured = _captured_notifications()
    progress = SnapshotProgress(expected=0)
    for notification in captured["notifications"]:
        apply_notification(progress, notification, captured["signals"][signal], captured["tables"][table])
    return progress


def test_a_backfill_completes_with_its_own_table_scan() -> None:
    # a: 110 rows; its later notifications carry b's id (Debezium merged b into it).
    a = _follow("a", "t")
    assert a.completed and a.scan_status == "SUCCEEDED" and a.rows_scanned == 110 and a.chunk == (3, 3)
    assert not a.merged


def test_a_merged_backfill_waits_for_the_scan_queued_for_it() -> None:
    # b was queued behind a on the same table: the first scan of t is a's, the second is b's (EMPTY).
    b = _follow("b", "t")
    assert b.completed and b.scan_status == "EMPTY" and b.rows_scanned == 0
    assert b.merged  # a's snapshot records are on the topic too: b cannot count its own


def test_a_stopped_backfill_fails() -> None:
    # Debezium sends COMPLETED for a stopped snapshot, then ABORTED: neither is a success.
    with pytest.raises(SnapshotFailed, match="ended the incremental snapshot before it finished scanning"):
        _follow("c", "big")


def test_a_failed_scan_fails_the_backfill_with_its_status() -> None:
    with pytest.raises(SnapshotFailed, match="SQL_EXCEPTION"):
        _follow("d", "t")


def test_reconcile_reports_a_value_that_does_not_parse_instead_of_failing() -> None:
    from datetime import date

    from cdc_pipeline.control.reconcile import canonical, compare

    placeholder = "__debezium_unavailable_value"
    source = {(1,): {"id": 1, "amount": canonical("numeric", "1.50"), "doc": canonical("jsonb", '{"a": 1}')}}
    replica = {(1,): {"id": 1, "amount": canonical("numeric", placeholder), "doc": canonical("jsonb", placeholder)}}
    differences = compare(source, replica)
    assert list(differences.different) == [(1,)]
    assert set(differences.different[(1,)]) == {"amount", "doc"}
    # Dates beyond the replica's range compare as the stream stores them under the default clamp policy.
    assert canonical("date", date(1, 1, 1)) == canonical("date", date(1900, 1, 1))
    assert canonical("date", "infinity") == canonical("date", date(2299, 12, 31))

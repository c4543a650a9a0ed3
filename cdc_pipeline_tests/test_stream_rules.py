"""The stream sensors' rules (cdc_pipeline/control/stream_rules.py): consumer lag over a window and
checkpoint health, from made-up observations, and their cursors (typed, tolerant of old or broken JSON).
No Dagster, no stack."""

from __future__ import annotations

import json

from cdc_pipeline.control.checkpoint import CheckpointState
from cdc_pipeline.control.lag import LagSnapshot, PartitionLag
from cdc_pipeline.control.stream_rules import (
    CheckpointCursor,
    LagCursor,
    StreamObservation,
    lag_rule,
    stream_health,
)

STALL = 300.0


def snapshot(lag: int, committed: int, at: float = 0.0) -> LagSnapshot:
    return LagSnapshot(at, (PartitionLag("shop.public.orders", 0, committed + lag, committed, lag),))


def test_the_lag_window_keeps_its_newest_snapshots_and_alerts_when_stalled() -> None:
    window: list[dict[str, object]] = []
    verdicts = []
    for i in range(5):
        verdict, window = lag_rule(window, snapshot(100 + i, 10, at=i), threshold=50, size=3)
        verdicts.append(verdict.ok)
    assert verdicts == [True, True, False, False, False]  # fewer than `size` readings prove nothing
    assert [s["at"] for s in window] == [2, 3, 4]
    assert verdict.over_threshold and verdict.growing and verdict.stalled
    verdict, window = lag_rule(window, snapshot(0, 114, at=5), threshold=50, size=3)
    assert verdict.ok  # caught up once in the window


def test_the_lag_cursor_round_trips_and_tolerates_old_or_broken_json() -> None:
    cursor = LagCursor([{"at": 1.0, "total": 3, "committed": 7}], {"lag:shop": {"opened": 1.0}})
    assert LagCursor.parse(cursor.serialize()) == cursor
    for text in (None, "", "not json", "[1, 2]", '{"window": 3, "incidents": []}'):
        assert LagCursor.parse(text) == LagCursor()
    # An older cursor with extra keys and a malformed snapshot: the good parts are kept.
    old = json.dumps({"window": [{"total": 1, "committed": 2}, {"x": 1}, 5], "incidents": {}, "other": 1})
    assert LagCursor.parse(old).window == [{"total": 1, "committed": 2}]


def test_the_checkpoint_cursor_round_trips_and_tolerates_old_or_broken_json() -> None:
    cursor = CheckpointCursor({"checkpoint:shop": {}}, {"attempts": 1, "next_at": 60.0}, 42)
    assert CheckpointCursor.parse(cursor.serialize()) == cursor
    for text in (None, "", "{", '"text"', '{"committed": "12", "restart": 1}', '{"committed": true}'):
        assert CheckpointCursor.parse(text) == CheckpointCursor()
    assert CheckpointCursor.parse('{"incidents": {"a": 1}}') == CheckpointCursor({"a": 1}, {}, None)


def checkpoint(
    started: int | None = 5, committed: int | None = 5, pending_since: float | None = None, commit_at: float = 0.0
) -> CheckpointState:
    return CheckpointState(
        "/cp", True, True, last_started_batch=started, last_committed_batch=committed,
        last_commit_at=commit_at, pending_since=pending_since,
    )  # fmt: skip


def observe(**changes: object) -> StreamObservation:
    values: dict[str, object] = dict(
        now=1000.0, desired="running", running=True, pid=42, started_at=0.0, starting=False, location="/cp",
        checkpoint=checkpoint(commit_at=990.0), lag_total=0, committed=100,
    )  # fmt: skip
    values.update(changes)
    return StreamObservation(**values)  # type: ignore[arg-type]


def test_a_running_stream_that_commits_is_healthy() -> None:
    health = stream_health(observe(), 100, STALL, restart_enabled=True)
    assert health.problems == {} and not health.restart and not health.settling


def test_a_dead_stream_is_restarted_unless_a_start_is_under_way() -> None:
    health = stream_health(observe(running=False), None, STALL, restart_enabled=True)
    assert list(health.problems) == ["dead"] and "pid 42" in health.problems["dead"] and health.restart
    assert not stream_health(observe(running=False), None, STALL, restart_enabled=False).restart
    settling = stream_health(observe(running=False, starting=True), None, STALL, restart_enabled=True)
    assert settling.problems == {} and settling.settling and not settling.restart
    # A stopped stream that should be stopped is not dead.
    assert stream_health(observe(running=False, desired="stopped"), None, STALL, True).problems == {}


def test_a_batch_pending_too_long_is_stalled_counting_from_the_streams_start() -> None:
    stalled = observe(checkpoint=checkpoint(started=6, committed=5, pending_since=600.0))
    health = stream_health(stalled, 100, STALL, restart_enabled=True)
    assert list(health.problems) == ["stalled"] and "batch 6" in health.problems["stalled"] and health.restart
    # The stream started 200 s ago: its re-run of batch 6 has not been pending for long.
    assert stream_health(observe(checkpoint=stalled.checkpoint, started_at=800.0), 100, STALL, True).problems == {}


def test_no_progress_needs_waiting_messages_unmoved_offsets_and_an_old_commit() -> None:
    stuck = observe(lag_total=50, committed=100, checkpoint=checkpoint(commit_at=600.0))
    health = stream_health(stuck, 100, STALL, restart_enabled=True)
    assert list(health.problems) == ["no_progress"] and "50 messages wait" in health.problems["no_progress"]
    assert health.restart
    assert stream_health(stuck, 99, STALL, True).problems == {}  # the offsets moved since the last evaluation
    assert stream_health(observe(lag_total=0, committed=100), 100, STALL, True).problems == {}
    assert stream_health(observe(lag_total=None, committed=None), None, STALL, True).problems == {}  # no reading
    recent = observe(lag_total=50, committed=100, checkpoint=checkpoint(commit_at=900.0))
    assert stream_health(recent, 100, STALL, True).problems == {}


def test_an_unreadable_checkpoint_is_reported_and_never_restarted() -> None:
    broken = CheckpointState("/cp", True, False, error="bad offsets/7")
    health = stream_health(observe(running=False, checkpoint=broken), None, STALL, restart_enabled=True)
    assert list(health.problems) == ["dead", "unreadable"] and health.unreadable and not health.restart
    assert "bad offsets/7" in health.problems["unreadable"]
    # A checkpoint this process cannot list (s3a://) is no problem in itself.
    assert stream_health(observe(checkpoint=None), 100, STALL, True).problems == {}

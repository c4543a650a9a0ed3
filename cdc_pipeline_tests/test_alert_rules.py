"""The replication and check-failure alert rules (cdc_pipeline/control/rules.py): pure functions from
an observation and the rule's previous state to a verdict, so each case is one call."""

from __future__ import annotations

from cdc_pipeline.control.rules import (
    CheckOutcome,
    SlotObservation,
    connector_missing,
    connector_paused,
    connector_running,
    connector_state,
    failed_error_check,
    human_bytes,
    slot_retention,
)

GIB = 1 << 30


def slot(lsn: str | None = "0/1000", retained: int | None = 0, exists: bool = True) -> SlotObservation:
    return SlotObservation("cdc_shop", exists=exists, active=True, confirmed_flush_lsn=lsn, retained_bytes=retained)


def test_slot_retention_by_bytes() -> None:
    by_bytes, by_age, _ = slot_retention(slot(retained=GIB + 1), None, 100.0, max_bytes=GIB, max_age_s=3600)
    assert by_bytes.active and not by_age.active
    assert "1.0 GiB" in by_bytes.summary and by_bytes.details["retained_wal_bytes"] == GIB + 1
    by_bytes, _, _ = slot_retention(slot(retained=GIB), None, 100.0, max_bytes=GIB, max_age_s=3600)
    assert not by_bytes.active  # at the limit is within it


def test_slot_retention_by_age_counts_from_the_last_advance() -> None:
    state = None
    verdicts = []
    for now in (0.0, 1000.0, 3599.0, 3600.0):
        _, by_age, state = slot_retention(slot("0/1000", 5000), state, now, max_bytes=GIB, max_age_s=3600)
        verdicts.append(by_age.active)
    assert verdicts == [False, False, False, True]
    assert state == {"lsn": "0/1000", "since": 0.0}
    assert "has not advanced for 60 min" in by_age.summary
    # The slot advances: the clock starts again, and the incident clears.
    _, by_age, state = slot_retention(slot("0/2000", 5000), state, 3700.0, max_bytes=GIB, max_age_s=3600)
    assert not by_age.active and state == {"lsn": "0/2000", "since": 3700.0}


def test_an_idle_slot_at_the_current_position_is_not_stuck() -> None:
    state = None
    for now in (0.0, 10_000.0, 20_000.0):
        _, by_age, state = slot_retention(slot("0/1000", 0), state, now, max_bytes=GIB, max_age_s=3600)
        assert not by_age.active


def test_a_missing_slot_is_no_retention_incident() -> None:
    by_bytes, by_age, state = slot_retention(
        slot(None, None, exists=False), {"lsn": "0/1", "since": 0.0}, 9e9, max_bytes=1, max_age_s=1
    )
    assert not by_bytes.active and not by_age.active and state == {}


def test_connector_paused_for_longer_than_the_limit() -> None:
    verdict, since = connector_paused("PAUSED", None, 100.0, max_paused_s=600)
    assert not verdict.active and since == 100.0
    verdict, since = connector_paused("PAUSED", since, 699.0, max_paused_s=600)
    assert not verdict.active and since == 100.0
    verdict, since = connector_paused("PAUSED", since, 700.0, max_paused_s=600)
    assert verdict.active and "PAUSED for 10 min" in verdict.summary
    verdict, since = connector_paused("RUNNING", since, 800.0, max_paused_s=600)
    assert not verdict.active and since is None
    # A zero limit alerts at the first sight of a pause.
    assert connector_paused("PAUSED", None, 5.0, max_paused_s=0)[0].active


def test_connector_missing_after_the_grace_period() -> None:
    verdict, since = connector_missing(False, None, 10.0, grace_s=120)
    assert not verdict.active and since == 10.0
    verdict, since = connector_missing(False, since, 130.0, grace_s=120)
    assert verdict.active and "not in Kafka Connect" in verdict.summary
    verdict, since = connector_missing(True, since, 140.0, grace_s=120)
    assert not verdict.active and since is None
    assert connector_missing(False, None, 0.0, grace_s=0)[0].active


def test_failed_error_check() -> None:
    failed = CheckOutcome("shop/clickhouse/orders", "row_count_matches_source", False, "ERROR", "differs by 3")
    verdict = failed_error_check(failed)
    assert verdict is not None and verdict.active and "differs by 3" in verdict.summary
    passed = CheckOutcome("shop/clickhouse/orders", "row_count_matches_source", True, "ERROR")
    assert failed_error_check(passed) is not None and not failed_error_check(passed).active
    # A failed warning is shown in the UI, not paged; a check that never ran says nothing.
    assert failed_error_check(CheckOutcome("a", "freshness", False, "WARN")) is None
    assert failed_error_check(None) is None


def test_human_bytes() -> None:
    assert human_bytes(512) == "512 B"
    assert human_bytes(3 * 1024 * 1024) == "3.0 MiB"
    assert human_bytes(5 * GIB) == "5.0 GiB"


def connect_status(connector: str, *tasks: str) -> dict:
    return {"connector": {"state": connector}, "tasks": [{"id": i, "state": t} for i, t in enumerate(tasks)]}


def test_connector_running_needs_the_connector_and_every_task_running() -> None:
    assert connector_running(connect_status("RUNNING", "RUNNING", "RUNNING"))
    assert connector_state(connect_status("RUNNING", "RUNNING")) == "RUNNING"
    assert not connector_running(connect_status("RUNNING"))  # no task: nothing is captured
    assert connector_state(connect_status("RUNNING")) == "without tasks"
    assert not connector_running(connect_status("RUNNING", "RUNNING", "FAILED"))
    assert connector_state(connect_status("RUNNING", "RUNNING", "FAILED")) == "FAILED"
    assert connector_state(connect_status("PAUSED", "UNASSIGNED")) == "PAUSED/UNASSIGNED"

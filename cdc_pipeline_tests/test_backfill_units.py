"""The backfill's Dagster-free parts: waiting until the stream applied a snapshot
(control/backfill.py: wait_until_applied) on made-up lag readings and a fake clock, and the signal
lock's timeout (control/source.py: SignalLock.acquire) on a connection that never gets the lock.
Real PostgreSQL and Kafka: test_control_plane.py's backfill tests."""

from __future__ import annotations

from typing import Any

import pytest

from cdc_pipeline.control.backfill import NotApplied, partitions_behind, wait_until_applied
from cdc_pipeline.control.lag import LagSnapshot, PartitionLag
from cdc_pipeline.control.source import SignalLock, SignalLockTimeout

TOPIC = "shop.public.orders"


def reading(*committed: int | None, end: int = 100, other_topic_lag: int = 0) -> LagSnapshot:
    parts = [PartitionLag(TOPIC, i, end, c, end - (c or 0)) for i, c in enumerate(committed)]
    parts.append(PartitionLag("shop.public.customers", 0, 50, 50 - other_topic_lag, other_topic_lag))
    return LagSnapshot(0.0, tuple(parts))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_partitions_behind_compares_the_committed_offsets_with_the_snapshots_end() -> None:
    snapshot_end = {0: 40, 1: 60}
    assert [p.partition for p in partitions_behind(reading(39, 60), TOPIC, snapshot_end)] == [0]
    assert partitions_behind(reading(40, 70, other_topic_lag=9), TOPIC, snapshot_end) == []  # other topics don't count
    assert [p.partition for p in partitions_behind(reading(None, 60), TOPIC, snapshot_end)] == [0]  # never committed
    assert partitions_behind(reading(0, 0), TOPIC, {}) == []  # an empty snapshot


def test_wait_until_applied_returns_the_reading_that_covers_the_snapshot() -> None:
    readings = iter([reading(10, 10), reading(30, 50), reading(40, 60, other_topic_lag=5)])
    clock = FakeClock()
    lag = wait_until_applied(
        lambda: next(readings), TOPIC, {0: 40, 1: 60}, 60, poll_s=3, clock=clock, sleep=clock.sleep
    )
    assert lag.total == 60 + 40 + 5 and clock.sleeps == [3, 3]


def test_wait_until_applied_gives_up_after_the_timeout_with_the_lag() -> None:
    clock = FakeClock()
    with pytest.raises(NotApplied) as caught:
        wait_until_applied(lambda: reading(10), TOPIC, {0: 40}, 10, poll_s=3, clock=clock, sleep=clock.sleep)
    assert caught.value.lag.total == 90 and "after 10 s (lag 90)" in str(caught.value)
    assert "stream_status" in str(caught.value) and sum(clock.sleeps) == 12  # read at 0, 3, 6, 9, 12: past 10


class NeverLocked:
    """A connection on which pg_try_advisory_lock always answers false (another backfill holds it)."""

    def __init__(self) -> None:
        self.queries: list[str] = []

    def execute(self, query: str, params: Any = None) -> NeverLocked:
        self.queries.append(query)
        return self

    def fetchone(self) -> tuple[bool]:
        return (False,)


def test_the_signal_lock_fails_clearly_when_another_backfill_keeps_it() -> None:
    conn = NeverLocked()
    lock = SignalLock(conn, "shop")  # type: ignore[arg-type]
    notes: list[str] = []
    with pytest.raises(SignalLockTimeout, match="not taken by Debezium in 0 s: is the connector running"):
        lock.acquire(0.0, lambda: notes.append("waiting"))
    assert not lock.held and conn.queries and all("pg_try_advisory_lock" in q for q in conn.queries)
    lock.release()  # not held: nothing to unlock
    assert all("unlock" not in q for q in conn.queries)

"""Following an incremental snapshot (a backfill) to its end.

Debezium reports incremental snapshots on its notification topic (`notification.enabled.channels=sink`,
see connector.py): IN_PROGRESS per chunk, TABLE_SCAN_COMPLETED per table with the rows scanned and a
status, COMPLETED when its queue is empty, ABORTED after a stop-snapshot signal. The snapshot's rows
are `op: r` records with `source.snapshot = incremental` on the table's topic, interleaved with live
changes; their distinct keys against the rows expected are the progress shown to the operator.

What Debezium 3.7 does, as captured in cdc_pipeline_tests/data/debezium/incremental_snapshot_notifications.json:
- a signal that arrives while another snapshot runs is queued into the running one, and from then on
  every notification carries the newest signal's id; the first signal never gets its own COMPLETED;
- a stopped snapshot sends COMPLETED (with the stopped snapshot's id) and then ABORTED.
So our scan is found by position: when our signal is acknowledged (the first notification with its
id), its `data_collections` is the queue; if our table stands in it n times, the n-th
TABLE_SCAN_COMPLETED of our table from then on is ours. COMPLETED before that means it was stopped."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from cdc_pipeline.control.lag import LagSnapshot, PartitionLag

INCREMENTAL = "Incremental Snapshot"
SCAN_OK = ("SUCCEEDED", "EMPTY")  # EMPTY: the filter matched no row


class SnapshotFailed(RuntimeError):
    """Debezium aborted the snapshot or could not scan the table; the message says which and why."""


@dataclass
class SnapshotProgress:
    expected: int
    seen_keys: set[bytes] = field(default_factory=set)
    records: int = 0
    acknowledged: bool = False  # Debezium sent a notification with our signal's id
    scans_ahead: int = 0  # scans of our table still to complete before ours is done (ours included)
    merged: bool = False  # queued behind another scan of our table: its records are on our topic too
    completed: bool = False  # our table's scan completed
    chunk: tuple[int, int] | None = None  # (index, total) of the chunk being read, from IN_PROGRESS
    rows_scanned: int | None = None  # from TABLE_SCAN_COMPLETED of our table
    scan_status: str | None = None
    end_offsets: dict[int, int] = field(default_factory=dict)  # of the table topic once completed

    @property
    def seen(self) -> int:
        return len(self.seen_keys)

    @property
    def fraction(self) -> float:
        if self.completed or self.expected == 0:
            return 1.0
        return min(1.0, self.seen / self.expected)


def end_offsets(consumer: Consumer, topic: str, timeout: float = 10.0) -> dict[int, int]:
    """The next offset to be written to each partition of `topic` ({} if the topic does not exist)."""
    metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
    if metadata is None or metadata.error is not None:
        return {}
    return {
        pid: consumer.get_watermark_offsets(TopicPartition(topic, pid), timeout=timeout, cached=False)[1]
        for pid in metadata.partitions
    }


def _payload(value: bytes | None) -> dict[str, Any] | None:
    """The payload of a JSON record with or without the converter's schema envelope; None if not JSON."""
    if not value:
        return None
    try:
        document = json.loads(value)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    payload = document.get("payload", document)
    return payload if isinstance(payload, dict) else None


def apply_notification(progress: SnapshotProgress, notification: dict[str, Any], signal_id: str, table: str) -> None:
    """Update `progress` from one Debezium notification; SnapshotFailed if it says our scan failed or
    will not finish."""
    if notification.get("aggregate_type") != INCREMENTAL or progress.completed:
        return  # not a backfill's news, or ours is settled (a COMPLETED follows our scan)
    data = notification.get("additional_data") or {}
    queue = [c.strip() for c in (data.get("data_collections") or "").split(",") if c.strip()]
    if not progress.acknowledged:
        if notification.get("id") != signal_id:
            return  # an earlier snapshot's news
        progress.acknowledged = True
        progress.scans_ahead = max(1, queue.count(table))
        progress.merged = progress.scans_ahead > 1
    kind = notification.get("type")
    if kind == "IN_PROGRESS" and data.get("current_collection_in_progress") == table:
        with contextlib.suppress(KeyError, ValueError):  # older Debezium versions send no chunk numbers
            progress.chunk = (int(data["chunk_index"]), int(data["total_chunks"]))
    elif kind == "TABLE_SCAN_COMPLETED" and data.get("scanned_collection") == table:
        progress.scans_ahead -= 1
        if progress.scans_ahead > 0:
            return  # the scan of an earlier signal queued before ours
        progress.scan_status = data.get("status")
        progress.rows_scanned = int(data.get("total_rows_scanned") or 0)
        if progress.scan_status not in SCAN_OK:
            raise SnapshotFailed(
                f"Debezium's snapshot scan of {table} ended with status {progress.scan_status} "
                "(SQL_EXCEPTION: a bad filter condition, see the Kafka Connect log; NO_PRIMARY_KEY: give the table a "
                "primary key or primary_key in pipeline.yaml)"
            )
        progress.completed = True
    elif kind == "ABORTED" and (not queue or table in queue):
        raise SnapshotFailed(f"Debezium aborted the incremental snapshot of {table} (a stop-snapshot signal)")
    elif kind == "COMPLETED":
        raise SnapshotFailed(
            f"Debezium ended the incremental snapshot before it finished scanning {table} "
            "(a stop-snapshot signal?); run the backfill again"
        )


def _is_snapshot_record(value: bytes | None) -> bool:
    payload = _payload(value)
    if payload is None:
        return False
    return payload.get("op") == "r" and (payload.get("source") or {}).get("snapshot") == "incremental"


def follow_snapshot(
    consumer: Consumer,
    *,
    topic: str,
    notification_topic: str,
    start: dict[int, int],
    notification_start: dict[int, int],
    signal_id: str,
    table: str,
    expected: int,
    timeout: float,
    settle_s: float = 10.0,
    on_acknowledged: Callable[[], None] | None = None,
    on_progress: Callable[[SnapshotProgress], None] | None = None,
    report_every: float = 10.0,
) -> SnapshotProgress:
    """Read the table's topic from `start` and the notification topic from `notification_start` until
    Debezium reports our scan of `table` complete and its records are on the table's topic; then
    `end_offsets` (the table topic's, at that moment) cover the whole snapshot. SnapshotFailed if the
    scan failed or was stopped; TimeoutError after `timeout`.

    The notification can be readable before the last chunk's records are, so after it this waits
    until as many snapshot records as Debezium scanned arrived, or none for `settle_s`: rows changed
    while their chunk was read are dropped from the chunk by Debezium (the streamed change wins), so
    fewer records than rows scanned is normal under concurrent writes. When our scan was queued behind
    another of the same table, the records cannot be told apart: then only the quiet period counts.
    `on_acknowledged` is called once Debezium has taken our signal."""
    progress = SnapshotProgress(expected)
    consumer.assign(
        [TopicPartition(topic, pid, offset) for pid, offset in (start or {0: 0}).items()]
        + [TopicPartition(notification_topic, pid, offset) for pid, offset in (notification_start or {0: 0}).items()]
    )
    deadline = time.monotonic() + timeout
    last_report = 0.0
    last_record_at = completed_at = None
    while True:
        now = time.monotonic()
        if progress.completed:
            completed_at = completed_at or now
            quiet = now - max(completed_at, last_record_at or 0.0)
            counted = not progress.merged and progress.records >= (progress.rows_scanned or 0)
            if counted or quiet > settle_s:
                progress.end_offsets = end_offsets(consumer, topic)
                break
        if now > deadline:
            state = "never acknowledged (is the connector running?)" if not progress.acknowledged else "not complete"
            raise TimeoutError(
                f"the incremental snapshot of {table} (signal {signal_id}) is {state} after {timeout:.0f} s: "
                f"{progress.seen} of {expected} rows so far"
            )
        message = consumer.poll(1.0)
        if message is not None and message.error() is None:
            if message.topic() == notification_topic:
                notification = _payload(message.value())
                if notification is not None:
                    acknowledged = progress.acknowledged
                    apply_notification(progress, notification, signal_id, table)
                    if progress.acknowledged and not acknowledged and on_acknowledged:
                        on_acknowledged()
            elif _is_snapshot_record(message.value()):
                progress.seen_keys.add(message.key() or b"")
                progress.records += 1
                last_record_at = time.monotonic()
        if on_progress and (time.monotonic() - last_report > report_every):
            last_report = time.monotonic()
            on_progress(progress)
    if on_progress:
        on_progress(progress)
    return progress


class NotApplied(TimeoutError):
    """The snapshot is in Kafka but the stream has not applied it in time; `lag` is the newest reading."""

    def __init__(self, message: str, lag: LagSnapshot) -> None:
        super().__init__(message)
        self.lag = lag


def partitions_behind(lag: LagSnapshot, topic: str, end_offsets: Mapping[int, int]) -> list[PartitionLag]:
    """The partitions of `topic` whose committed offset has not reached the snapshot's end offset."""
    return [p for p in lag.partitions if p.topic == topic and (p.committed or 0) < end_offsets.get(p.partition, 0)]


def wait_until_applied(
    read_lag: Callable[[], LagSnapshot],
    topic: str,
    end_offsets: Mapping[int, int],
    timeout: float,
    poll_s: float = 3.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> LagSnapshot:
    """Read the stream's lag (`read_lag()`) until its committed offsets on `topic` reach `end_offsets` (a
    snapshot's, `SnapshotProgress.end_offsets`): the stream applied everything up to there. Returns that
    reading; NotApplied after `timeout` seconds."""
    deadline = clock() + timeout
    while True:
        lag = read_lag()
        if not partitions_behind(lag, topic, end_offsets):
            return lag
        if clock() > deadline:
            raise NotApplied(
                f"the stream has not applied it after {timeout:.0f} s (lag {lag.total}): is the stream running? "
                "(stream_status job)",
                lag,
            )
        sleep(poll_s)

"""Following an incremental snapshot (a backfill) on its Kafka topic: Debezium emits the table's
rows as `op: r` records whose `source.snapshot` is `incremental`, interleaved with live changes.
Progress is the number of distinct keys seen against the number of rows the snapshot covers; the
backfill is applied once the stream's consumer group has committed past the last snapshot record."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import Consumer, TopicPartition


@dataclass
class SnapshotProgress:
    expected: int
    seen_keys: set[bytes] = field(default_factory=set)
    records: int = 0
    last_offsets: dict[int, int] = field(default_factory=dict)  # partition -> offset of the last snapshot record
    started_at: float = field(default_factory=time.monotonic)
    last_record_at: float | None = None

    @property
    def seen(self) -> int:
        return len(self.seen_keys)

    @property
    def fraction(self) -> float:
        return 1.0 if self.expected == 0 else min(1.0, self.seen / self.expected)


def end_offsets(consumer: Consumer, topic: str, timeout: float = 10.0) -> dict[int, int]:
    """The next offset to be written to each partition of `topic` ({} if the topic does not exist)."""
    metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
    if metadata is None or metadata.error is not None:
        return {}
    return {
        pid: consumer.get_watermark_offsets(TopicPartition(topic, pid), timeout=timeout, cached=False)[1]
        for pid in metadata.partitions
    }


def follow_snapshot(
    consumer: Consumer,
    topic: str,
    start: dict[int, int],
    expected: int,
    *,
    timeout: float,
    idle_timeout: float = 120.0,
    on_progress: Callable[[SnapshotProgress], None] | None = None,
    report_every: float = 10.0,
) -> SnapshotProgress:
    """Read `topic` from `start` until every expected row was snapshotted, or (rows deleted while the
    snapshot ran) no snapshot record arrived for `idle_timeout` after the first one. TimeoutError
    after `timeout` with no completion."""
    progress = SnapshotProgress(expected)
    partitions = start or {0: 0}
    consumer.assign([TopicPartition(topic, pid, offset) for pid, offset in partitions.items()])
    deadline = time.monotonic() + timeout
    last_report = 0.0
    while progress.seen < expected:
        now = time.monotonic()
        if progress.last_record_at is not None and now - progress.last_record_at > idle_timeout:
            break
        if now > deadline:
            raise TimeoutError(
                f"the incremental snapshot of {topic} is not complete after {timeout:.0f} s: "
                f"{progress.seen} of {expected} rows; is the connector running (connector status sensor)?"
            )
        message = consumer.poll(1.0)
        if message is not None and message.error() is None and message.value():
            try:
                payload = json.loads(message.value())
                payload = payload.get("payload", payload)
                snapshot = (payload.get("source") or {}).get("snapshot")
            except (ValueError, AttributeError):
                snapshot = None
            if payload and isinstance(payload, dict) and payload.get("op") == "r" and snapshot == "incremental":
                progress.seen_keys.add(message.key() or b"")
                progress.records += 1
                progress.last_offsets[message.partition()] = message.offset()
                progress.last_record_at = time.monotonic()
        if on_progress and (time.monotonic() - last_report > report_every or progress.seen >= expected):
            last_report = time.monotonic()
            on_progress(progress)
    return progress

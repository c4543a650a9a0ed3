"""Consumer lag of the stream: Kafka end offsets against the offsets the stream committed to its
consumer group, per topic-partition and in total; and a Burrow-style evaluation over a sliding
window of snapshots, so a lag that stays high, keeps growing or stops moving raises an incident
while a brief spike does not."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

OFFSET_INVALID = -1001  # librdkafka: no committed offset


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    end_offset: int
    committed: int | None  # None: the group has not committed this partition yet
    lag: int


@dataclass(frozen=True)
class LagSnapshot:
    at: float  # epoch seconds
    partitions: tuple[PartitionLag, ...]

    @property
    def total(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def committed_total(self) -> int:
        return sum(p.committed or 0 for p in self.partitions)

    def by_topic(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for p in self.partitions:
            totals[p.topic] = totals.get(p.topic, 0) + p.lag
        return totals

    def to_json(self) -> dict[str, Any]:
        """The compact form kept in the sensor's window."""
        return {"at": self.at, "total": self.total, "committed": self.committed_total}


def measure_lag(consumer: Consumer, topics: Sequence[str], timeout: float = 10.0) -> LagSnapshot:
    """Lag of `consumer`'s group on `topics`. Topics that do not exist yet (no change captured) have
    no lag. A partition the group never committed counts from its low watermark."""
    import time

    metadata = consumer.list_topics(timeout=timeout)
    partitions = [
        TopicPartition(topic, pid)
        for topic in topics
        if topic in metadata.topics and metadata.topics[topic].error is None
        for pid in sorted(metadata.topics[topic].partitions)
    ]
    answers = consumer.committed(partitions, timeout=timeout) if partitions else []
    committed = {(tp.topic, tp.partition): tp.offset for tp in answers}
    result = []
    for tp in partitions:
        try:
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout, cached=False)
        except KafkaException as exc:
            raise RuntimeError(f"cannot read the end offset of {tp.topic}[{tp.partition}]: {exc}") from exc
        offset = committed.get((tp.topic, tp.partition), OFFSET_INVALID)
        has_commit = offset is not None and offset >= 0
        lag = max(0, high - (offset if has_commit else low))
        result.append(PartitionLag(tp.topic, tp.partition, high, offset if has_commit else None, lag))
    return LagSnapshot(time.time(), tuple(result))


@dataclass(frozen=True)
class LagVerdict:
    """The window's status: `ok`, or the reasons for an incident."""

    over_threshold: bool
    growing: bool
    stalled: bool
    window: int
    current: int

    @property
    def ok(self) -> bool:
        return not (self.over_threshold or self.growing or self.stalled)

    def reasons(self, threshold: int) -> list[str]:
        reasons = []
        if self.over_threshold:
            reasons.append(f"above {threshold} messages for {self.window} evaluations")
        if self.growing:
            reasons.append(f"grew at each of the last {self.window} evaluations")
        if self.stalled:
            reasons.append(f"the stream committed nothing for {self.window} evaluations while messages wait")
        return reasons

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_window(window: Sequence[dict[str, Any]], threshold: int, size: int) -> LagVerdict:
    """Burrow's rules over the last `size` snapshots (`LagSnapshot.to_json()`, oldest first):
    - any snapshot with zero lag means the consumer caught up in the window: ok;
    - lag above `threshold` in every snapshot: over threshold;
    - lag strictly growing from first to last, never shrinking: growing;
    - committed offsets unchanged while lag is positive: stalled.
    Fewer than `size` snapshots never open an incident (a single reading proves nothing)."""
    recent = list(window)[-size:]
    current = recent[-1]["total"] if recent else 0
    if len(recent) < size or any(s["total"] == 0 for s in recent):
        return LagVerdict(False, False, False, len(recent), current)
    totals = [s["total"] for s in recent]
    committed = [s["committed"] for s in recent]
    over = all(t > threshold for t in totals)
    growing = all(b >= a for a, b in zip(totals, totals[1:], strict=False)) and totals[-1] > totals[0]
    stalled = len(set(committed)) == 1
    return LagVerdict(over, growing, stalled, len(recent), current)

"""The offset range a replay re-applies, from offsets or a time window of a table's topic (partition
0: a table's topic has one partition, see topics.py). Dagster-free: the replay job asks, then runs
control/replay_runner.py."""

from __future__ import annotations

from datetime import UTC, datetime

from confluent_kafka import Consumer, TopicPartition


class ReplayRangeError(ValueError):
    """The requested range cannot be replayed (its start is gone, or no start was given)."""


def offset_for_time(consumer: Consumer, topic: str, partition: int, when: str, default: int) -> int:
    """The first offset at or after ISO 8601 time `when` (naive: UTC), else `default` (nothing that late)."""
    moment = datetime.fromisoformat(when)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    found = consumer.offsets_for_times([TopicPartition(topic, partition, int(moment.timestamp() * 1000))], timeout=10)
    return int(found[0].offset) if found and found[0].offset >= 0 else default


def replay_range(
    consumer: Consumer,
    topic: str,
    start_offset: int | None = None,
    end_offset: int | None = None,
    start_time: str | None = None,
    end_time: str | None = None,
) -> tuple[int, int]:
    """[start, end) of partition 0 of `topic`, from offsets or a time window; the end defaults to, and
    is capped at, the topic's current end. ReplayRangeError if the start is gone (retention)."""
    low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10, cached=False)
    if start_time is not None:
        start = offset_for_time(consumer, topic, 0, start_time, high)
        end = offset_for_time(consumer, topic, 0, end_time, high) if end_time else high
    elif start_offset is not None:
        start = start_offset
        end = end_offset if end_offset is not None else high
    else:
        raise ReplayRangeError("give exactly one of start_offset or start_time")
    if start < low:
        raise ReplayRangeError(
            f"offset {start} of {topic} is gone (retention); the earliest is {low}: backfill instead"
        )
    return start, min(end, high)

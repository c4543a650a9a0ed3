"""How many Kafka records one micro-batch may read, bounded by bytes as well as by count.

Spark's Kafka source (4.0) limits a micro-batch by offsets only (`maxOffsetsPerTrigger`; it has no
`maxBytesPerTrigger`), and the heap a batch needs grows with its bytes, not its record count: 200,000
records of a narrow table fit where 20,000 of a wide one do not. So the stream bounds each batch by
bytes too, when it starts:

* the **byte budget** of a batch is `stream.max_bytes_per_trigger` when set, else the smaller heap the
  batch runs in (the driver's; with a cluster master also an executor's), less the 300 MiB Spark
  reserves for itself (`RESERVED_HEAP_BYTES`), divided by `HEAP_PER_RECORD_BYTE`, the heap a batch
  needs per byte of its Kafka records at its peak;
* the **record size** is sampled from the end of each subscribed topic (the largest per-topic mean:
  a batch may come from one topic alone), or `ASSUMED_RECORD_BYTES` while no topic holds a record;
* the source reads at most `min(max_offsets_per_trigger, budget / record size)` offsets per batch
  (never fewer than `MIN_OFFSETS_PER_TRIGGER`).

The limit is fixed for the life of the query (Spark reads it once): a stream started before its topics
hold records, or whose rows have since grown much wider, re-derives it at its next start.

Only confluent-kafka and the standard library here, so the derivation is testable without Spark.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# The heap one micro-batch needs, at its peak, per byte of the Kafka records it reads (key + value): the
# source rows, the decoded envelope, the changes kept per key and the insert payload, with the JVM's and
# the driver's copies (README: Memory).
HEAP_PER_RECORD_BYTE = 8
# What Spark keeps for itself before any batch (its RESERVED_SYSTEM_MEMORY_BYTES): a 128 MiB heap runs
# out on a 16 MiB batch.
RESERVED_HEAP_BYTES = 300 << 20
# Record size assumed while no subscribed topic holds a record yet (a Debezium JSON change event with its
# schema is 2-25 KiB for 5-50 columns).
ASSUMED_RECORD_BYTES = 8 << 10
# What Spark's Kafka source adds to each record's key and value in a row (topic, partition, offset,
# timestamp, type), in bytes.
ROW_OVERHEAD_BYTES = 96
# A batch always reads at least this many records, whatever their size.
MIN_OFFSETS_PER_TRIGGER = 100
# Records read from the end of each topic to measure its record size.
SAMPLE_RECORDS = 200

_SPARK_MEMORY = re.compile(r"^\s*(\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_SPARK_MEMORY_UNITS = {
    "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "p": 1 << 50, "pb": 1 << 50,
}  # fmt: skip


def spark_memory_bytes(value: str, default_unit: str = "m") -> int:
    """Bytes of a Spark memory setting (`1g`, `512m`, `2048`: MiB when no unit, as `spark.*.memory`)."""
    match = _SPARK_MEMORY.match(value)
    unit = (match.group(2) or default_unit).lower() if match else ""
    if match is None or unit not in _SPARK_MEMORY_UNITS:
        raise ValueError(f"not a Spark memory size: {value!r} (e.g. 512m, 1g)")
    return int(match.group(1)) * _SPARK_MEMORY_UNITS[unit]


def format_bytes(value: float) -> str:
    """`value` bytes in binary units, e.g. `1.0 GiB`, `8.0 KiB`."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def batch_heap_bytes(driver_heap: int, *, local_master: bool, executor_memory: str | None) -> int:
    """The heap one micro-batch runs in: the driver JVM's (with a local master the executors are in it);
    with a cluster master also an executor's (`spark.executor.memory`, Spark's default 1g), whichever is
    smaller."""
    if local_master:
        return driver_heap
    return min(driver_heap, spark_memory_bytes(executor_memory or "1g"))


@dataclass(frozen=True)
class TriggerLimit:
    """The offsets a micro-batch reads, and why."""

    max_offsets: int
    configured_offsets: int
    max_bytes: int
    record_bytes: int
    record_bytes_from: str
    heap_bytes: int
    explicit_max_bytes: bool

    @property
    def needed_heap_bytes(self) -> int:
        """The heap a batch of `max_offsets` records of `record_bytes` needs, by the estimate."""
        return RESERVED_HEAP_BYTES + self.max_offsets * self.record_bytes * HEAP_PER_RECORD_BYTE

    def describe(self) -> str:
        """One log line: the limit, and the budget and record size it comes from."""
        budget = (
            "stream.max_bytes_per_trigger"
            if self.explicit_max_bytes
            else f"(heap - {format_bytes(RESERVED_HEAP_BYTES)}) / {HEAP_PER_RECORD_BYTE}"
        )
        if self.max_offsets < self.configured_offsets:
            verb = f"bounded from max_offsets_per_trigger {self.configured_offsets:,} by"
        else:
            verb = "max_offsets_per_trigger, within"
        return (
            f"{self.max_offsets:,} offsets per trigger ({verb} a budget of {format_bytes(self.max_bytes)} per "
            f"batch: {budget}, heap {format_bytes(self.heap_bytes)}; {format_bytes(self.record_bytes)} per record, "
            f"{self.record_bytes_from})"
        )


def derive_trigger_limit(
    configured_offsets: int,
    *,
    heap_bytes: int,
    record_bytes: float | None,
    record_bytes_from: str = "sampled",
    max_bytes: int | None = None,
) -> TriggerLimit:
    """The offsets per trigger that keep a batch's records within the byte budget (see the module doc).
    `record_bytes` None: no record to measure yet, `ASSUMED_RECORD_BYTES` stands in."""
    if record_bytes is None or record_bytes <= 0:
        size, origin = ASSUMED_RECORD_BYTES + ROW_OVERHEAD_BYTES, "assumed: no record in the topics yet"
    else:
        size, origin = int(record_bytes) + ROW_OVERHEAD_BYTES, record_bytes_from
    budget = max_bytes if max_bytes is not None else max(heap_bytes - RESERVED_HEAP_BYTES, 0) // HEAP_PER_RECORD_BYTE
    by_bytes = max(budget // size, MIN_OFFSETS_PER_TRIGGER)
    return TriggerLimit(
        max_offsets=min(configured_offsets, by_bytes),
        configured_offsets=configured_offsets,
        max_bytes=budget,
        record_bytes=size,
        record_bytes_from=origin,
        heap_bytes=heap_bytes,
        explicit_max_bytes=max_bytes is not None,
    )


def over_budget_warning(limit: TriggerLimit) -> str | None:
    """A warning when an explicit `max_bytes_per_trigger` lets a batch need more heap than there is."""
    if not limit.explicit_max_bytes or limit.needed_heap_bytes <= limit.heap_bytes:
        return None
    return (
        f"stream.max_bytes_per_trigger {format_bytes(limit.max_bytes)} lets a batch of {limit.max_offsets:,} records "
        f"need about {format_bytes(limit.needed_heap_bytes)} of heap, more than the "
        f"{format_bytes(limit.heap_bytes)} it has: an OutOfMemoryError would end the stream. Raise the driver memory "
        f"(`cdc-pipeline stream run --driver-memory`, the spark resource's driver_memory) to at least "
        f"{format_bytes(limit.needed_heap_bytes)}, or remove max_bytes_per_trigger to derive it from the heap"
    )


def largest_mean(sizes: Mapping[str, float]) -> tuple[float | None, str]:
    """The largest per-topic mean record size, and where it was measured."""
    if not sizes:
        return None, "assumed"
    topic = max(sizes, key=lambda t: sizes[t])
    return sizes[topic], f"mean of the last records of {topic}"


def sample_record_bytes(
    consumer_conf: Mapping[str, Any],
    topics: Iterable[str],
    *,
    per_partition: int = SAMPLE_RECORDS,
    timeout_s: float = 30,
) -> dict[str, float]:
    """Mean key + value bytes of the last `per_partition` records of each partition of `topics`, by topic;
    topics without records are left out. Reads with a throwaway group and commits nothing."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition  # noqa: PLC0415 - only the stream samples

    consumer = Consumer(
        {
            **consumer_conf,
            "group.id": f"cdc-record-size-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        assignments: list[TopicPartition] = []
        remaining: dict[tuple[str, int], int] = {}
        for topic in topics:
            metadata = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
            if metadata is None or metadata.error is not None:
                continue
            for partition in metadata.partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout_s)
                if high > low:
                    start = max(low, high - per_partition)
                    assignments.append(TopicPartition(topic, partition, start))
                    remaining[(topic, partition)] = high
        if not assignments:
            return {}
        consumer.assign(assignments)
        totals: dict[str, list[int]] = {}
        deadline = time.monotonic() + timeout_s
        while remaining and time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is None:
                continue
            key = (str(message.topic()), int(message.partition() or 0))
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:  # noqa: SLF001 - librdkafka's name
                    remaining.pop(key, None)
                continue
            size = len(message.key() or b"") + len(message.value() or b"")
            count_and_bytes = totals.setdefault(key[0], [0, 0])
            count_and_bytes[0] += 1
            count_and_bytes[1] += size
            if int(message.offset() or 0) + 1 >= remaining.get(key, 0):
                remaining.pop(key, None)
        return {topic: total / count for topic, (count, total) in totals.items() if count}
    finally:
        consumer.close()

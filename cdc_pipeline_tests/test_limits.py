"""The byte bound of a micro-batch (cdc_pipeline/streaming/limits.py): the derivation as pure logic, the
record-size sampling against the real Kafka."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from cdc_pipeline.config import PipelineConfigError, parse_pipeline_config
from cdc_pipeline.settings import Settings
from cdc_pipeline.stack.lifecycle import LocalStack
from cdc_pipeline.streaming.limits import (
    ASSUMED_RECORD_BYTES,
    HEAP_PER_RECORD_BYTE,
    MIN_OFFSETS_PER_TRIGGER,
    RESERVED_HEAP_BYTES,
    ROW_OVERHEAD_BYTES,
    batch_heap_bytes,
    derive_trigger_limit,
    largest_mean,
    over_budget_warning,
    sample_record_bytes,
    spark_memory_bytes,
)

GIB = 1 << 30
MIB = 1 << 20


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1g", GIB), ("512m", 512 * MIB), ("2048", 2 * GIB), ("1024k", MIB), ("4GB", 4 * GIB), (" 1G ", GIB)],
)
def test_spark_memory_sizes_parse_like_spark(value: str, expected: int) -> None:
    assert spark_memory_bytes(value) == expected


@pytest.mark.parametrize("value", ["", "g", "1.5g", "1 gib", "-1g"])
def test_a_bad_spark_memory_size_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="not a Spark memory size"):
        spark_memory_bytes(value)


def test_the_batch_runs_in_the_driver_heap_locally_and_the_smaller_heap_on_a_cluster() -> None:
    assert batch_heap_bytes(GIB, local_master=True, executor_memory="512m") == GIB
    assert batch_heap_bytes(GIB, local_master=False, executor_memory="512m") == 512 * MIB
    assert batch_heap_bytes(GIB, local_master=False, executor_memory="4g") == GIB
    assert batch_heap_bytes(2 * GIB, local_master=False, executor_memory=None) == GIB  # Spark's default 1g


def test_200k_offsets_of_wide_records_are_bounded_to_what_the_heap_holds() -> None:
    limit = derive_trigger_limit(200_000, heap_bytes=GIB, record_bytes=5_000 - ROW_OVERHEAD_BYTES)
    assert limit.max_bytes == (GIB - RESERVED_HEAP_BYTES) // HEAP_PER_RECORD_BYTE
    assert limit.max_offsets == (GIB - RESERVED_HEAP_BYTES) // HEAP_PER_RECORD_BYTE // 5_000
    assert limit.needed_heap_bytes <= GIB
    assert "bounded from max_offsets_per_trigger 200,000" in limit.describe()
    assert over_budget_warning(limit) is None


def test_a_limit_within_the_budget_is_kept() -> None:
    limit = derive_trigger_limit(10_000, heap_bytes=GIB, record_bytes=1_000)
    assert limit.max_offsets == 10_000
    assert "max_offsets_per_trigger, within" in limit.describe()


def test_the_bound_scales_with_the_heap_and_the_record_size() -> None:
    small = derive_trigger_limit(10**9, heap_bytes=GIB, record_bytes=2_000)
    big = derive_trigger_limit(10**9, heap_bytes=4 * GIB, record_bytes=2_000)
    assert big.max_offsets == pytest.approx(
        small.max_offsets * (4 * GIB - RESERVED_HEAP_BYTES) / (GIB - RESERVED_HEAP_BYTES), rel=0.01
    )
    assert derive_trigger_limit(10**9, heap_bytes=GIB, record_bytes=4_000 + ROW_OVERHEAD_BYTES).max_offsets < (
        small.max_offsets / 1.9
    )


def test_empty_topics_assume_a_record_size() -> None:
    limit = derive_trigger_limit(200_000, heap_bytes=GIB, record_bytes=None)
    assert limit.record_bytes == ASSUMED_RECORD_BYTES + ROW_OVERHEAD_BYTES
    assert "assumed" in limit.describe()
    assert limit.needed_heap_bytes <= GIB


def test_a_batch_always_reads_some_records() -> None:
    limit = derive_trigger_limit(200_000, heap_bytes=GIB, record_bytes=50 * MIB)
    assert limit.max_offsets == MIN_OFFSETS_PER_TRIGGER
    assert derive_trigger_limit(10, heap_bytes=GIB, record_bytes=50 * MIB).max_offsets == 10
    # A heap below what Spark reserves for itself leaves no budget: the minimum still makes progress.
    assert derive_trigger_limit(200_000, heap_bytes=128 * MIB, record_bytes=100).max_offsets == MIN_OFFSETS_PER_TRIGGER


def test_an_explicit_byte_budget_is_used_and_warned_about_when_the_heap_cannot_hold_it() -> None:
    fits = derive_trigger_limit(200_000, heap_bytes=GIB, record_bytes=1_000, max_bytes=64 * MIB)
    assert fits.max_bytes == 64 * MIB and fits.explicit_max_bytes
    assert fits.max_offsets == 64 * MIB // (1_000 + ROW_OVERHEAD_BYTES)
    assert over_budget_warning(fits) is None
    too_big = derive_trigger_limit(200_000, heap_bytes=GIB, record_bytes=10_000, max_bytes=2 * GIB)
    warning = over_budget_warning(too_big)
    assert warning is not None
    assert "stream.max_bytes_per_trigger 2.0 GiB" in warning and "--driver-memory" in warning


def test_the_largest_topic_mean_wins() -> None:
    assert largest_mean({}) == (None, "assumed")
    size, origin = largest_mean({"a.public.narrow": 800.0, "a.public.wide": 9_000.0})
    assert size == 9_000.0 and "a.public.wide" in origin


def _config(**stream: Any) -> dict[str, Any]:
    return {"name": "shop", "tables": [{"name": "public.customers"}], "stream": stream}


def test_max_bytes_per_trigger_takes_sizes_with_units() -> None:
    assert parse_pipeline_config(_config()).stream.max_bytes_per_trigger is None
    assert parse_pipeline_config(_config(max_bytes_per_trigger="64MiB")).stream.max_bytes_per_trigger == 64 * MIB
    assert parse_pipeline_config(_config(max_bytes_per_trigger=1000)).stream.max_bytes_per_trigger == 1000
    with pytest.raises(PipelineConfigError, match="stream.max_bytes_per_trigger"):
        parse_pipeline_config(_config(max_bytes_per_trigger="lots"))
    with pytest.raises(PipelineConfigError, match="stream.max_bytes_per_trigger"):
        parse_pipeline_config(_config(max_bytes_per_trigger=0))


@pytest.mark.integration
def test_record_sizes_are_sampled_from_the_end_of_each_topic(
    settings: Settings, local_stack: LocalStack, unique_name: str
) -> None:
    conf = {"bootstrap.servers": settings.kafka_bootstrap_servers}
    narrow, wide, empty = (f"{unique_name}.{kind}" for kind in ("narrow", "wide", "empty"))
    admin = AdminClient(conf)
    for future in admin.create_topics([NewTopic(t, 1, 1) for t in (narrow, wide, empty)]).values():
        future.result(60)
    producer = Producer(conf)
    # The first records of `wide` are small: only the end of a topic counts.
    for i in range(300):
        producer.produce(narrow, key=b"k%03d" % i, value=b"n" * 96)
        producer.produce(wide, key=b"k%03d" % i, value=b"w" * (10 if i < 100 else 1996))
    producer.produce(wide, key=b"tomb")  # a tombstone counts its key
    assert producer.flush(60) == 0
    try:
        sizes = sample_record_bytes(conf, [narrow, wide, empty, f"{unique_name}.missing"], per_partition=200)
        assert set(sizes) == {narrow, wide}
        assert sizes[narrow] == 100
        assert sizes[wide] == pytest.approx((199 * 2000 + 4) / 200)
        assert largest_mean(sizes)[0] == sizes[wide]
    finally:
        for future in admin.delete_topics([narrow, wide, empty]).values():
            future.result(60)

"""The driver's view of a decoded micro-batch (pure pyarrow): dead letters, truncates, the last change per
key by source position, schema uses and row history. No Spark."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from cdc_pipeline.streaming.batch import (
    DECODED_COLUMNS,
    Change,
    DecodedBatch,
    anchor_positions,
    initial_snapshot_ends,
    interrupted_before,
    positions,
    snapshot_ends,
    snapshot_points,
    unanchored_topics,
)

TOPIC = "shop.public.customers"
SCHEMA = pa.schema(
    [
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("op", pa.string()),
        ("commit_lsn", pa.int64()),
        ("change_lsn", pa.int64()),
        ("key_json", pa.string()),
        ("after_json", pa.string()),
        ("before_json", pa.string()),
        ("value_schema_id", pa.int64()),
        ("key_schema_id", pa.int64()),
        ("source_ts_ms", pa.int64()),
        ("error", pa.string()),
    ]
)


def record(offset: int, op: str | None, key: int | None, commit: int, change: int, **extra: Any) -> dict[str, Any]:
    row = dict.fromkeys(DECODED_COLUMNS)
    row.update(
        topic=TOPIC, partition=0, offset=offset, op=op, commit_lsn=commit, change_lsn=change,
        key_json=None if key is None else f'{{"id":{key}}}', after_json=f'{{"v":{offset}}}' if op != "d" else None,
        value_schema_id=1, key_schema_id=2, source_ts_ms=1000 + offset,
    )  # fmt: skip
    row.update(extra)
    return row


def batch(*records: dict[str, Any]) -> DecodedBatch:
    return DecodedBatch.of(pa.Table.from_pylist(list(records), schema=SCHEMA))


def test_latest_change_per_key_is_by_source_position_not_offset() -> None:
    found = batch(
        record(0, "u", 1, 300, 150),  # began first, committed last: wins
        record(1, "u", 1, 200, 190),
        record(2, "c", 2, 210, 205),
        record(3, "d", 2, 220, 215),
        record(4, "r", 3, 50, 0),
    )
    latest = {c.key_json: c for c in found.latest_by_topic()[TOPIC]}
    assert {k: c.offset for k, c in latest.items()} == {'{"id":1}': 0, '{"id":2}': 3, '{"id":3}': 4}
    assert isinstance(latest['{"id":1}'], Change) and latest['{"id":2}'].op == "d"


def test_exact_position_ties_break_by_partition_then_offset() -> None:
    found = batch(record(7, "u", 1, 100, 5), record(9, "u", 1, 100, 5), record(8, "u", 1, 100, 5))
    assert [c.offset for c in found.latest_by_topic()[TOPIC]] == [9]


def test_errors_truncates_and_tombstone_free_rows_are_split() -> None:
    found = batch(
        record(0, "c", 1, 100, 100),
        record(1, None, None, None, None, error="malformed message"),
        record(2, "t", None, 200, 200),
        record(3, "c", 2, 300, 300),
        record(4, "t", None, 150, 150),  # an older truncate: the last by position counts
        {**record(5, "c", 9, 100, 100), "topic": "shop.public.products"},
    )
    assert [(c.offset, c.error) for c in found.errors] == [(1, "malformed message")]
    assert found.truncates == {TOPIC: (200, 200)}
    kept = {(c.topic, c.key_json) for cs in found.latest_by_topic().values() for c in cs}
    assert kept == {(TOPIC, '{"id":2}'), ("shop.public.products", '{"id":9}')}


def test_a_change_in_the_truncates_transaction_after_it_survives() -> None:
    found = batch(record(0, "t", None, 200, 200), record(1, "c", 1, 200, 201), record(2, "c", 2, 200, 199))
    assert [c.key_json for c in found.latest_by_topic()[TOPIC]] == ['{"id":1}']


def test_history_is_newest_first_and_after_the_truncate() -> None:
    found = batch(
        record(0, "c", 1, 50, 50),
        record(1, "t", None, 60, 60),
        record(2, "c", 1, 100, 100),
        record(3, "u", 1, 200, 200),
        record(4, "u", 2, 210, 210),
    )
    history = found.history(TOPIC, {'{"id":1}'})
    assert list(history) == ['{"id":1}'] and [c.offset for c in history['{"id":1}']] == [3, 2]
    assert found.history(TOPIC, set()) == {} and found.history("other", {'{"id":1}'}) == {}


def test_schema_uses_name_the_first_record_of_each_schema_in_order() -> None:
    found = batch(
        record(5, "c", 1, 100, 100, value_schema_id=11),
        record(3, "c", 2, 90, 90, value_schema_id=11),
        record(8, "c", 3, 110, 110, value_schema_id=12),
        record(9, "c", 4, 120, 120, value_schema_id=11, key_schema_id=42),
        record(10, None, None, None, None, value_schema_id=99, error="bad"),  # dead letters have no use
    )
    assert [(u.value_schema_id, u.key_schema_id, u.offset) for u in found.schema_uses] == [
        (11, 2, 3),
        (12, 2, 8),
        (11, 42, 9),
    ]


def test_an_empty_batch() -> None:
    found = batch()
    assert (found.errors, found.truncates, found.schema_uses, found.latest_by_topic()) == ([], {}, [], {})


def test_positions_keep_order_without_repeats() -> None:
    records = [Change(TOPIC, 0, o, *([None] * 10)) for o in (3, 1, 3)]
    assert positions(records) == [(TOPIC, 0, 3), (TOPIC, 0, 1)]


ANCHORED_SCHEMA = SCHEMA.append(pa.field("snapshot_lsn", pa.int64())).append(pa.field("unanchored", pa.bool_()))


def anchored_table(*records: dict[str, Any]) -> pa.Table:
    rows = [{"snapshot_lsn": None, "unanchored": False, **r} for r in records]
    return pa.Table.from_pylist(rows, schema=ANCHORED_SCHEMA)


def test_snapshot_points_and_unanchored_topics_come_from_valid_changes_only() -> None:
    table = anchored_table(
        record(0, "r", 1, 100, 0, snapshot_lsn=100),
        record(1, "r", 2, 100, 0, snapshot_lsn=100),
        record(2, "r", 3, 200, 0, snapshot_lsn=200, partition=1),
        record(3, "r", 4, 300, 0, snapshot_lsn=300, error="bad"),
        record(4, "u", 1, 90, 90, unanchored=True, topic="other", error="bad"),
    )
    assert snapshot_points(table) == [(TOPIC, 0, 0, 100), (TOPIC, 1, 2, 200)]
    assert unanchored_topics(table) == []
    assert unanchored_topics(anchored_table(record(5, "u", 1, 90, 90, unanchored=True))) == [TOPIC]


def test_snapshot_ends_are_valid_last_rows_and_absent_without_the_column() -> None:
    schema = ANCHORED_SCHEMA.append(pa.field("snapshot_end", pa.bool_()))
    rows = [
        {"snapshot_lsn": None, "unanchored": False, "snapshot_end": None, **r}
        for r in (
            record(0, "r", 1, 100, 0, snapshot_lsn=100),
            record(1, "r", 2, 100, 0, snapshot_lsn=100, snapshot_end=True),
            record(2, "r", 3, 200, 0, snapshot_lsn=200, snapshot_end=True, error="bad"),
        )
    ]
    assert snapshot_ends(pa.Table.from_pylist(rows, schema=schema)) == [(TOPIC, 0, 1, 100)]
    assert snapshot_ends(anchored_table(record(0, "r", 1, 100, 0, snapshot_lsn=100))) == []


def test_initial_snapshot_ends_are_those_whose_rows_have_no_previous_commit() -> None:
    schema = ANCHORED_SCHEMA.append(pa.field("snapshot_end", pa.bool_()))
    schema = schema.append(pa.field("snapshot_initial", pa.bool_()))
    rows = [
        {"snapshot_lsn": None, "unanchored": False, "snapshot_end": None, "snapshot_initial": None, **r}
        for r in (
            record(0, "r", 1, 100, 0, snapshot_lsn=100, snapshot_end=True, snapshot_initial=True),
            record(1, "r", 2, 200, 0, snapshot_lsn=200, snapshot_end=True, snapshot_initial=False),  # blocking
            record(2, "r", 3, 300, 0, snapshot_lsn=300, snapshot_initial=True),  # not the last row
        )
    ]
    table = pa.Table.from_pylist(rows, schema=schema)
    assert initial_snapshot_ends(table) == {(TOPIC, 0, 100)}
    assert snapshot_ends(table) == [(TOPIC, 0, 0, 100), (TOPIC, 0, 1, 200)]
    assert initial_snapshot_ends(table.drop_columns(["snapshot_initial"])) == set()


def test_a_snapshot_is_interrupted_when_the_one_before_it_never_ended() -> None:
    starts = [(0, 100), (27, 200), (300, 400)]
    assert interrupted_before(starts, set(), 27) == 100  # 100 started at 0 and never ended
    assert interrupted_before(starts, {100}, 27) is None
    assert interrupted_before(starts, {100}, 300) == 200  # only the snapshot right before counts
    assert interrupted_before(starts, {200}, 300) is None
    assert interrupted_before(starts, set(), 0) is None  # the first snapshot of the topic
    # An initial snapshot (the connector started without offsets) after a complete one: streamed deletes in
    # between may be lost; the first snapshot of a topic still has nothing before it.
    assert interrupted_before(starts, {100, 200}, 300, initial=True) == 200
    assert interrupted_before(starts, set(), 0, initial=True) is None


def test_anchoring_moves_a_truncate_before_the_batch_decides_what_it_wipes() -> None:
    # Snapshot at LSN 100; the first streamed transaction (no previous commit) truncates at LSN 90 and
    # then inserts at 95: anchored, the truncate wipes the snapshot row and the insert survives.
    table = anchored_table(
        record(0, "r", 1, 100, 0, snapshot_lsn=100),
        record(1, "t", None, 90, 90, unanchored=True),
        record(2, "c", 2, 95, 95, unanchored=True),
        record(3, "c", 3, None, 96, unanchored=True, error="invalid source position"),  # dead letter: untouched
    )
    assert DecodedBatch.of(table).truncates == {TOPIC: (90, 90)}
    found = DecodedBatch.of(anchor_positions(table, {(TOPIC, 0): [(0, 100)]}))
    assert found.truncates == {TOPIC: (100, 90)}
    assert [(c.key_json, c.commit_lsn, c.change_lsn) for c in found.latest_by_topic()[TOPIC]] == [('{"id":2}', 100, 95)]
    assert [e.commit_lsn for e in found.errors] == [None]

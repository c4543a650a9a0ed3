"""Given Debezium records as Kafka delivers them, decoding classifies them, and ordering keeps the last
change per primary key by source position (never by arrival order)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from cdc_pipeline.streaming.batch import (
    DECODED_COLUMNS,
    Change,
    DecodedBatch,
    anchor_positions,
    snapshot_points,
    unanchored_topics,
)
from cdc_pipeline.streaming.envelope import decode_envelope, offset_ranges, version

TOPIC = "shop.public.customers"


def envelope(
    op: str | None, key: int | None, name: str | None, commit: int | None, change: int, snapshot: str | None = None
) -> tuple[bytes | None, bytes]:
    """A Debezium record; `commit` None: the first transaction after a connector start (no previous commit)."""
    first = None if commit is None else str(commit)
    source = {"lsn": change, "sequence": json.dumps([first, str(change)]), "ts_ms": 1_700_000_000_000 + change}
    if snapshot is not None:
        source["snapshot"] = snapshot
    after = None if op in ("d", "t") else {"id": key, "name": name}
    value = {"schema": {}, "payload": {"op": op, "before": None, "after": after, "source": source}}
    key_bytes = None if key is None else json.dumps({"schema": {}, "payload": {"id": key}}).encode()
    return key_bytes, json.dumps(value).encode()


def kafka_rows(spark: SparkSession, records: list[tuple[bytes | None, bytes | None]], topic: str = TOPIC):  # noqa: ANN201
    rows = [(key, value, topic, 0, offset) for offset, (key, value) in enumerate(records)]
    return spark.createDataFrame(rows, "key binary, value binary, topic string, partition int, offset long")


def test_decode_reads_op_position_key_and_after(spark: SparkSession) -> None:
    row = decode_envelope(kafka_rows(spark, [envelope("c", 1, "ada", 100, 90)])).collect()[0]
    assert (row.op, row.commit_lsn, row.change_lsn, row.error) == ("c", 100, 90, None)
    assert json.loads(row.key_json) == {"id": 1}
    assert json.loads(row.after_json) == {"id": 1, "name": "ada"}


def test_decode_flags_bad_records_with_a_reason(spark: SparkSession) -> None:
    records = [
        (b'{"id":1}', b"{not json"),
        envelope("x", 1, "ada", 100, 100),
        envelope("c", None, "ada", 100, 100),
        (b'{"payload":{"id":1}}', json.dumps({"payload": {"op": "c", "after": {"id": 1}, "source": {}}}).encode()),
        (b'{"payload":{"id":1}}', None),  # tombstone: nothing to apply, not an error
    ]
    errors = [row.error for row in decode_envelope(kafka_rows(spark, records)).orderBy("offset").collect()]
    assert errors[0].startswith("malformed message")
    assert errors[1] == "unknown op: x"
    assert errors[2].startswith("missing key")
    assert errors[3].startswith("missing source position")
    assert errors[4] is None


# A schema with non-ASCII text (its prefix is longer in bytes than in characters) and a column named
# "payload" (its after image holds `,"payload":` too).
ODD_SCHEMA = {
    "type": "struct",
    "fields": [
        {"type": "int64", "optional": False, "field": "id", "doc": 'clé ✓ ","payload":'},
        {"type": "string", "optional": True, "field": "payload"},
    ],
    "optional": False,
    "name": "shop.public.téléphones.Value",
}


def odd_envelope(
    op: str, key: int, payload: str | None, commit: int, change: int, *, compact: bool
) -> tuple[bytes, bytes]:
    source = {"lsn": change, "sequence": json.dumps([str(commit), str(change)]), "ts_ms": 1_700_000_000_000 + change}
    after = None if op == "d" else {"id": key, "payload": payload}
    before = {"id": key, "payload": "ancien ✓"} if op != "c" else None
    value = {"schema": ODD_SCHEMA, "payload": {"op": op, "before": before, "after": after, "source": source}}
    separators = (",", ":") if compact else (", ", ": ")
    key_bytes = json.dumps({"schema": {"type": "struct"}, "payload": {"id": key}}, separators=separators).encode()
    return key_bytes, json.dumps(value, separators=separators, ensure_ascii=False).encode()


def test_the_converter_layout_decodes_exactly_like_the_whole_value(spark: SparkSession) -> None:
    """JsonConverter's compact layout has its payload parsed from the bytes after the schema prefix (see
    envelope.SCHEMA_PREFIX); any other layout is parsed whole. Both give the same changes."""
    changes = [
        ("c", 1, 'é,"payload":{}', 100, 90),
        ("u", 1, '{"payload": "ü"}', 110, 105),
        ("u", 2, None, 120, 115),
        ("d", 2, None, 130, 125),
    ]
    columns = [c for c in DECODED_COLUMNS if c != "value_schema_id"]  # a hash of the schema's own text

    def decoded(compact: bool) -> list[tuple[object, ...]]:
        records = [odd_envelope(*change, compact=compact) for change in changes]
        rows = decode_envelope(kafka_rows(spark, records)).orderBy("offset").collect()
        return [tuple(row[c] for c in columns) for row in rows]

    compact, spaced = decoded(True), decoded(False)
    assert compact == spaced
    assert all(row[columns.index("error")] is None for row in compact)
    after = [
        json.loads(row[columns.index("after_json")]) if row[columns.index("after_json")] else None for row in compact
    ]
    assert after == [
        {"id": 1, "payload": 'é,"payload":{}'},
        {"id": 1, "payload": '{"payload": "ü"}'},
        {"id": 2, "payload": None},
        None,
    ]
    assert json.loads(compact[1][columns.index("before_json")]) == {"id": 1, "payload": "ancien ✓"}


def test_the_converter_layout_with_a_broken_payload_is_malformed(spark: SparkSession) -> None:
    key, value = odd_envelope("c", 1, "x", 100, 90, compact=True)
    records = [
        (key, value[:-3]),  # cut short
        (key, value[:-1] + b',"extra":1}'),  # more after the payload: the payload is still read
        (key, value + b"\n"),  # trailing whitespace: read the same
    ]
    rows = decode_envelope(kafka_rows(spark, records)).orderBy("offset").collect()
    assert rows[0].error.startswith("malformed message")
    assert [(r.op, r.error, json.loads(r.after_json)) for r in rows[1:]] == [("c", None, {"id": 1, "payload": "x"})] * 2


@pytest.mark.parametrize(("a", "b"), [((1, 5), (2, 0)), ((2, 1), (2, 2))])
def test_version_orders_by_commit_then_change(a: tuple[int, int], b: tuple[int, int]) -> None:
    assert version(*a) < version(*b) < 2**128


DATA = Path(__file__).parent / "data" / "debezium"


def captured(spark: SparkSession, name: str):  # noqa: ANN201
    """Real messages captured from Debezium 3.7 (see cdc_pipeline_tests/data/debezium)."""
    records = [
        (json.dumps(m["key"]).encode() if m["key"] is not None else None,
         json.dumps(m["value"]).encode() if m["value"] is not None else None)
        for m in json.loads((DATA / name).read_text())
    ]  # fmt: skip
    return kafka_rows(spark, records)


def test_real_concurrent_transactions_order_by_commit(spark: SparkSession) -> None:
    decoded = decode_envelope(captured(spark, "concurrent_transactions.json"))
    assert decoded.filter("error IS NOT NULL").count() == 0
    rows = decoded.filter("op IS NOT NULL").orderBy("offset").collect()
    positions = [(r.commit_lsn, r.change_lsn) for r in rows]
    # Delivered in commit order, positions strictly increase although raw change LSNs do not.
    assert positions == sorted(positions) and len(set(positions)) == len(positions)


def test_real_snapshot_rows_lose_to_any_streamed_change(spark: SparkSession) -> None:
    snapshot = decode_envelope(captured(spark, "snapshot.json")).filter("op = 'r'").collect()
    streamed = decode_envelope(captured(spark, "update_delete_tombstone.json")).filter("op IS NOT NULL").collect()
    # Snapshot rows sit at (snapshot LSN, 0): after everything committed before the snapshot point (so a
    # re-snapshot repairs a stale row), before everything streamed after it.
    assert snapshot and all(r.commit_lsn > 0 and r.change_lsn == 0 for r in snapshot)
    assert min(version(r.commit_lsn, r.change_lsn) for r in streamed) > max(
        version(r.commit_lsn, r.change_lsn) for r in snapshot
    )


def test_real_truncate_has_no_key_and_is_valid(spark: SparkSession) -> None:
    rows = decode_envelope(captured(spark, "truncate.json")).filter("op = 't'").collect()
    assert len(rows) == 1 and rows[0].error is None and rows[0].key_json is None


def arrow(decoded: DataFrame) -> pa.Table:
    """The decoded batch as the writer ships it to the driver (tombstones left out)."""
    return decoded.filter(F.col("op").isNotNull() | F.col("error").isNotNull()).toArrow()


def latest(table: pa.Table) -> dict[str, Change]:
    return {change.key_json: change for change in DecodedBatch.of(table).latest_by_topic()[TOPIC]}  # type: ignore[misc]


def by_offset(table: pa.Table) -> list[tuple[int, int]]:
    ordered = table.sort_by("offset")
    return list(zip(ordered.column("commit_lsn").to_pylist(), ordered.column("change_lsn").to_pylist(), strict=True))


def test_a_transaction_that_straddles_the_snapshot_point_wins_over_the_snapshot_row(spark: SparkSession) -> None:
    # It wrote at LSN 90, before the snapshot point 100 (so the snapshot did not see it), and committed
    # after it: the first transaction streamed, with no previous commit position.
    records = [
        envelope("r", 1, "snapshot", 100, 100, snapshot="first"),
        envelope("r", 2, "snapshot", 100, 100, snapshot="last"),
        envelope("u", 1, "straddling", None, 90),
        envelope("c", 3, "straddling", None, 95),
        envelope("u", 2, "next", 150, 160),
    ]
    table = arrow(decode_envelope(kafka_rows(spark, records)))
    assert snapshot_points(table) == [(TOPIC, 0, 0, 100)]
    assert unanchored_topics(table) == [TOPIC]

    unanchored = latest(table)
    assert json.loads(unanchored['{"id":1}'].after_json)["name"] == "snapshot"  # type: ignore[arg-type]  # lost

    anchored = anchor_positions(table, {(TOPIC, 0): [(0, 100)]})
    found = latest(anchored)
    assert json.loads(found['{"id":1}'].after_json)["name"] == "straddling"  # type: ignore[arg-type]
    assert (found['{"id":1}'].commit_lsn, found['{"id":1}'].change_lsn) == (100, 90)
    assert json.loads(found['{"id":2}'].after_json)["name"] == "next"  # type: ignore[arg-type]
    # Anchored changes keep their order among themselves and stay before the next transaction.
    positions = by_offset(anchored)[2:]
    assert positions == sorted(positions) == [(100, 90), (100, 95), (150, 160)]
    # Snapshot rows and anchored streamed rows alike: only the commit part moved.
    assert by_offset(anchored)[:2] == [(100, 0), (100, 0)]


def test_anchoring_uses_only_the_snapshots_before_the_change(spark: SparkSession) -> None:
    # A replay of an old range: a later re-snapshot (LSN 500, from offset 10) must not lift a change at offset 3.
    records = [envelope("r", 1, "snapshot", 100, 100, snapshot="true"), envelope("u", 1, "first", None, 300)]
    table = arrow(decode_envelope(kafka_rows(spark, records)))
    points = {(TOPIC, 0): [(0, 100), (10, 500)], ("other.topic", 0): [(0, 900)]}
    assert by_offset(anchor_positions(table, points)) == [(100, 0), (300, 300)]
    # Nothing recorded for the topic: positions as decoded.
    assert by_offset(anchor_positions(table, {("other.topic", 0): [(0, 900)]})) == [(100, 0), (300, 300)]
    # A snapshot before it with a newer LSN lifts it; one at its own offset or after does not count.
    assert by_offset(anchor_positions(table, {(TOPIC, 0): [(0, 400)]})) == [(100, 0), (400, 300)]
    assert by_offset(anchor_positions(table, {(TOPIC, 0): [(1, 400)]})) == [(100, 0), (300, 300)]


def test_offset_ranges_cover_the_wanted_positions_of_each_partition() -> None:
    wanted = [("a", 0, 7), ("a", 0, 3), ("a", 1, 5), ("b", 0, 9)]
    assert offset_ranges(wanted) == ({"a": {"0": 3, "1": 5}, "b": {"0": 9}}, {"a": {"0": 8, "1": 6}, "b": {"0": 10}})
    assert offset_ranges([]) == ({}, {})

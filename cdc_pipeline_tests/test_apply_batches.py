"""The writer over several micro-batches of records in Kafka Connect's JsonConverter layout (compact,
schema first): parsed schemas are reused across batches (the batch is not read again for them), a
schema whose text holds a `payload` key is dead-lettered rather than mistaken, and a full schema cache
starts over without dead-lettering anything (type changes within a batch: test_apply_type_changes.py).
Real Spark and the test stack's ClickHouse."""

from __future__ import annotations

import json
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from cdc_pipeline.config import parse_pipeline_config
from cdc_pipeline.streaming import apply as apply_module
from cdc_pipeline.streaming.apply import ChangeApplier
from cdc_pipeline.streaming.envelope import decode_envelope
from cdc_pipeline.streaming.sink import ClickHouseSink

pytestmark = pytest.mark.integration

TOPIC = "cap.public.control"


class RecordingDeadLetters:
    def __init__(self) -> None:
        self.letters: list[tuple[int, str, bytes | None]] = []

    def send(self, key: Any, value: Any, reason: str, topic: str, partition: int, offset: int) -> None:
        self.letters.append((offset, reason, bytes(value) if value is not None else None))

    def flush(self, timeout: float = 60.0) -> None:
        pass


def compact(message: Any) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def change(
    key: int,
    name: str | None,
    lsn: int,
    op: str = "c",
    snapshot: str | None = None,
    blocking: bool = False,
    **schema_extra: Any,
) -> tuple[bytes, bytes]:
    """A change of `public.control` (id bigint, name text, and `extra` int when the schema says so), as
    JsonConverter writes it; with `snapshot` (Debezium's marker: first, true, last_in_data_collection,
    last...) a snapshot row of the snapshot at `lsn`: an initial snapshot's (no previous commit position,
    as Debezium sends it after starting without offsets) or with `blocking` a blocking snapshot's (taken
    while streaming: the previous commit position is set, as recorded from Debezium 3 on 2026-12-07)."""
    fields = [
        {"type": "int64", "optional": False, "field": "id"},
        {"type": "string", "optional": True, "field": "name"},
    ]
    after: dict[str, Any] | None = {"id": key, "name": name}
    if schema_extra.pop("extra", False):
        fields.append({"type": "int32", "optional": True, "field": "extra"})
        after = {**after, "extra": 7}
    source = {"lsn": lsn, "sequence": json.dumps([str(lsn), str(lsn)]), "ts_ms": 1_700_000_000_000}
    if snapshot is not None:
        op = "r"
        source = {**source, "snapshot": snapshot, "sequence": json.dumps([str(lsn) if blocking else None, str(lsn)])}
    return envelope(key, fields, None if op == "d" else after, op, source, **schema_extra)


def envelope(
    key: int, fields: list[dict[str, Any]], after: dict[str, Any] | None, op: str, source: dict[str, Any], **extra: Any
) -> tuple[bytes, bytes]:
    """The key and value JsonConverter writes for a change of a table keyed by `id` with these fields."""
    schema = {
        "type": "struct",
        "fields": [
            {"type": "struct", "fields": fields, "optional": True, "field": "before"},
            {"type": "struct", "fields": fields, "optional": True, "field": "after"},
            {"type": "struct", "fields": [], "optional": False, "field": "source"},
            {"type": "string", "optional": False, "field": "op"},
        ],
        **extra,
    }
    payload = {"op": op, "before": None, "after": after, "source": source}
    key_schema = {"type": "struct", "fields": [{"type": "int64", "optional": False, "field": "id"}]}
    return compact({"schema": key_schema, "payload": {"id": key}}), compact({"schema": schema, "payload": payload})


@pytest.fixture
def writer(clickhouse: Client, unique_name: str, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    clickhouse.command(f"CREATE DATABASE IF NOT EXISTS `{unique_name}`")
    pipeline = parse_pipeline_config(
        {"name": "cap", "tables": [{"name": "public.control"}], "sink": {"clickhouse": {"database": unique_name}}}
    )
    dead = RecordingDeadLetters()
    applier = ChangeApplier(pipeline, unique_name, ClickHouseSink(clickhouse), dead, retry_seconds=5)  # type: ignore[arg-type]
    reads: list[list[tuple[str, int, int]]] = []
    real = apply_module.records_at

    def records_at(raw: Any, positions: Any) -> Any:
        reads.append(list(positions))
        return real(raw, positions)

    monkeypatch.setattr(apply_module, "records_at", records_at)
    return applier, dead, reads


def run(spark: Any, applier: ChangeApplier, batch_id: int, records: list[tuple[bytes, bytes]]) -> None:
    rows = [(key, value, TOPIC, 0, batch_id * 100 + i) for i, (key, value) in enumerate(records)]
    applier(spark.createDataFrame(rows, "key binary, value binary, topic string, partition int, offset long"), batch_id)


def replica(clickhouse: Client, database: str) -> dict[int, Any]:
    return dict(clickhouse.query(f"SELECT id, name FROM `{database}`.`public_control` FINAL").result_rows)


def test_schemas_are_parsed_once_across_batches(spark: Any, clickhouse: Client, unique_name: str, writer: Any) -> None:
    applier, dead, reads = writer
    run(spark, applier, 1, [change(1, "one", 10), change(2, "two", 11), change(3, "three", 12)])
    assert reads == [[(TOPIC, 0, 100)]]  # the first record of the one schema, read once
    run(spark, applier, 2, [change(1, "one v2", 20), change(2, None, 21, op="d")])
    assert len(reads) == 1, "a known schema made the writer read the batch again"
    assert replica(clickhouse, unique_name) == {1: "one v2", 3: "three"}
    assert dead.letters == []


def test_a_schema_holding_a_payload_key_is_dead_lettered_not_mistaken(
    spark: Any, clickhouse: Client, unique_name: str, writer: Any
) -> None:
    applier, dead, _ = writer
    # The schema's own text holds `,"payload":`: its hash prefix would end inside it.
    odd = change(9, "odd", 31, parameters={"a": "b", "payload": "x"})
    run(spark, applier, 3, [change(1, "one", 30), odd])
    assert replica(clickhouse, unique_name) == {1: "one"}
    assert [(offset, value) for offset, _, value in dead.letters] == [(301, odd[1])]
    assert "JsonConverter" in dead.letters[0][1]


def test_a_full_schema_cache_starts_over_without_dead_letters(
    spark: Any, clickhouse: Client, unique_name: str, writer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    applier, dead, _ = writer
    monkeypatch.setattr(apply_module, "SCHEMA_CACHE_LIMIT", 0)
    run(spark, applier, 4, [change(1, "one", 40)])
    # A known schema and a new one (a column added) in the same batch: the cache is full and cleared.
    run(spark, applier, 5, [change(2, "two", 50), change(3, "three", 51, extra=True)])
    assert replica(clickhouse, unique_name) == {1: "one", 2: "two", 3: "three"}
    assert dead.letters == []


def snapshot(lsn: int, rows: dict[int, str], *, complete: bool, blocking: bool = False) -> list[tuple[bytes, bytes]]:
    """A snapshot of `public.control` at `lsn` as Debezium marks it; `complete=False`: cut off after `rows`
    (Kafka Connect killed mid-snapshot), so its last row carries no end marker. `blocking`: see `change`."""
    keys = sorted(rows)
    markers = ["first" if i == 0 else "true" for i in range(len(keys))]
    if complete:
        markers[-1] = "last"
    return [
        change(key, rows[key], lsn, snapshot=marker, blocking=blocking)
        for key, marker in zip(keys, markers, strict=True)
    ]


def test_a_snapshot_after_an_interrupted_one_leaves_no_row_the_source_deleted_in_between(
    spark: Any, clickhouse: Client, unique_name: str, writer: Any
) -> None:
    """Connect killed mid-snapshot: the first snapshot wrote rows 1-3; 3 and 4 are deleted before the new
    snapshot (4 came from the stream before it), which the stream will never send a delete for."""
    applier, dead, _ = writer
    run(spark, applier, 1, [change(4, "streamed", 50)])
    run(spark, applier, 2, snapshot(100, {1: "one", 2: "two", 3: "three"}, complete=False))
    assert replica(clickhouse, unique_name) == {1: "one", 2: "two", 3: "three", 4: "streamed"}
    # The new snapshot's end is in the next batch (a replay of both batches gives the same replica).
    second = snapshot(200, {1: "one v2", 2: "two", 5: "five"}, complete=True)
    run(spark, applier, 3, second[:2])
    run(spark, applier, 4, [*second[2:], change(6, "after", 300)])
    assert replica(clickhouse, unique_name) == {1: "one v2", 2: "two", 5: "five", 6: "after"}
    run(spark, applier, 3, second[:2])
    run(spark, applier, 4, [*second[2:], change(6, "after", 300)])
    assert replica(clickhouse, unique_name) == {1: "one v2", 2: "two", 5: "five", 6: "after"}
    # A blocking snapshot after a complete one removes nothing (it may carry a filter).
    run(spark, applier, 5, snapshot(400, {1: "one v3"}, complete=True, blocking=True))
    assert replica(clickhouse, unique_name) == {1: "one v3", 2: "two", 5: "five", 6: "after"}
    assert dead.letters == []


def test_an_initial_snapshot_after_a_complete_one_leaves_no_row_the_source_deleted_in_between(
    spark: Any, clickhouse: Client, unique_name: str, writer: Any
) -> None:
    """Connect killed after a table's snapshot reached Kafka whole, but before the worker flushed Debezium's
    offsets: at restart Debezium snapshots again and streams only what follows. Rows 2 and 3 were deleted
    in between (3 by a change the stream did receive, 2 by one lost with the worker)."""
    applier, dead, _ = writer
    run(spark, applier, 1, [*snapshot(100, {1: "one", 2: "two", 3: "three"}, complete=True), change(3, None, 150, "d")])
    assert replica(clickhouse, unique_name) == {1: "one", 2: "two"}
    run(spark, applier, 2, [*snapshot(200, {1: "one v2", 4: "four"}, complete=True), change(5, "five", 250)])
    assert replica(clickhouse, unique_name) == {1: "one v2", 4: "four", 5: "five"}
    run(spark, applier, 2, [*snapshot(200, {1: "one v2", 4: "four"}, complete=True), change(5, "five", 250)])
    assert replica(clickhouse, unique_name) == {1: "one v2", 4: "four", 5: "five"}  # replayed: the same
    assert dead.letters == []


def test_an_interrupted_snapshot_and_its_successor_in_one_batch(
    spark: Any, clickhouse: Client, unique_name: str, writer: Any
) -> None:
    applier, dead, _ = writer
    first = snapshot(100, {1: "one", 2: "two", 3: "three"}, complete=False)
    run(spark, applier, 1, [*first, *snapshot(200, {1: "one", 2: "two v2"}, complete=True)])
    assert replica(clickhouse, unique_name) == {1: "one", 2: "two v2"}
    # A complete snapshot and a blocking one in one batch: the first is not taken for interrupted.
    complete = [
        *snapshot(300, {1: "one", 7: "seven"}, complete=True, blocking=True),
        *snapshot(400, {1: "one v4"}, complete=True, blocking=True),
    ]
    run(spark, applier, 2, complete)
    assert replica(clickhouse, unique_name) == {1: "one v4", 2: "two v2", 7: "seven"}
    assert dead.letters == []


def test_the_streams_decoded_batches_read_raw_records_from_kafka_by_position(
    spark: Any, clickhouse: Client, unique_name: str
) -> None:
    """The stream decodes in its own query (`decode_envelope(keep_raw=True)`): the writer reads the raw
    records of a new schema and of dead letters through `read_records` (from Kafka, by position), not by
    computing the batch's decode again."""
    clickhouse.command(f"CREATE DATABASE IF NOT EXISTS `{unique_name}`")
    pipeline = parse_pipeline_config(
        {"name": "cap", "tables": [{"name": "public.control"}], "sink": {"clickhouse": {"database": unique_name}}}
    )
    records = [change(1, "one", 60), (b'{"id":2}', b"not json"), change(3, "three", 61)]
    rows = [(key, value, TOPIC, 0, 600 + i) for i, (key, value) in enumerate(records)]
    kafka = spark.createDataFrame(rows, "key binary, value binary, topic string, partition int, offset long")
    asked: list[list[tuple[str, int, int]]] = []

    def read_records(wanted: list[tuple[str, int, int]]) -> Any:
        asked.append(wanted)
        return kafka

    dead = RecordingDeadLetters()
    applier = ChangeApplier(
        pipeline,
        unique_name,
        ClickHouseSink(clickhouse),
        dead,
        retry_seconds=5,
        read_records=read_records,  # type: ignore[arg-type]
    )
    applier(decode_envelope(kafka, keep_raw=True), 6)
    assert asked == [[(TOPIC, 0, 600)], [(TOPIC, 0, 601)]]  # the new schema's first record, the dead letter
    assert replica(clickhouse, unique_name) == {1: "one", 3: "three"}
    assert [(offset, value) for offset, _, value in dead.letters] == [(601, b"not json")]


def _typed_change(key: int, after: dict[str, Any] | None, lsn: int, op: str = "c") -> tuple[bytes, bytes]:
    """A change of `public.control` with typed columns, as JsonConverter writes them (Debezium's logical
    types and source-type parameters)."""

    def field(name: str, kind: str, source: str, logical: str | None = None, **params: str) -> dict[str, Any]:
        parameters = {"__debezium.source.column.type": source, **params}
        return {"type": kind, "optional": name != "id", "field": name, "parameters": parameters} | (
            {"name": logical} if logical else {}
        )

    fields = [
        field("id", "int64", "INT8"),
        field("qty", "int32", "INT4"),
        field(
            "amount",
            "string",
            "NUMERIC",
            **{"__debezium.source.column.length": "12", "__debezium.source.column.scale": "2"},
        ),
        field("name", "string", "TEXT"),
        field("doc", "string", "JSONB", "io.debezium.data.Json"),
        field("born", "int32", "DATE", "io.debezium.time.Date"),
        field("seen", "int64", "TIMESTAMP", "io.debezium.time.MicroTimestamp"),
        field("at", "string", "TIMESTAMPTZ", "io.debezium.time.ZonedTimestamp"),
        field("uid", "string", "UUID", "io.debezium.data.Uuid"),
    ]
    source = {"lsn": lsn, "sequence": json.dumps([str(lsn), str(lsn)]), "ts_ms": 1_700_000_000_123}
    return envelope(key, fields, after, op, source)


def test_ordinary_rows_are_converted_column_wise_and_land_exactly(
    spark: Any, clickhouse: Client, unique_name: str, writer: Any
) -> None:
    """Rows of ordinary types take the column-wise conversion (streaming/columnar.py) and land exactly;
    an update with an unchanged TOASTed value in the same batch takes the row path and keeps the value."""
    applier, dead, _ = writer
    seen: list[Any] = []
    applier.on_batch = seen.append

    def row(key: int, name: str | None, **overrides: Any) -> dict[str, Any]:
        return {
            "id": key, "qty": -2_147_483_648, "amount": "-9999999999.99", "name": name, "doc": '{"a": "\\"é\\""}',
            "born": -25_567, "seen": 10_413_791_999_999_999, "at": "2026-03-01T12:00:00.000001+05:30",
            "uid": "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
        } | overrides  # fmt: skip

    run(spark, applier, 6, [_typed_change(k, row(k, f'name {k} ✓ \n \\ "q"'), 60 + k) for k in range(1, 4)])
    assert [s.columnar_rows for s in seen] == [3]
    toasted = row(2, "__debezium_unavailable_value", qty=5)
    run(spark, applier, 7, [_typed_change(2, toasted, 70, op="u"), _typed_change(3, row(3, None, qty=None), 71, "u")])
    assert [s.columnar_rows for s in seen] == [3, 1]  # the TOASTed update went row by row
    assert dead.letters == []
    got = clickhouse.query(
        f"SELECT id, qty, toString(amount), name, doc, toString(born), toString(seen), toString(at), "
        f"toString(_source_ts), toString(uid) FROM `{unique_name}`.`public_control` FINAL ORDER BY id"
    ).result_rows
    common = ("-9999999999.99", '{"a": "\\"é\\""}', "1900-01-01", "2299-12-31 23:59:59.999999")
    at, ts, uid = "2026-03-01 06:30:00.000001", "2023-11-14 22:13:20.123", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    assert got == [
        (1, -2_147_483_648, common[0], 'name 1 ✓ \n \\ "q"', *common[1:], at, ts, uid),
        (2, 5, common[0], 'name 2 ✓ \n \\ "q"', *common[1:], at, ts, uid),
        (3, None, common[0], None, *common[1:], at, ts, uid),
    ]

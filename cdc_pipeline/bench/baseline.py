"""The baseline of the catch-up scenario: the plain single-process consumer a user would write instead of
Spark (confluent-kafka -> clickhouse-connect), applying a Kafka topic range with the same semantics as
the stream: the same decode of the Debezium JSON envelope, versions from the same source position
(`cdc_pipeline.streaming.envelope`, restated in plain Python below), the last change per key per poll
batch, the same column types and conversions (`cdc_pipeline.streaming.types.columns_from_schema`) and
the same ReplacingMergeTree tables (`cdc_pipeline.streaming.sink`), inserted column-wise.

Not a product path: no dead-letter topic (a value that does not convert is counted and skipped), no
checkpoint. Run as `python -m cdc_pipeline.bench.baseline --config X --database D --end-offsets JSON`
(settings from the CDC_* environment); prints one JSON line with what it did and how long it took.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from clickhouse_connect.driver.client import Client
from confluent_kafka import Consumer, TopicPartition

from cdc_pipeline.clickhouse_client import connect_clickhouse
from cdc_pipeline.config import PipelineConfig, load_pipeline_config
from cdc_pipeline.settings import Settings
from cdc_pipeline.streaming.envelope import ROW_OPS, TRUNCATE, version
from cdc_pipeline.streaming.sink import META_NAMES, ClickHouseSink, ReplicaTable
from cdc_pipeline.streaming.types import ColumnSpec, ValueConversionError, columns_from_schema

POLL_BATCH_RECORDS = 50_000
_PAYLOAD_MARK = b',"payload":'


def position(payload: dict[str, Any]) -> tuple[int, int]:
    """(commit_lsn, change_lsn) of a change, exactly as `envelope.decode_envelope` computes them: from
    `source.sequence` ["<previous commit end LSN>", "<change LSN>"], falling back on `source.lsn`;
    snapshot rows get (snapshot LSN, 0) (see the envelope module's docstring)."""
    source = payload.get("source") or {}
    lsn = source.get("lsn")
    raw_sequence = source.get("sequence")
    sequence = json.loads(raw_sequence) if raw_sequence else None
    snapshot = source.get("snapshot")
    if payload.get("op") == "r" and snapshot is not None and str(snapshot) not in ("false", "incremental"):
        return int(lsn), 0
    commit_lsn = int(sequence[0]) if sequence and sequence[0] is not None else int(lsn)
    change_lsn = int(sequence[1]) if sequence and len(sequence) > 1 and sequence[1] is not None else int(lsn)
    return commit_lsn, change_lsn


def _schema_part(raw: bytes) -> bytes:
    """The `{"schema": ...` prefix of a JsonConverter message: the cache key of its column specs."""
    end = raw.find(_PAYLOAD_MARK)
    return raw[:end] if end > 0 else raw


@dataclass
class Change:
    op: str
    commit_lsn: int
    change_lsn: int
    offset: int
    ts_ms: int | None
    key: dict[str, Any]
    after: dict[str, Any] | None
    specs: dict[str, ColumnSpec]
    key_specs: dict[str, ColumnSpec]


@dataclass
class Result:
    records: int = 0
    upserted_rows: int = 0
    deleted_rows: int = 0
    truncates: int = 0
    skipped: int = 0
    inserts: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


class BaselineConsumer:
    """Applies [low, end) of every partition of the pipeline's topics to `database`."""

    def __init__(self, settings: Settings, pipeline: PipelineConfig, database: str, client: Client) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.database = database
        self.client = client
        self.sink = ClickHouseSink(client)
        self._specs: dict[bytes, tuple[dict[str, ColumnSpec], list[ColumnSpec]]] = {}
        self._key_specs: dict[bytes, dict[str, ColumnSpec]] = {}
        self.result = Result()

    def _value_specs(self, raw: bytes, envelope: dict[str, Any]) -> tuple[dict[str, ColumnSpec], list[ColumnSpec]]:
        key = _schema_part(raw)
        if key not in self._specs:
            columns = columns_from_schema(envelope["schema"])
            self._specs[key] = ({c.name: c for c in columns}, columns)
        return self._specs[key]

    def _key_columns(self, raw: bytes, key: dict[str, Any]) -> dict[str, ColumnSpec]:
        cache_key = _schema_part(raw)
        if cache_key not in self._key_specs:
            # A key schema is a struct like `after` (as in streaming/apply.py).
            columns = columns_from_schema({"fields": [{**key["schema"], "field": "after"}]})
            self._key_specs[cache_key] = {c.name: c for c in columns}
        return self._key_specs[cache_key]

    def run(self, end_offsets: dict[tuple[str, int], int]) -> Result:
        started = time.monotonic()
        consumer = Consumer(
            {
                "bootstrap.servers": self.settings.kafka_bootstrap_servers,
                "group.id": f"cdc-bench-baseline-{self.database}",
                "enable.auto.commit": False,
                "fetch.max.bytes": 64 * 1024 * 1024,
                "max.partition.fetch.bytes": 16 * 1024 * 1024,
            }
        )
        remaining = {tp: end for tp, end in end_offsets.items() if end > 0}
        consumer.assign([TopicPartition(topic, partition, 0) for topic, partition in remaining])
        pending: dict[str, dict[bytes, Change]] = defaultdict(dict)
        # Per topic, every schema version seen (by identity: the spec lists are cached per schema).
        columns_seen: dict[str, dict[int, list[ColumnSpec]]] = defaultdict(dict)
        pending_records = 0
        try:
            while remaining:
                for message in consumer.consume(num_messages=10_000, timeout=1.0):
                    if message.error():
                        self.result.errors.append(str(message.error()))
                        continue
                    tp = (message.topic(), message.partition())
                    end = remaining.get(tp)
                    if end is None or message.offset() >= end:
                        continue
                    if message.offset() >= end - 1:
                        del remaining[tp]
                    self.result.records += 1
                    pending_records += 1
                    self._take(message, pending, columns_seen)
                if pending_records >= POLL_BATCH_RECORDS or (not remaining and pending_records):
                    self._flush(pending, columns_seen)
                    pending_records = 0
        finally:
            consumer.close()
        self.result.seconds = time.monotonic() - started
        return self.result

    def _take(self, message: Any, pending: dict[str, dict[bytes, Change]], columns_seen: dict) -> None:
        raw = message.value()
        if raw is None:
            return  # tombstone
        envelope = json.loads(raw)
        payload = envelope.get("payload") or {}
        op = payload.get("op")
        topic = message.topic()
        commit_lsn, change_lsn = position(payload)
        ts_ms = (payload.get("source") or {}).get("ts_ms")
        if op == TRUNCATE:
            # Everything before the truncate is wiped anyway; apply what is pending, then the truncate.
            self._flush(pending, columns_seen)
            table = self._table(topic, ())
            if table is not None and self.sink.truncate(table, version(commit_lsn, change_lsn), _ts(ts_ms)):
                self.result.truncates += 1
            return
        if op not in ROW_OPS:
            self.result.skipped += 1
            return
        raw_key = message.key()
        key = json.loads(raw_key)
        specs, columns = self._value_specs(raw, envelope)
        columns_seen[topic].setdefault(id(columns), columns)
        if op != "d" and payload.get("after") is None:
            self.result.skipped += 1  # the stream dead-letters these
            return
        change = Change(
            op, commit_lsn, change_lsn, message.offset(), ts_ms, key["payload"], payload.get("after"), specs,
            self._key_columns(raw_key, key),
        )  # fmt: skip
        current = pending[topic].get(raw_key)
        if current is None or (change.commit_lsn, change.change_lsn, change.offset) > (
            current.commit_lsn,
            current.change_lsn,
            current.offset,
        ):
            pending[topic][raw_key] = change

    def _table(self, topic: str, key_columns: tuple[str, ...]) -> ReplicaTable | None:
        config = self.pipeline.table_for_topic(topic)
        if config is None:
            return None
        keys = key_columns or tuple(config.primary_key or ())
        return ReplicaTable(self.database, self.pipeline.sink_table(config), keys, config.partition_by)

    def _flush(
        self, pending: dict[str, dict[bytes, Change]], columns_seen: dict[str, dict[int, list[ColumnSpec]]]
    ) -> None:
        for topic, changes in pending.items():
            if not changes:
                continue
            first = next(iter(changes.values()))
            table = self._table(topic, tuple(first.key_specs))
            if table is None:
                continue
            merged: dict[str, ColumnSpec] = {}
            for columns in columns_seen[topic].values():
                for spec in columns:
                    merged.setdefault(spec.name, spec)
            merged.update({name: spec for name, spec in first.key_specs.items() if name not in merged})
            self.sink.ensure_table(table, list(merged.values()))
            upserts: dict[tuple[str, ...], list[list[Any]]] = defaultdict(list)
            deletes: list[list[Any]] = []
            for change in changes.values():
                meta = [version(change.commit_lsn, change.change_lsn), int(change.op == "d"), _ts(change.ts_ms)]
                try:
                    if change.op == "d":
                        specs = change.key_specs
                        deletes.append([specs[name].convert(change.key.get(name)) for name in table.key_columns] + meta)
                    else:
                        after = change.after or {}
                        names = tuple(after)
                        upserts[names].append([change.specs[name].convert(after[name]) for name in names] + meta)
                except (ValueConversionError, KeyError, ValueError, TypeError):
                    self.result.skipped += 1
            for names, rows in upserts.items():
                self._insert(table, [*names, *META_NAMES], rows)
                self.result.upserted_rows += len(rows)
            if deletes:
                self._insert(table, [*table.key_columns, *META_NAMES], deletes)
                self.result.deleted_rows += len(deletes)
            changes.clear()

    def _insert(self, table: ReplicaTable, column_names: list[str], rows: list[list[Any]]) -> None:
        columns = [list(column) for column in zip(*rows, strict=True)]
        self.client.insert(table.qualified, columns, column_names=column_names, column_oriented=True)
        self.result.inserts += 1


def _ts(ts_ms: int | None) -> datetime:
    return datetime.fromtimestamp((ts_ms or 0) / 1000, tz=UTC)


def parse_end_offsets(text: str) -> dict[tuple[str, int], int]:
    """`{"topic": {"0": 123}}` -> {(topic, 0): 123}."""
    return {(topic, int(p)): int(end) for topic, parts in json.loads(text).items() for p, end in parts.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="pipeline.yaml whose topics and tables to apply")
    parser.add_argument("--database", required=True, help="ClickHouse database of the replica tables")
    parser.add_argument("--end-offsets", required=True, help='JSON {"topic": {"partition": end offset}}')
    args = parser.parse_args(argv)
    settings = Settings()
    pipeline = load_pipeline_config(args.config)
    password = settings.clickhouse_password.get_secret_value() if settings.clickhouse_password else None
    client = connect_clickhouse(settings.clickhouse_endpoint, settings.clickhouse_user, password)
    try:
        client.command(f"CREATE DATABASE IF NOT EXISTS `{args.database}`")
        result = BaselineConsumer(settings, pipeline, args.database, client).run(parse_end_offsets(args.end_offsets))
    finally:
        client.close()
    print(json.dumps(result.__dict__), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

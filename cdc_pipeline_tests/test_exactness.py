"""Exact under real-world conditions, on the real stack: unchanged TOASTed columns, transient and
persistent ClickHouse faults, poison records of any shape, sentinel dates, and re-snapshots. Each test
is a case that used to leave the replica silently different or stop the stream."""

from __future__ import annotations

import json
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from clickhouse_connect.driver.client import Client
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from cdc_pipeline.clickhouse_client import connect_clickhouse
from cdc_pipeline.resources import KafkaResource
from cdc_pipeline.settings import Settings
from cdc_pipeline.stack.lifecycle import LocalStack
from cdc_pipeline.streaming.apply import UNAVAILABLE
from cdc_pipeline_tests.conftest import wait_for
from cdc_pipeline_tests.replica import RunningPipeline, pipeline_for_schema

pytestmark = pytest.mark.integration


def dead_letters(settings: Settings, running: RunningPipeline, wait: float = 10) -> list[dict[str, Any]]:
    """Every record of the pipeline's DLQ topic so far: headers plus the original key and value."""
    consumer = KafkaResource(bootstrap_servers=settings.kafka_bootstrap_servers).consumer(
        f"{running.schema}-dlq-{secrets.token_hex(4)}"
    )
    consumer.assign([TopicPartition(running.config.dlq_topic, 0, OFFSET_BEGINNING)])
    letters: list[dict[str, Any]] = []
    deadline = time.monotonic() + wait
    try:
        while time.monotonic() < deadline:
            message = consumer.poll(1)
            if message is None or message.error() is not None:
                continue
            letters.append({**{k: v.decode() for k, v in message.headers() or []}, "value": message.value()})
            deadline = max(deadline, time.monotonic() + 3)
    finally:
        consumer.close()
    return letters


def progress_sum(clickhouse: Client, running: RunningPipeline, column: str) -> int:
    return int(
        clickhouse.command(
            f"SELECT sum({column}) FROM {{db:Identifier}}._cdc_stream_progress WHERE query_name = {{q:String}}",
            parameters={"db": running.database, "q": running.config.query_name},
        )
        or 0
    )


def incompressible(size: int) -> str:
    """Text PostgreSQL cannot compress below the TOAST threshold: it is stored out of line."""
    return secrets.token_hex(size // 2)


# -- 1. unchanged TOASTed columns ------------------------------------------------------------------------------

TOAST_TABLE = """
CREATE TABLE {t} (
    id int PRIMARY KEY, n int, body text, doc jsonb, blob bytea, tags text[], nums int[], big numeric, day date
)
"""


def insert_toasted(conn: psycopg.Connection, table: str, ids: range) -> None:
    for i in ids:
        conn.execute(
            f"INSERT INTO {table} VALUES (%s, 0, %s, %s, %s, %s, %s, %s, '2024-01-01')",
            (
                i,
                incompressible(6000),
                json.dumps({"k": incompressible(6000), "i": i}),
                secrets.token_bytes(5000),
                [incompressible(3000), incompressible(3000)],
                [secrets.randbelow(2**31) for _ in range(1500)],
                "".join(str(secrets.randbelow(10)) for _ in range(6000)) + ".5",
            ),
        )


def test_unchanged_toasted_columns_keep_their_values(
    settings: Settings, source: psycopg.Connection, clickhouse: Client, unique_name: str, tmp_path: Path
) -> None:
    s = unique_name
    source.execute(f'CREATE SCHEMA "{s}"')
    tables = ["docs", "docs_full"]  # default replica identity, and REPLICA IDENTITY FULL
    for table in tables:
        source.execute(TOAST_TABLE.format(t=f'"{s}".{table}'))
    source.execute(f'ALTER TABLE "{s}".docs_full REPLICA IDENTITY FULL')
    for table in tables:
        insert_toasted(source, f'"{s}".{table}', range(1, 41))  # snapshot rows
    with pipeline_for_schema(settings, s, tables, tmp_path) as running:
        running.start_stream()
        running.wait_until_replica_matches(source, clickhouse, tables, timeout=300)
        for table in tables:
            # Updates that leave the large columns alone, in separate batches: the values come from the replica.
            for round_ in range(3):
                source.execute(f'UPDATE "{s}".{table} SET n = n + 1 WHERE id %% 3 = %s', (round_,))
            # Insert then update in one transaction (one batch): the value comes from the batch itself.
            with source.transaction():
                insert_toasted(source, f'"{s}".{table}', range(100, 106))
                source.execute(f'UPDATE "{s}".{table} SET n = 7, day = day + 1 WHERE id >= 100')
            # A large column changed, then an update that leaves it alone, in one transaction.
            with source.transaction():
                source.execute(f'UPDATE "{s}".{table} SET body = %s WHERE id = 5', (incompressible(7000),))
                source.execute(f'UPDATE "{s}".{table} SET n = 99 WHERE id = 5')
            source.execute(f'DELETE FROM "{s}".{table} WHERE id = 6')
        assert running.wait_until_replica_matches(source, clickhouse, tables, timeout=300) == 2 * 45
        for table in tables:
            leaked = clickhouse.command(
                f"SELECT count() FROM `{s}`.`{table}` WHERE position(body, {{p:String}}) > 0 "
                "OR position(doc, {p:String}) > 0 OR position(blob, {p:String}) > 0 "
                "OR has(tags, {p:String}) OR position(big, {p:String}) > 0",
                parameters={"p": UNAVAILABLE},
            )
            assert int(leaked) == 0, f"{table}: the placeholder reached the replica"
        wait_for(
            lambda: progress_sum(clickhouse, running, "toast_merged") > 0, 120, "toast_merged in the progress table"
        )
        assert dead_letters(settings, running, wait=5) == []


# -- 3. transient and persistent ClickHouse faults -------------------------------------------------------------


def items_table(source: psycopg.Connection, schema: str, rows: int) -> None:
    """Schema `schema` with a table `items (id int PRIMARY KEY, v text)` holding `rows` rows."""
    source.execute(f'CREATE SCHEMA "{schema}"')
    source.execute(f'CREATE TABLE "{schema}".items (id int PRIMARY KEY, v text)')
    source.execute(f"INSERT INTO \"{schema}\".items SELECT i, 'v' || i FROM generate_series(1, %s) i", (rows,))


def test_a_detached_replica_table_is_retried_not_dead_lettered(
    settings: Settings, source: psycopg.Connection, clickhouse: Client, unique_name: str, tmp_path: Path
) -> None:
    s = unique_name
    items_table(source, s, 100)
    with pipeline_for_schema(settings, s, ["items"], tmp_path, stream={"sink_retry_seconds": 600}) as running:
        running.start_stream()
        running.wait_until_replica_matches(source, clickhouse, ["items"], timeout=300)
        clickhouse.command(f"DETACH TABLE `{s}`.`items`")
        try:
            for i in range(1, 101):
                source.execute(f"UPDATE \"{s}\".items SET v = 'changed ' || id WHERE id = %s", (i,))
            # The writes fail while the table is detached (the fault lasts ~25 s, as reported).
            wait_for(lambda: "retrying for up to" in running.log_tail(400), 120, "the stream to retry the write")
            time.sleep(25)
        finally:
            clickhouse.command(f"ATTACH TABLE `{s}`.`items`")
        assert running.wait_until_replica_matches(source, clickhouse, ["items"], timeout=300) == 100
        assert running.stream_alive()
        assert dead_letters(settings, running, wait=5) == []
        wait_for(
            lambda: progress_sum(clickhouse, running, "sink_retries") > 0, 120, "sink_retries in the progress table"
        )


def test_a_fault_that_outlasts_the_retries_fails_the_batch_uncommitted(
    settings: Settings, source: psycopg.Connection, clickhouse: Client, unique_name: str, tmp_path: Path
) -> None:
    s = unique_name
    items_table(source, s, 50)
    with pipeline_for_schema(settings, s, ["items"], tmp_path, stream={"sink_retry_seconds": 10}) as running:
        running.start_stream()
        running.wait_until_replica_matches(source, clickhouse, ["items"], timeout=300)
        clickhouse.command(f"DETACH TABLE `{s}`.`items`")
        try:
            source.execute(f"UPDATE \"{s}\".items SET v = 'changed ' || id")
            wait_for(lambda: not running.stream_alive(), 300, "the stream to stop on the persisting fault")
            assert "dropped or detached behind the stream's back" in running.log_tail(2000)
        finally:
            clickhouse.command(f"ATTACH TABLE `{s}`.`items`")
        # Nothing was committed past the failed batch: a restart applies it.
        running.start_stream()
        assert running.wait_until_replica_matches(source, clickhouse, ["items"], timeout=300) == 50
        assert dead_letters(settings, running, wait=5) == []

        # A dropped replica is reported, never recreated empty and written around.
        running.kill_stream()
        clickhouse.command(f"DROP TABLE `{s}`.`items` SYNC")
        source.execute(f"UPDATE \"{s}\".items SET v = 'again ' || id WHERE id <= 5")
        running.start_stream()
        wait_for(lambda: not running.stream_alive(), 300, "the stream to stop on the dropped replica")
        assert "will not recreate it empty" in running.log_tail(2000)
        exists = clickhouse.command(f"EXISTS TABLE `{s}`.`items`")
        assert int(exists) == 0


# -- 6. sentinel dates and timestamps ---------------------------------------------------------------------------

SENTINELS = """
CREATE TABLE {t} (id int PRIMARY KEY, d date, ts timestamp, tstz timestamptz, ds date[]);
INSERT INTO {t} VALUES
    (1, '0001-01-01', '0001-01-01 00:00:00', '0001-01-01 00:00:00+00', '{{0001-01-01,2020-02-02}}'),
    (2, '9999-12-31', '9999-12-31 23:59:59', '9999-12-31 23:59:59+00', '{{9999-12-31}}'),
    (3, 'infinity', 'infinity', 'infinity', '{{}}'),
    (4, '-infinity', '-infinity', '-infinity', NULL),
    (5, '2024-02-29', '2024-02-29 12:00:00', '2024-02-29 12:00:00+00', '{{2024-02-29}}');
"""


def test_sentinel_dates_keep_their_row(
    settings: Settings, source: psycopg.Connection, clickhouse: Client, unique_name: str, tmp_path: Path
) -> None:
    s = unique_name
    source.execute(f'CREATE SCHEMA "{s}"')
    source.execute(SENTINELS.format(t=f'"{s}".clamped'))  # before the connector: snapshot rows
    source.execute(SENTINELS.format(t=f'"{s}".exact'))
    options = {"table_options": {"exact": {"out_of_range": {"d": "text", "ts": "text", "tstz": "text"}}}}
    with pipeline_for_schema(settings, s, ["clamped", "exact"], tmp_path, **options) as running:
        running.start_stream()
        for table in ("clamped", "exact"):  # the same values again through streaming
            source.execute(f'INSERT INTO "{s}".{table} SELECT id + 10, d, ts, tstz, ds FROM "{s}".{table}')

        def replica(table: str) -> dict[int, tuple[str, ...]]:
            rows = clickhouse.query(
                f"SELECT id, toString(d), toString(ts), toString(tstz), toString(ds) FROM `{s}`.`{table}` FINAL"
            ).result_rows
            return {row[0]: tuple(row[1:]) for row in rows}

        def complete() -> bool:
            try:
                return len(replica("clamped")) == 10 and len(replica("exact")) == 10
            except Exception:  # the stream has not created the database or tables yet
                return False

        try:
            wait_for(complete, 300, "every row")
        except AssertionError as exc:
            letters = [letter["cdc.error"] for letter in dead_letters(settings, running, wait=5)]
            raise AssertionError(f"{exc}: {replica('clamped')} {replica('exact')} {letters}") from None
        low, high = "1900-01-01", "2299-12-31"
        clamped = replica("clamped")
        for offset in (0, 10):
            assert clamped[1 + offset][:3] == (low, f"{low} 00:00:00.000000", f"{low} 00:00:00.000000")
            assert clamped[1 + offset][3] == f"['{low}','2020-02-02']"
            assert clamped[2 + offset][:3] == (high, f"{high} 23:59:59.999999", f"{high} 23:59:59.999999")
            assert clamped[3 + offset][:3] == (high, f"{high} 23:59:59.999999", f"{high} 23:59:59.999999")
            assert clamped[4 + offset][:3] == (low, f"{low} 00:00:00.000000", f"{low} 00:00:00.000000")
            assert clamped[5 + offset] == ("2024-02-29", "2024-02-29 12:00:00.000000", "2024-02-29 12:00:00.000000",
                                           "['2024-02-29']")  # fmt: skip
        exact = replica("exact")
        for offset in (0, 10):
            assert exact[1 + offset][:2] == ("0001-01-01", "0001-01-01T00:00:00")
            assert exact[2 + offset][:2] == ("9999-12-31", "9999-12-31T23:59:59")
            assert exact[3 + offset][:3] == ("infinity", "infinity", "infinity")
            assert exact[4 + offset][:3] == ("-infinity", "-infinity", "-infinity")
            assert exact[5 + offset][:2] == ("2024-02-29", "2024-02-29T12:00:00")
        wait_for(
            lambda: progress_sum(clickhouse, running, "clamped_values") > 0, 120, "clamped_values in the progress table"
        )
        # Reconciliation reads 'infinity' and far years without failing, and compares under the clamp policy.
        assert running.mismatches(source, clickhouse, ["clamped"]) == []
        assert dead_letters(settings, running, wait=5) == []
        assert running.stream_alive()


# -- 8. a re-snapshot repairs a stale replica row -------------------------------------------------------------


def test_a_blocking_snapshot_repairs_a_stale_replica_row(
    settings: Settings, source: psycopg.Connection, clickhouse: Client, unique_name: str, tmp_path: Path
) -> None:
    s = unique_name
    source.execute(f'CREATE SCHEMA "{s}"')
    source.execute(f'CREATE TABLE "{s}".accounts (id int PRIMARY KEY, balance numeric(12, 2))')
    source.execute(f'INSERT INTO "{s}".accounts SELECT i, i * 10 FROM generate_series(1, 20) i')
    with pipeline_for_schema(settings, s, ["accounts"], tmp_path) as running:
        running.start_stream()
        source.execute(f'UPDATE "{s}".accounts SET balance = balance + 1 WHERE id <= 10')  # streamed versions
        running.wait_until_replica_matches(source, clickhouse, ["accounts"], timeout=300)
        # Corrupt two replica rows with a version just above their streamed one (a bug, a bad manual fix...).
        for key in (3, 15):
            clickhouse.command(
                f"INSERT INTO `{s}`.`accounts` (id, balance, _version, _is_deleted, _source_ts) "
                f"SELECT id, -1, _version + 1, 0, _source_ts FROM `{s}`.`accounts` FINAL WHERE id = {key}"
            )
        assert running.mismatches(source, clickhouse, ["accounts"])
        source.execute(
            f'INSERT INTO "{s}".cdc_signal (id, type, data) VALUES (%s, %s, %s)',
            (
                f"resnapshot-{secrets.token_hex(4)}",
                "execute-snapshot",
                json.dumps({"data-collections": [f"{s}.accounts"], "type": "blocking"}),
            ),
        )
        source.execute(f'UPDATE "{s}".accounts SET balance = 0 WHERE id = 20')  # streamed after the snapshot
        assert running.wait_until_replica_matches(source, clickhouse, ["accounts"], timeout=300) == 20


def test_connect_killed_mid_snapshot_leaves_no_row_deleted_before_the_new_snapshot(
    settings: Settings,
    local_stack: LocalStack,
    source: psycopg.Connection,
    clickhouse: Client,
    unique_name: str,
    tmp_path: Path,
) -> None:
    """Kafka Connect killed while its first snapshot runs: at restart Debezium takes a new snapshot, at a later
    LSN, and streams only what follows it. Rows the first snapshot had already sent and the source deleted
    before the second are in no record to come: the stream marks them deleted when the new snapshot completes."""
    s, rows = unique_name, 60_000
    source.execute(f'CREATE SCHEMA "{s}"')
    source.execute(f'CREATE TABLE "{s}".events (id int PRIMARY KEY, note text)')
    source.execute(f'INSERT INTO "{s}".events SELECT i, repeat(md5(i::text), 4) FROM generate_series(1, {rows}) i')
    with pipeline_for_schema(settings, s, ["events"], tmp_path) as running:
        (topic,) = running.config.topics()
        running.start_stream()
        consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": unique_name})

        def in_kafka() -> int:
            return int(consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=30, cached=False)[1])

        try:
            wait_for(lambda: in_kafka() >= 2000, 600, "the first 2000 snapshot rows in Kafka")
            # Rows 1-50 come first in the table: the running snapshot has sent them already.
            source.execute(f'DELETE FROM "{s}".events WHERE id <= 50')
            local_stack.connect.process.stop(sig=signal.SIGKILL)
            sent = in_kafka()
        finally:
            consumer.close()
        assert sent < rows, "the snapshot completed before the kill: nothing was interrupted"
        local_stack.up()
        assert running.wait_until_replica_matches(source, clickhouse, ["events"], timeout=900) == rows - 50
        assert "was interrupted; marking deleted every row" in running.log_path.read_text(errors="replace")


# -- 4. poison records of any shape -------------------------------------------------------------------------------

DATA = Path(__file__).parent / "data" / "debezium"
TEMPLATES = [m for m in json.loads((DATA / "stream_edge_values.json").read_text()) if m["value"] is not None]


class RecordingDeadLetters:
    """Stands in for the DLQ producer (pure bookkeeping): what was dead-lettered, and why."""

    def __init__(self) -> None:
        self.letters: list[tuple[str, int, str]] = []

    def send(self, key: Any, value: Any, reason: str, topic: str, partition: int, offset: int) -> None:
        self.letters.append((topic, offset, reason))

    def flush(self, timeout: float = 60.0) -> None:
        pass


def control_envelope(fields: list[dict[str, Any]], after: dict[str, Any], lsn: int) -> tuple[bytes, bytes]:
    """A create of `public.control` (key `id` bigint) with these value fields and after image."""
    schema = {
        "type": "struct",
        "fields": [
            {"type": "struct", "fields": fields, "optional": True, "field": "before"},
            {"type": "struct", "fields": fields, "optional": True, "field": "after"},
            {"type": "struct", "fields": [], "optional": False, "field": "source"},
            {"type": "string", "optional": False, "field": "op"},
        ],
    }
    source = {"lsn": lsn, "sequence": json.dumps([str(lsn), str(lsn)]), "ts_ms": 1_700_000_000_000}
    payload = {"op": "c", "before": None, "after": after, "source": source}
    key_schema = {"type": "struct", "fields": [{"type": "int64", "optional": False, "field": "id"}]}
    return json.dumps({"schema": key_schema, "payload": {"id": after["id"]}}).encode(), json.dumps(
        {"schema": schema, "payload": payload}
    ).encode()


def control_record(key: int, name: str, lsn: int) -> tuple[bytes, bytes]:
    """A valid change of `public.control` (id bigint, name text)."""
    fields = [
        {"type": "int64", "optional": False, "field": "id"},
        {"type": "string", "optional": True, "field": "name"},
    ]
    return control_envelope(fields, {"id": key, "name": name}, lsn)


def json_paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [path]
    if isinstance(node, dict):
        for key, child in node.items():
            paths += json_paths(child, (*path, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            paths += json_paths(child, (*path, index))
    return paths


def test_any_record_applies_or_is_dead_lettered(spark: Any, clickhouse: Client, unique_name: str) -> None:
    """Property: for random and mutated records (bytes, JSON nodes replaced or removed anywhere in the key,
    the schema or the payload), the batch never fails; valid records of another table in the same batch
    apply exactly; every dead letter has a reason."""
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hypothesis_settings
    from hypothesis import strategies as st

    from cdc_pipeline.config import parse_pipeline_config
    from cdc_pipeline.streaming.apply import ChangeApplier
    from cdc_pipeline.streaming.sink import ClickHouseSink

    database = unique_name
    clickhouse.command(f"CREATE DATABASE IF NOT EXISTS `{database}`")
    pipeline = parse_pipeline_config(
        {
            "name": "cap",
            "tables": [{"name": "public.all_types"}, {"name": "public.control"}],
            "sink": {"clickhouse": {"database": database}},
        }
    )
    dead = RecordingDeadLetters()
    applier = ChangeApplier(pipeline, database, ClickHouseSink(clickhouse), dead, retry_seconds=5)  # type: ignore[arg-type]
    json_values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats()
        | st.text(max_size=30),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
        max_leaves=6,
    )
    counter = iter(range(1_000_000))

    @st.composite
    def mutated(draw: Any) -> tuple[bytes | None, bytes | None]:
        message = json.loads(json.dumps(draw(st.sampled_from(TEMPLATES))))
        kind = draw(st.sampled_from(["bytes", "truncate", "replace", "remove", "replace", "remove"]))
        part = draw(st.sampled_from(["key", "value", "value", "value"]))
        if kind == "bytes":
            message[part] = draw(st.binary(max_size=200))
        elif kind == "truncate":
            text = json.dumps(message[part]).encode()
            message[part] = text[: draw(st.integers(min_value=0, max_value=len(text)))]
        else:
            path = draw(st.sampled_from(json_paths(message[part])[1:] or [()]))
            parent = message[part]
            for step in path[:-1]:
                parent = parent[step]
            if not path:
                message[part] = draw(json_values)
            elif kind == "replace":
                parent[path[-1]] = draw(json_values)
            else:
                del parent[path[-1]]
        return tuple(  # type: ignore[return-value]
            m if isinstance(m, bytes | type(None)) else json.dumps(m).encode()
            for m in (message["key"], message["value"])
        )

    @hypothesis_settings(
        max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
    )
    @given(st.lists(mutated(), min_size=1, max_size=6))
    def batch_never_fails(poison: list[tuple[bytes | None, bytes | None]]) -> None:
        batch_id = next(counter)
        controls = {batch_id * 10 + i: f"control {batch_id}-{i} ✓" for i in range(3)}
        records = [("cap.public.all_types", key, value) for key, value in poison]
        records += [("cap.public.control", *control_record(k, v, 1000 + k)) for k, v in controls.items()]
        rows = [(key, value, topic, 0, batch_id * 100 + offset) for offset, (topic, key, value) in enumerate(records)]
        frame = spark.createDataFrame(rows, "key binary, value binary, topic string, partition int, offset long")
        before = len(dead.letters)
        applier(frame, batch_id)  # must not raise, whatever the records are
        assert all(reason for _, _, reason in dead.letters[before:])
        assert all(topic == "cap.public.all_types" for topic, _, _ in dead.letters[before:])
        found = dict(
            clickhouse.query(
                f"SELECT id, name FROM `{database}`.`public_control` FINAL WHERE id IN %(ids)s",
                parameters={"ids": tuple(controls)},
            ).result_rows
        )
        assert found == controls

    batch_never_fails()
    assert dead.letters, "no mutation was dead-lettered: the generator produced no poison"


def test_a_column_of_an_unsupported_type_added_while_streaming_dead_letters_its_rows(
    settings: Settings, source: psycopg.Connection, clickhouse: Client, unique_name: str, tmp_path: Path
) -> None:
    s = unique_name
    source.execute(f'CREATE SCHEMA "{s}"')
    source.execute(f'CREATE TABLE "{s}".places (id int PRIMARY KEY, name text)')
    source.execute(f'CREATE TABLE "{s}".other (id int PRIMARY KEY, name text)')
    source.execute(f"INSERT INTO \"{s}\".places VALUES (1, 'home')")
    source.execute(f"INSERT INTO \"{s}\".other VALUES (1, 'x')")
    with pipeline_for_schema(settings, s, ["places", "other"], tmp_path) as running:
        running.start_stream()
        running.wait_until_replica_matches(source, clickhouse, ["places", "other"], timeout=300)
        source.execute(f'ALTER TABLE "{s}".places ADD COLUMN loc point')
        source.execute(f"INSERT INTO \"{s}\".places VALUES (2, 'work', point(1, 2))")
        source.execute(f"INSERT INTO \"{s}\".other VALUES (2, 'y')")  # other tables keep flowing
        running.wait_until_replica_matches(source, clickhouse, ["other"], timeout=300)
        letters = wait_for(lambda: dead_letters(settings, running, wait=3), 300, "the dead letter")
        assert running.stream_alive()
        assert len(letters) == 1
        reason = letters[0]["cdc.error"]
        assert "'loc'" in reason and "POINT" in reason and "column.exclude.list" in reason, reason


def test_a_clickhouse_restart_mid_stream_loses_nothing(
    settings: Settings,
    local_stack: LocalStack,
    source: psycopg.Connection,
    clickhouse: Client,
    unique_name: str,
    tmp_path: Path,
) -> None:
    s = unique_name
    items_table(source, s, 100)
    with pipeline_for_schema(settings, s, ["items"], tmp_path, stream={"sink_retry_seconds": 600}) as running:
        running.start_stream()
        running.wait_until_replica_matches(source, clickhouse, ["items"], timeout=300)
        local_stack.clickhouse.process.stop(sig=signal.SIGKILL)  # the server goes away mid-stream
        try:
            source.execute(f"UPDATE \"{s}\".items SET v = 'changed ' || id WHERE id <= 60")
            source.execute(f'DELETE FROM "{s}".items WHERE id > 90')
            wait_for(lambda: "retrying for up to" in running.log_tail(400), 120, "the stream to retry the write")
        finally:
            local_stack.up()
        fresh = connect_clickhouse(
            settings.clickhouse_endpoint, settings.clickhouse_user, settings.clickhouse_password.get_secret_value()
        )
        try:
            assert running.wait_until_replica_matches(source, fresh, ["items"], timeout=300) == 90
        finally:
            fresh.close()
        assert running.stream_alive()
        assert dead_letters(settings, running, wait=5) == []

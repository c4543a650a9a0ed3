"""The four asset checks of a replica table (ClickHouse or warehouse), without Dagster: readings of the
source, the stream's consumer group, the connector and the replica in; one `CheckOutcome` per check out
(passed, severity, description, metadata as plain values). Dagster's check turns each outcome into an
`AssetCheckResult` (defs/assets.py); the demo's summary calls the same checks.

- row_count_matches_source (ERROR): the source's exact row count equals the replica's live rows, or
  differs by no more than the changes still in flight (waiting, bounded, for the stream to catch up);
- no_duplicate_keys (ERROR): no key has two live rows in the replica;
- freshness (WARN): the connector runs and the oldest change the stream has not applied yet is younger
  than the limit;
- no_schema_drift (WARN): every captured source column is in the replica.

The source tables' observations (`source_observations`) are here too: what the observable source assets
report."""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import psycopg
from confluent_kafka import Consumer, TopicPartition

from cdc_pipeline.config import PipelineConfig, TableConfig
from cdc_pipeline.connector import connector_name
from cdc_pipeline.control.lag import LagSnapshot, measure_lag
from cdc_pipeline.control.replicas import Replica
from cdc_pipeline.control.rules import RUNNING, connector_state
from cdc_pipeline.control.source import exact_count, primary_key, source_columns, table_stats, wal_position

ROW_COUNT = "row_count_matches_source"
DUPLICATE_KEYS = "no_duplicate_keys"
FRESHNESS = "freshness"
SCHEMA_DRIFT = "no_schema_drift"
CHECKS = (ROW_COUNT, DUPLICATE_KEYS, FRESHNESS, SCHEMA_DRIFT)
# How long the row-count check lets Debezium capture the changes committed before its source count, when
# the counts differ, before it reads the changes in flight (a steady write load never lets them meet).
IN_FLIGHT_SETTLE_S = 5.0
# With zero lag a change may still be between the WAL and Kafka: the row-count check waits this long at most.
ZERO_LAG_GRACE_S = 15.0
MEASURE_PAUSE_S = 3.0
# Observations count rows exactly in tables below this size (a scan of at most this much); above it,
# they report the planner's estimate only.
EXACT_COUNT_BYTES = 1 << 30

Severity = Literal["ERROR", "WARN"]


@dataclass(frozen=True)
class Json:
    """A metadata value shown as JSON."""

    value: Any


@dataclass(frozen=True)
class Markdown:
    """A metadata value shown as Markdown."""

    text: str


@dataclass(frozen=True)
class CheckOutcome:
    """One check's verdict; metadata values are str, int, float, bool, `Json` or `Markdown`."""

    check_name: str
    passed: bool
    severity: Severity = "ERROR"
    description: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.check_name}: {'passed' if self.passed else 'FAILED'}"


class ConnectorStatuses(Protocol):
    """What the checks and `wait_connector_running` ask of Kafka Connect: a connector's status answer."""

    def connector_status(self, name: str) -> dict[str, Any]: ...


# --- the verdicts, from readings ---------------------------------------------------------------------------


def in_flight_changes(lag: LagSnapshot, later: LagSnapshot) -> int:
    """The changes in flight at `lag`'s reading: its lag, plus what Debezium captured between it and `later`."""
    captured = sum(p.end_offset for p in later.partitions) - sum(p.end_offset for p in lag.partitions)
    return lag.total + max(0, captured)


def row_count_outcome(source_rows: int, replica_rows: int, lag: int, in_flight: int) -> CheckOutcome:
    """Counts that differ pass only while the changes in flight can explain the difference."""
    difference = source_rows - replica_rows
    explained = in_flight > 0 and abs(difference) <= in_flight
    note = (
        "equal" if difference == 0
        else f"differs by {difference}, within the {in_flight} changes not applied yet" if explained
        else f"differs by {difference} with {in_flight} changes in flight: rows were lost or changed behind "
        "the pipeline's back; run the reconcile job (it can backfill the differences)"
    )  # fmt: skip
    return CheckOutcome(
        ROW_COUNT, passed=difference == 0 or explained, severity="ERROR", description=note,
        metadata={"source_rows": source_rows, "replica_rows": replica_rows, "difference": difference,
                  "consumer_lag": lag, "changes_in_flight": in_flight,
                  "explained_by_lag": explained and difference != 0},
    )  # fmt: skip


def duplicate_keys_outcome(keys: list[str], duplicates: list[tuple[Any, ...]]) -> CheckOutcome:
    return CheckOutcome(
        DUPLICATE_KEYS, passed=not duplicates, severity="ERROR",
        metadata={"duplicate_keys": len(duplicates), "key": ", ".join(keys),
                  "examples": Json([list(map(str, d)) for d in duplicates])},
    )  # fmt: skip


@dataclass(frozen=True)
class FreshnessReading:
    newest_applied: Any  # the replica's newest source timestamp (None: no row yet)
    capture: str  # RUNNING, or what the connector is
    pending: int  # changes the stream has not applied yet
    oldest_pending_age_s: float  # how long the oldest of them has waited (0 when none)
    retained_wal_bytes: int | None  # WAL the pipeline's slot retains (None: no slot)


def freshness_outcome(reading: FreshnessReading, max_age_s: float) -> CheckOutcome:
    age = reading.oldest_pending_age_s
    fresh = age <= max_age_s and reading.capture == RUNNING
    if reading.capture != RUNNING:
        description = f"the connector is {reading.capture}: source changes are not being captured"
    elif reading.pending:
        description = (
            f"{reading.pending} changes wait, the oldest for {age:.0f} s "
            f"(limit {max_age_s:.0f} s): is the stream running?"
        )
    else:
        description = "every captured change is applied"
    return CheckOutcome(
        FRESHNESS, passed=fresh, severity="WARN", description=description,
        metadata={"newest_applied_change": str(reading.newest_applied) if reading.newest_applied else "none",
                  "pending_changes": reading.pending, "oldest_pending_age_s": round(age, 1), "max_age_s": max_age_s,
                  "connector": reading.capture, "slot_retained_wal_bytes": reading.retained_wal_bytes or 0},
    )  # fmt: skip


def schema_drift_outcome(source: list[str], replica: list[str], ddl: str) -> CheckOutcome:
    missing = [c for c in source if c not in replica]
    extra = [c for c in replica if c not in source]
    return CheckOutcome(
        SCHEMA_DRIFT, passed=not missing, severity="WARN",
        description=(
            "every captured source column is in the replica" if not missing
            else f"source columns {missing} are not in the replica yet: added columns appear with their "
            "first change; backfill the table to fill them now"
        ),
        metadata={"source_columns": len(source), "replica_columns": len(replica),
                  "missing_in_replica": Json(missing), "only_in_replica": Json(extra),
                  "ddl": Markdown(f"```sql\n{ddl}\n```")},
    )  # fmt: skip


# --- the readings ------------------------------------------------------------------------------------------


class TableReadings(Protocol):
    """What the checks read about one table outside its replica: the source, the stream's group, the connector."""

    def primary_key(self) -> list[str]: ...
    def source_columns(self) -> list[str]: ...
    def source_count(self) -> int: ...
    def lag(self) -> LagSnapshot: ...
    def capture_state(self) -> str: ...
    def oldest_pending_ts(self, committed: int | None) -> float | None: ...
    def retained_wal_bytes(self) -> int | None: ...


def capture_state(connect: ConnectorStatuses, pipeline: PipelineConfig) -> str:
    """RUNNING when the connector and every task run; otherwise what they are (or why unknown)."""
    try:
        status = connect.connector_status(connector_name(pipeline))
    except Exception as exc:
        return f"unknown ({str(exc).splitlines()[0][:120]})"
    return connector_state(status)


def oldest_pending_ts(consumer: Consumer, topic: str, committed: int | None) -> float | None:
    """Timestamp (epoch s) of the first record of `topic` after `committed` (None: from the start), read
    with `consumer` (a group of its own: it only assigns, never commits)."""
    consumer.assign([TopicPartition(topic, 0, committed if committed is not None else -2)])
    message = consumer.poll(10.0)
    if message is None or message.error():
        return None
    _kind, ts_ms = message.timestamp()
    return ts_ms / 1000 if ts_ms > 0 else None


class LiveReadings:
    """`TableReadings` of the running pipeline: a source connection, Kafka consumers made by `consumer(group)`
    (closed after each use) and Kafka Connect."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        pipeline: PipelineConfig,
        table: TableConfig,
        consumer: Callable[[str], Consumer],
        connect: ConnectorStatuses,
    ) -> None:
        self.conn, self.pipeline, self.table = conn, pipeline, table
        self.consumer, self.connect = consumer, connect
        self.topic = pipeline.topic_for(table)

    @contextmanager
    def _consumer(self, group: str) -> Iterator[Consumer]:
        consumer = self.consumer(group)
        try:
            yield consumer
        finally:
            consumer.close()

    def primary_key(self) -> list[str]:
        return primary_key(self.conn, self.table)

    def source_columns(self) -> list[str]:
        return source_columns(self.conn, self.table)

    def source_count(self) -> int:
        return exact_count(self.conn, self.table)

    def lag(self) -> LagSnapshot:
        with self._consumer(self.pipeline.consumer_group) as consumer:  # never subscribes: committed offsets only
            return measure_lag(consumer, [self.topic])

    def capture_state(self) -> str:
        return capture_state(self.connect, self.pipeline)

    def oldest_pending_ts(self, committed: int | None) -> float | None:
        with self._consumer(f"{self.pipeline.consumer_group}-freshness-probe") as consumer:
            return oldest_pending_ts(consumer, self.topic, committed)

    def retained_wal_bytes(self) -> int | None:
        retained: int | None = wal_position(self.conn, self.pipeline)["slot_retained_wal_bytes"]
        return retained


# --- the checks ---------------------------------------------------------------------------------------------


def replica_checks(
    readings: TableReadings,
    replica: Replica,
    *,
    check_wait_s: float,
    freshness_max_age_s: float,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
    now: Callable[[], float] = time.time,
) -> list[CheckOutcome]:
    """The four checks of one replica table, in the order of `CHECKS`."""
    keys = readings.primary_key()
    columns = readings.source_columns()
    exists = False

    def measure() -> tuple[int, int, LagSnapshot]:
        nonlocal exists
        # The source first, then the stream's position, then the replica: a row of the source count that the
        # replica lacks is then behind the offsets committed at the lag's reading, or still on its way from the
        # WAL to Kafka (see in_flight below).
        source_count = readings.source_count()
        lag = readings.lag()
        exists = replica.exists()
        return source_count, replica.live_count() if exists else 0, lag

    # Counts agree only when nothing is in flight: wait (bounded) for the stream to catch up.
    deadline = monotonic() + check_wait_s
    source_count, sink_count, snapshot = measure()
    grace = monotonic() + min(ZERO_LAG_GRACE_S, check_wait_s)
    while source_count != sink_count and monotonic() < (deadline if snapshot.total else grace):
        sleep(MEASURE_PAUSE_S)
        source_count, sink_count, snapshot = measure()
    in_flight = snapshot.total
    if source_count != sink_count:
        # Under a steady write load the counts never meet: the changes in flight at the source count are the
        # lag plus those Debezium captured since (they were committed before it, or are newer ones the replica
        # may already hold), read once the capture has had time to catch up.
        sleep(IN_FLIGHT_SETTLE_S)
        in_flight = in_flight_changes(snapshot, readings.lag())
    outcomes = [row_count_outcome(source_count, sink_count, snapshot.total, in_flight)]

    outcomes.append(duplicate_keys_outcome(keys, replica.duplicate_keys(keys) if exists and keys else []))

    newest = replica.newest_source_ts() if exists else None
    capture = readings.capture_state()
    lag_now = readings.lag()
    committed = lag_now.partitions[0].committed if lag_now.partitions else None
    oldest = readings.oldest_pending_ts(committed) if lag_now.total else None
    age = (now() - oldest) if oldest else 0.0
    reading = FreshnessReading(newest, capture, lag_now.total, age, readings.retained_wal_bytes())
    outcomes.append(freshness_outcome(reading, freshness_max_age_s))

    replica_columns = replica.columns() if exists else []
    outcomes.append(schema_drift_outcome(columns, replica_columns, replica.ddl() if exists else "(not created yet)"))
    return outcomes


def source_observations(
    conn: psycopg.Connection[Any], pipeline: PipelineConfig, names: Container[str] | None = None
) -> Iterator[tuple[TableConfig, dict[str, Any]]]:
    """Per table of `pipeline` (only those in `names` when given): its statistics, an exact row count when the
    table is below `EXACT_COUNT_BYTES`, and the server's WAL position with the pipeline's slot."""
    wal = wal_position(conn, pipeline)
    for table in pipeline.tables:
        if names is not None and table.name not in names:
            continue
        stats = table_stats(conn, table)
        if stats["exists"] and stats["total_bytes"] < EXACT_COUNT_BYTES:
            stats["row_count"] = exact_count(conn, table)  # cheap enough to be exact
        yield table, {**stats, **wal}

"""The pipeline as assets: observable source tables, the connector (materialized by provisioning),
the Kafka topics, the streaming query and the ClickHouse replicas with their asset checks."""

import time
import warnings
from contextlib import ExitStack
from typing import Any

from confluent_kafka import TopicPartition
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AutomationCondition,
    BetaWarning,
    Failure,
    MaterializeResult,
    MetadataValue,
    ObserveResult,
    multi_asset,
    multi_asset_check,
    multi_observable_source_asset,
)

from cdc_pipeline.config import PipelineConfig, TableConfig
from cdc_pipeline.connector import connector_name, prepare_source, provision_connector
from cdc_pipeline.control.lag import LagSnapshot, measure_lag
from cdc_pipeline.control.replicas import ClickHouseReplica, Replica, WarehouseReplica
from cdc_pipeline.control.rules import RUNNING, connector_running, connector_state
from cdc_pipeline.control.source import (
    check_source,
    exact_count,
    primary_key,
    source_columns,
    table_stats,
    wal_position,
)
from cdc_pipeline.defs.common import database_of, group_consumer, source_settings
from cdc_pipeline.defs.translator import CdcTranslator, mask_secrets
from cdc_pipeline.resources import (
    ClickHouseResource,
    ControlPlaneResource,
    KafkaConnectResource,
    KafkaResource,
    MonitorResource,
    PostgresResource,
)
from cdc_pipeline.resources.connect import ConnectError
from cdc_pipeline.topics import TopicError, ensure_topics

# Observations count rows exactly in tables below this size (a scan of at most this much); above it,
# they report the planner's estimate only.
EXACT_COUNT_BYTES = 1 << 30
CHECKS = ("row_count_matches_source", "no_duplicate_keys", "freshness", "no_schema_drift")
# How long the row-count check lets Debezium capture the changes committed before its source count, when
# the counts differ, before it reads the changes in flight (a steady write load never lets them meet).
IN_FLIGHT_SETTLE_S = 5.0


def wait_connector_running(connect: KafkaConnectResource, name: str, timeout: float = 120.0) -> dict[str, Any]:
    """The connector's status once it and its tasks run; Failure with the task's error if one fails."""
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            status = connect.connector_status(name)
        except ConnectError as exc:  # just created: the status appears after the first assignment
            if not str(exc).startswith("404 "):
                raise
            time.sleep(2)
            continue
        failed = [t for t in status.get("tasks", []) if t["state"] == "FAILED"]
        if status["connector"]["state"] == "FAILED" or failed:
            trace = (failed[0] if failed else status["connector"]).get("trace", "")
            raise Failure(f"connector {name} failed: {trace.splitlines()[0] if trace else 'no trace'}")
        if connector_running(status):
            return status
        time.sleep(2)
    raise Failure(f"connector {name} not RUNNING after {timeout:.0f} s: {status}")


def build_assets(pipeline: PipelineConfig, translator: CdcTranslator) -> list[Any]:
    prefix = pipeline.name
    source_specs = {t.name: translator.source_spec(t) for t in pipeline.tables}

    def observe_source_tables(control_plane: ControlPlaneResource, postgres: PostgresResource):  # noqa: ANN202
        config = control_plane.load()
        with postgres.connect(autocommit=True) as conn:
            wal = wal_position(conn, config)
            for table in config.tables:
                if table.name not in source_specs:
                    continue
                stats = table_stats(conn, table)
                if stats["exists"] and stats["total_bytes"] < EXACT_COUNT_BYTES:
                    stats["row_count"] = exact_count(conn, table)  # cheap enough to be exact
                yield ObserveResult(asset_key=source_specs[table.name].key, metadata={**stats, **wal})

    # Several observable source assets observed in one step: a beta API, used on purpose; its warning only.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*`multi_observable_source_asset` is currently in beta", category=BetaWarning
        )
        observe_source_tables = multi_observable_source_asset(
            specs=list(source_specs.values()), name=f"{prefix}_observe_sources"
        )(translator.with_resource_keys(observe_source_tables))

    @multi_asset(specs=[translator.connector_spec()], name=f"{prefix}_provision_connector")
    @translator.with_resource_keys
    def provision(
        context: AssetExecutionContext,
        control_plane: ControlPlaneResource,
        postgres: PostgresResource,
        kafka_connect: KafkaConnectResource,
        kafka: KafkaResource,
    ) -> MaterializeResult:
        """Check the source, create the signal/heartbeat tables and the missing topics, then create or
        update the connector."""
        config = control_plane.load()
        created = prepare_source(postgres.conninfo(), config)
        for line in created:
            context.log.info(line)
        with postgres.connect(autocommit=True) as conn:
            checks = check_source(conn, config)
        for check in checks:
            (context.log.info if check.ok else context.log.error)(check.line())
        report = MetadataValue.md("\n".join(f"- {c.line()}" for c in checks))
        failed = [c for c in checks if not c.ok]
        if failed:
            raise Failure(
                description="source checks failed: " + "; ".join(c.line() for c in failed),
                metadata={"source_checks": report},
            )
        try:
            topics = ensure_topics(kafka.client_settings(), config)
        except TopicError as exc:
            raise Failure(description=str(exc)) from None
        for line in topics.lines():
            (context.log.warning if line.startswith("warning") else context.log.info)(line)
        stored = provision_connector(
            kafka_connect, config, source_settings(postgres), kafka_config=kafka.client_settings()
        )
        name = connector_name(config)
        status = wait_connector_running(kafka_connect, name)
        return MaterializeResult(
            metadata={
                "connector": name, "state": status["connector"]["state"], "tasks": len(status["tasks"]),
                "worker": status["connector"].get("worker_id", ""), "source_checks": report,
                "created": MetadataValue.json(created), "config": MetadataValue.json(mask_secrets(stored)),
                "topics_created": MetadataValue.json(topics.created),
                "topic_warnings": MetadataValue.json(topics.warnings),
            }
        )  # fmt: skip

    assets: list[Any] = [observe_source_tables, provision]
    assets += [translator.topic_spec(t) for t in pipeline.tables]
    assets.append(translator.stream_spec())
    assets += [translator.sink_spec(t) for t in pipeline.tables if "clickhouse" in t.sinks]
    assets += [translator.warehouse_spec(t) for t in pipeline.tables if "warehouse" in t.sinks]
    return assets


def _oldest_pending_ts(
    kafka: KafkaResource, pipeline: PipelineConfig, topic: str, committed: int | None
) -> float | None:
    """Timestamp (epoch s) of the first record of `topic` the stream has not applied yet."""
    consumer = kafka.consumer(f"{pipeline.consumer_group}-freshness-probe")
    try:
        consumer.assign([TopicPartition(topic, 0, committed if committed is not None else -2)])
        message = consumer.poll(10.0)
        if message is None or message.error():
            return None
        kind, ts_ms = message.timestamp()
        return ts_ms / 1000 if ts_ms > 0 else None
    finally:
        consumer.close()


def _capture_state(connect: KafkaConnectResource, config: PipelineConfig) -> str:
    """RUNNING when the connector and every task run; otherwise what they are (or why unknown)."""
    try:
        status = connect.connector_status(connector_name(config))
    except Exception as exc:
        return f"unknown ({str(exc).splitlines()[0][:120]})"
    return connector_state(status)


def table_checks(
    table: TableConfig,
    config: PipelineConfig,
    postgres: PostgresResource,
    kafka: KafkaResource,
    kafka_connect: KafkaConnectResource,
    replica: Replica,
    monitor: MonitorResource,
    key: Any,
    log: Any,
) -> list[AssetCheckResult]:
    """The four checks of one replica table (ClickHouse or warehouse), with their numbers as metadata."""
    topic = config.topic_for(table)
    results: list[AssetCheckResult] = []
    exists = False
    with postgres.connect(autocommit=True) as conn:
        keys = primary_key(conn, table)
        columns = source_columns(conn, table)

        def measure() -> tuple[int, int, LagSnapshot]:
            nonlocal exists
            # The source first, then the stream's position, then the replica: a row of the source count
            # that the replica lacks is then behind the offsets committed at the lag's reading, or
            # still on its way from the WAL to Kafka (see in_flight below).
            source_count = exact_count(conn, table)
            with group_consumer(kafka, config) as consumer:
                lag = measure_lag(consumer, [topic])
            exists = replica.exists()
            sink_count = replica.live_count() if exists else 0
            return source_count, sink_count, lag

        # Counts agree only when nothing is in flight: wait (bounded) for the stream to catch up.
        deadline = time.monotonic() + monitor.check_wait_s
        source_count, sink_count, snapshot = measure()
        # With zero lag a change may still be between the WAL and Kafka: a short grace period only.
        grace = time.monotonic() + min(15.0, monitor.check_wait_s)
        while source_count != sink_count and time.monotonic() < (deadline if snapshot.total else grace):
            time.sleep(3)
            source_count, sink_count, snapshot = measure()
        difference = source_count - sink_count
        lag = snapshot.total
        in_flight = lag
        if difference:
            # Under a steady write load the counts never meet: the changes in flight at the source count
            # are the lag plus those Debezium captured since (they were committed before it, or are
            # newer ones the replica may already hold), read once the capture has had time to catch up.
            time.sleep(IN_FLIGHT_SETTLE_S)
            with group_consumer(kafka, config) as consumer:
                later = measure_lag(consumer, [topic])
            captured = sum(p.end_offset for p in later.partitions) - sum(p.end_offset for p in snapshot.partitions)
            in_flight = lag + max(0, captured)
        explained = in_flight > 0 and abs(difference) <= in_flight
        passed = difference == 0 or explained
        note = (
            "equal" if difference == 0
            else f"differs by {difference}, within the {in_flight} changes not applied yet" if explained
            else f"differs by {difference} with {in_flight} changes in flight: rows were lost or changed behind "
            "the pipeline's back; run the reconcile job (it can backfill the differences)"
        )  # fmt: skip
        results.append(
            AssetCheckResult(
                asset_key=key, check_name="row_count_matches_source", passed=passed,
                severity=AssetCheckSeverity.ERROR,
                description=note,
                metadata={"source_rows": source_count, "replica_rows": sink_count, "difference": difference,
                          "consumer_lag": lag, "changes_in_flight": in_flight,
                          "explained_by_lag": explained and difference != 0},
            )
        )  # fmt: skip

        duplicates = replica.duplicate_keys(keys) if exists and keys else []
        results.append(
            AssetCheckResult(
                asset_key=key, check_name="no_duplicate_keys", passed=not duplicates,
                metadata={"duplicate_keys": len(duplicates), "key": ", ".join(keys),
                          "examples": MetadataValue.json([list(map(str, d)) for d in duplicates])},
            )
        )  # fmt: skip

        newest = replica.newest_source_ts() if exists else None
        capture = _capture_state(kafka_connect, config)
        with group_consumer(kafka, config) as consumer:
            lag_now = measure_lag(consumer, [topic])
        pending = lag_now.total
        committed = lag_now.partitions[0].committed if lag_now.partitions else None
        oldest_pending = _oldest_pending_ts(kafka, config, topic, committed) if pending else None
        age = (time.time() - oldest_pending) if oldest_pending else 0.0
        newest_text = str(newest) if newest else "none"
        wal = wal_position(conn, config)
        fresh = age <= monitor.freshness_max_age_s and capture == RUNNING
        if capture != RUNNING:
            description = f"the connector is {capture}: source changes are not being captured"
        elif pending:
            description = (
                f"{pending} changes wait, the oldest for {age:.0f} s "
                f"(limit {monitor.freshness_max_age_s:.0f} s): is the stream running?"
            )
        else:
            description = "every captured change is applied"
        results.append(
            AssetCheckResult(
                asset_key=key, check_name="freshness", passed=fresh, severity=AssetCheckSeverity.WARN,
                description=description,
                metadata={"newest_applied_change": newest_text, "pending_changes": pending,
                          "oldest_pending_age_s": round(age, 1), "max_age_s": monitor.freshness_max_age_s,
                          "connector": capture, "slot_retained_wal_bytes": wal["slot_retained_wal_bytes"] or 0},
            )
        )  # fmt: skip

        sink_columns = replica.columns() if exists else []
        missing = [c for c in columns if c not in sink_columns]
        extra = [c for c in sink_columns if c not in columns]
        ddl = replica.ddl() if exists else "(not created yet)"
        results.append(
            AssetCheckResult(
                asset_key=key, check_name="no_schema_drift", passed=not missing,
                severity=AssetCheckSeverity.WARN,
                description=(
                    "every captured source column is in the replica" if not missing
                    else f"source columns {missing} are not in the replica yet: added columns appear with their "
                    "first change; backfill the table to fill them now"
                ),
                metadata={"source_columns": len(columns), "replica_columns": len(sink_columns),
                          "missing_in_replica": MetadataValue.json(missing),
                          "only_in_replica": MetadataValue.json(extra),
                          "ddl": MetadataValue.md(f"```sql\n{ddl}\n```")},
            )
        )  # fmt: skip
    log.info("; ".join(f"{r.check_name}: {'passed' if r.passed else 'FAILED'}" for r in results))
    return results


def checks_automation(cron: str) -> AutomationCondition:
    """Run the checks at every tick of `cron` (UTC), unless a run of them is still in progress."""
    return (
        AutomationCondition.cron_tick_passed(cron, cron_timezone="UTC") & ~AutomationCondition.in_progress()
    ).with_label(f"on cron {cron} (UTC)")


def build_checks(pipeline: PipelineConfig, translator: CdcTranslator, cron: str | None = None) -> list[Any]:
    """The four checks of each replica; with `cron`, Dagster runs them by itself at its ticks."""
    condition = checks_automation(cron) if cron else None
    checks = []
    for table in pipeline.tables:
        for sink in table.sinks:
            key = translator.sink_key(table) if sink == "clickhouse" else translator.warehouse_key(table)
            checks.append(_replica_check(translator, table, sink, key, condition))
    return checks


def _replica_check(
    translator: CdcTranslator, table: TableConfig, sink: str, key: Any, condition: AutomationCondition | None
) -> Any:
    pipeline = translator.pipeline
    specs = [AssetCheckSpec(name, asset=key, automation_condition=condition) for name in CHECKS]
    suffix = "" if sink == "clickhouse" else f"_{sink}"

    @multi_asset_check(specs=specs, name=f"{pipeline.name}_{pipeline.sink_table(table)}{suffix}_checks")
    @translator.with_resource_keys
    def check_replica(
        context: AssetCheckExecutionContext,
        control_plane: ControlPlaneResource,
        postgres: PostgresResource,
        kafka: KafkaResource,
        kafka_connect: KafkaConnectResource,
        clickhouse: ClickHouseResource,
        warehouse: PostgresResource,
        monitor: MonitorResource,
    ):  # noqa: ANN202
        config = control_plane.load()
        current = config.table(table.name)
        name = config.sink_table(current)
        database = database_of(config, clickhouse)
        with ExitStack() as stack:
            if sink == "clickhouse":
                client = clickhouse.client()
                stack.callback(client.close)
                replica: Replica = ClickHouseReplica(client, database, name)
            else:
                replica = WarehouseReplica(stack.enter_context(warehouse.connect(autocommit=True)), database, name)
            yield from table_checks(current, config, postgres, kafka, kafka_connect, replica, monitor, key, context.log)

    return check_replica

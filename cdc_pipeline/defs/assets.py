"""The pipeline as assets: observable source tables, the connector (materialized by provisioning),
the Kafka topics, the streaming query and the ClickHouse replicas with their asset checks. What the
observations and checks read and decide is in control/checks.py; here they only gather the resources and
turn its outcomes into Dagster results."""

import warnings
from contextlib import ExitStack
from typing import Any

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
from cdc_pipeline.control.checks import (
    CHECKS,
    CheckOutcome,
    Json,
    LiveReadings,
    Markdown,
    replica_checks,
    source_observations,
)
from cdc_pipeline.control.provision import ConnectorFailed, SourceChecksFailed, wait_connector_running
from cdc_pipeline.control.provision import provision as provision_source_and_connector
from cdc_pipeline.control.replicas import ClickHouseReplica, Replica, WarehouseReplica
from cdc_pipeline.control.source import SourceCheck
from cdc_pipeline.defs.common import database_of, source_settings
from cdc_pipeline.defs.translator import CdcTranslator, mask_secrets
from cdc_pipeline.resources import (
    ClickHouseResource,
    ControlPlaneResource,
    KafkaConnectResource,
    KafkaResource,
    MonitorResource,
    PostgresResource,
)
from cdc_pipeline.topics import TopicError


def check_result(outcome: CheckOutcome, key: Any) -> AssetCheckResult:
    """Dagster's result of a check's outcome (its `Json`/`Markdown` metadata as Dagster metadata values)."""
    metadata = {
        name: MetadataValue.json(value.value) if isinstance(value, Json)
        else MetadataValue.md(value.text) if isinstance(value, Markdown)
        else value
        for name, value in outcome.metadata.items()
    }  # fmt: skip
    return AssetCheckResult(
        asset_key=key, check_name=outcome.check_name, passed=outcome.passed,
        severity=AssetCheckSeverity(outcome.severity), description=outcome.description, metadata=metadata,
    )  # fmt: skip


def _checks_md(checks: list[SourceCheck]) -> MetadataValue:
    return MetadataValue.md("\n".join(f"- {c.line()}" for c in checks))


def build_assets(pipeline: PipelineConfig, translator: CdcTranslator) -> list[Any]:
    prefix = pipeline.name
    source_specs = {t.name: translator.source_spec(t) for t in pipeline.tables}

    def observe_source_tables(control_plane: ControlPlaneResource, postgres: PostgresResource):  # noqa: ANN202
        pipeline = control_plane.load()
        with postgres.connect(autocommit=True) as conn:
            for table, metadata in source_observations(conn, pipeline, source_specs):
                yield ObserveResult(asset_key=source_specs[table.name].key, metadata=metadata)

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
        update the connector and wait until it runs (control/provision.py)."""
        levels = {"failed": context.log.error, "warning": context.log.warning}
        try:
            done = provision_source_and_connector(
                control_plane.load(), conninfo=postgres.conninfo(), connect=kafka_connect.client(),
                settings=source_settings(postgres), kafka_config=kafka.client_settings(),
                log=lambda level, line: levels.get(level, context.log.info)(line),
            )  # fmt: skip
            status = wait_connector_running(kafka_connect, done.connector)
        except SourceChecksFailed as exc:
            raise Failure(
                description="source checks failed: " + "; ".join(c.line() for c in exc.failed),
                metadata={"source_checks": _checks_md(exc.checks)},
            ) from None
        except (TopicError, ConnectorFailed) as exc:
            raise Failure(description=str(exc)) from None
        return MaterializeResult(
            metadata={
                "connector": done.connector, "state": status["connector"]["state"], "tasks": len(status["tasks"]),
                "worker": status["connector"].get("worker_id", ""), "source_checks": _checks_md(done.checks),
                "created": MetadataValue.json(done.created), "config": MetadataValue.json(mask_secrets(done.config)),
                "topics_created": MetadataValue.json(done.topics.created),
                "topic_warnings": MetadataValue.json(done.topics.warnings),
            }
        )  # fmt: skip

    assets: list[Any] = [observe_source_tables, provision]
    assets += [translator.topic_spec(t) for t in pipeline.tables]
    assets.append(translator.stream_spec())
    assets += [translator.sink_spec(t) for t in pipeline.tables if "clickhouse" in t.sinks]
    assets += [translator.warehouse_spec(t) for t in pipeline.tables if "warehouse" in t.sinks]
    return assets


def table_checks(
    table: TableConfig,
    pipeline: PipelineConfig,
    postgres: PostgresResource,
    kafka: KafkaResource,
    kafka_connect: KafkaConnectResource,
    replica: Replica,
    monitor: MonitorResource,
    key: Any,
    log: Any,
) -> list[AssetCheckResult]:
    """The four checks of one replica table (ClickHouse or warehouse), with their numbers as metadata."""
    with postgres.connect(autocommit=True) as conn:
        readings = LiveReadings(conn, pipeline, table, kafka.consumer, kafka_connect)
        outcomes = replica_checks(
            readings, replica, check_wait_s=monitor.check_wait_s, freshness_max_age_s=monitor.freshness_max_age_s
        )
    log.info("; ".join(outcome.line() for outcome in outcomes))
    return [check_result(outcome, key) for outcome in outcomes]


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
        pipeline = control_plane.load()
        current = pipeline.table(table.name)
        name = pipeline.sink_table(current)
        database = database_of(pipeline, clickhouse)
        with ExitStack() as stack:
            if sink == "clickhouse":
                client = clickhouse.client()
                stack.callback(client.close)
                replica: Replica = ClickHouseReplica(client, database, name)
            else:
                replica = WarehouseReplica(stack.enter_context(warehouse.connect(autocommit=True)), database, name)
            yield from table_checks(
                current, pipeline, postgres, kafka, kafka_connect, replica, monitor, key, context.log
            )

    return check_replica

"""A job that asks every external system a real question and reports the answers."""

from collections.abc import Callable
from typing import Any

from dagster import Failure, JobDefinition, MetadataValue, OpExecutionContext, job, op

from cdc_pipeline.defs.translator import CdcTranslator
from cdc_pipeline.resources import (
    ClickHouseResource,
    KafkaConnectResource,
    KafkaResource,
    PostgresResource,
    SparkResource,
)


def probe_services(
    context: OpExecutionContext,
    postgres: PostgresResource,
    kafka: KafkaResource,
    kafka_connect: KafkaConnectResource,
    spark: SparkResource,
    clickhouse: ClickHouseResource,
) -> None:
    results = {
        "postgres": postgres.health(),
        "kafka": kafka.health(),
        "kafka_connect": kafka_connect.health(),
        "spark": spark.health(),
        "clickhouse": clickhouse.health(),
    }
    metadata = {name: MetadataValue.text(("ok: " if r.ok else "FAILED: ") + r.detail) for name, r in results.items()}
    context.log.info("\n".join(f"{name}: {'ok' if r.ok else 'FAILED'} - {r.detail}" for name, r in results.items()))
    failed = [name for name, r in results.items() if not r.ok]
    if failed:
        raise Failure(description=f"Unhealthy: {', '.join(failed)}", metadata=metadata)


def build_check_services(translator: CdcTranslator | None = None) -> JobDefinition:
    """check_services, probing the resources of `translator`'s pipeline (default: the plain resource keys)."""
    name: Callable[[str], str] = translator.name if translator else (lambda base: base)
    scoped: Callable[[Any], Any] = translator.with_resource_keys if translator else (lambda fn: fn)
    probe = op(
        name=name("probe_services"),
        description="Probe PostgreSQL, Kafka, Kafka Connect, Spark and ClickHouse in their own protocols.",
    )(scoped(probe_services))

    @job(name=name("check_services"), description="Check that every system the pipeline depends on answers.")
    def check_services() -> None:
        probe()

    return check_services


check_services = build_check_services()

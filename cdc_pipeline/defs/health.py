"""A job that asks every external system a real question and reports the answers."""

from dagster import Failure, MetadataValue, OpExecutionContext, job, op

from cdc_pipeline.resources import (
    ClickHouseResource,
    KafkaConnectResource,
    KafkaResource,
    PostgresResource,
    SparkResource,
)


@op(description="Probe PostgreSQL, Kafka, Kafka Connect, Spark and ClickHouse in their own protocols.")
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


@job(description="Check that every system the pipeline depends on answers.")
def check_services() -> None:
    probe_services()

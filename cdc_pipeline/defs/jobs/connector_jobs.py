"""pause_connector and resume_connector: the Debezium connector through the Kafka Connect resource."""

from dagster import JobDefinition, OpExecutionContext, job, op

from cdc_pipeline.connector import connector_name
from cdc_pipeline.defs.translator import CdcTranslator
from cdc_pipeline.resources import ControlPlaneResource, KafkaConnectResource


def build_connector_jobs(translator: CdcTranslator) -> list[JobDefinition]:
    """pause_connector and resume_connector."""

    @op(
        name=translator.name("pause_connector_op"),
        description="Pause the Debezium connector (changes accumulate in the slot's WAL until resumed).",
    )
    @translator.with_resource_keys
    def pause_connector_op(
        context: OpExecutionContext, control_plane: ControlPlaneResource, kafka_connect: KafkaConnectResource
    ) -> None:
        name = connector_name(control_plane.load())
        kafka_connect.pause(name)
        context.log.info(
            f"paused {name}; PostgreSQL retains WAL for slot until it resumes: do not leave it paused long"
        )

    @op(name=translator.name("resume_connector_op"), description="Resume the Debezium connector.")
    @translator.with_resource_keys
    def resume_connector_op(
        context: OpExecutionContext, control_plane: ControlPlaneResource, kafka_connect: KafkaConnectResource
    ) -> None:
        name = connector_name(control_plane.load())
        kafka_connect.resume(name)
        context.log.info(f"resumed {name}")

    @job(name=translator.name("pause_connector"), description="Pause the Debezium connector.")
    def pause_connector() -> None:
        pause_connector_op()

    @job(name=translator.name("resume_connector"), description="Resume the Debezium connector.")
    def resume_connector() -> None:
        resume_connector_op()

    return [pause_connector, resume_connector]

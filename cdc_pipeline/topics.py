"""The Kafka topics of a pipeline, created up front: one per captured table, the DLQ and Debezium's
notification topic.

Debezium creates a table's topic only with its first record, so an empty table (or one just added to
`pipeline.yaml`) would have no topic, and a stream subscribed to it fails after a minute of
`UnknownTopicOrPartition`. Provisioning and the stream's start therefore create every missing topic
with what the pipeline needs: one partition (the stream relies on one partition per table topic for
commit order), `cleanup.policy=delete` and no time or size limit (`retention.ms=-1`,
`retention.bytes=-1`), so a change is never deleted before the stream applied it. `source.topic_config`
in `pipeline.yaml` overrides or adds topic configs for newly created topics.

Only confluent-kafka: the Spark application uses this module too (nothing from Dagster here)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from cdc_pipeline.config import PipelineConfig

# Never lose a change the stream has not applied yet: no time or size limit, no compaction.
DEFAULT_TOPIC_CONFIG = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}


class TopicError(RuntimeError):
    """A pipeline topic cannot be created or has a layout the pipeline cannot work with."""


@dataclass(frozen=True)
class TopicReport:
    created: list[str]
    existing: list[str]
    warnings: list[str]

    def lines(self) -> list[str]:
        return [f"created topic {t}" for t in self.created] + [f"warning: {w}" for w in self.warnings]


def pipeline_topics(pipeline: PipelineConfig) -> list[str]:
    """Every topic the pipeline reads or writes: the table topics, the DLQ, Debezium's notifications."""
    return [*pipeline.topics(), pipeline.dlq_topic, pipeline.notification_topic]


def topic_config(pipeline: PipelineConfig) -> dict[str, str]:
    """The configs of topics the pipeline creates: the defaults above, then `source.topic_config`."""
    return {**DEFAULT_TOPIC_CONFIG, **pipeline.source.topic_config}


def ensure_topics(admin_config: Mapping[str, Any], pipeline: PipelineConfig, *, timeout: float = 60.0) -> TopicReport:
    """Create the pipeline's missing topics (idempotent: existing topics are left as they are) and
    check the existing ones: a table topic with more than one partition is an error (TopicError),
    a finite retention or a compacted topic a warning in the report."""
    admin = AdminClient(dict(admin_config))
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise TopicError(f"cannot list the topics of Kafka at {admin_config.get('bootstrap.servers')}: {exc}") from None
    wanted = pipeline_topics(pipeline)
    table_topics = set(pipeline.topics())
    existing = [t for t in wanted if t in metadata.topics and metadata.topics[t].error is None]
    missing = [t for t in wanted if t not in existing]
    problems = [
        f"topic {t} has {len(metadata.topics[t].partitions)} partitions; the stream needs exactly 1 per table "
        f"topic to apply a table's changes in commit order: recreate it with 1 partition (kafka-topics.sh --delete "
        f"--topic {t}, then re-provision; the connector's initial snapshot refills it) or point the pipeline at "
        "another topic_prefix"
        for t in existing
        if t in table_topics and len(metadata.topics[t].partitions) != 1
    ]
    if problems:
        raise TopicError("; ".join(problems))
    created = _create(admin, missing, topic_config(pipeline), timeout) if missing else []
    warnings = _retention_warnings(admin, existing, timeout) if existing else []
    return TopicReport(created, existing, warnings)


def _create(admin: AdminClient, topics: list[str], config: dict[str, str], timeout: float) -> list[str]:
    # replication_factor -1: the broker's default.replication.factor (as Debezium's topic.creation does).
    new = [NewTopic(t, num_partitions=1, replication_factor=-1, config=config) for t in topics]
    created = []
    for topic, future in admin.create_topics(new, request_timeout=timeout).items():
        try:
            future.result(timeout=timeout)
            created.append(topic)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue  # created meanwhile (by Debezium or another provisioning run)
            raise TopicError(f"cannot create topic {topic}: {exc}") from None
    return created


def _retention_warnings(admin: AdminClient, topics: list[str], timeout: float) -> list[str]:
    resources = [ConfigResource(ConfigResource.Type.TOPIC, t) for t in topics]
    warnings = []
    try:
        described = {r.name: f.result(timeout=timeout) for r, f in admin.describe_configs(resources).items()}
    except KafkaException as exc:
        return [f"cannot read the configs of {', '.join(topics)}: {exc}"]
    for topic, entries in described.items():
        values = {name: entry.value for name, entry in entries.items()}
        if values.get("retention.ms") not in (None, "-1"):
            warnings.append(
                f"topic {topic} deletes records after retention.ms={values['retention.ms']}: a stream stopped longer "
                f"than that fails on the lost changes (kafka-configs.sh --alter --entity-type topics --entity-name "
                f"{topic} --add-config retention.ms=-1 keeps them)"
            )
        if values.get("retention.bytes") not in (None, "-1"):
            warnings.append(
                f"topic {topic} deletes records beyond retention.bytes={values['retention.bytes']} per partition "
                "(set retention.bytes=-1 so that no change is lost before the stream applied it)"
            )
        if "compact" in (values.get("cleanup.policy") or ""):
            warnings.append(f"topic {topic} is compacted (cleanup.policy={values['cleanup.policy']})")
    return warnings

from __future__ import annotations

from typing import Any

from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient
from dagster import ConfigurableResource
from pydantic import Field

from cdc_pipeline.probes import Health, kafka_health


class KafkaResource(ConfigurableResource):
    """The Kafka cluster (confluent-kafka admin and consumer clients, and its librdkafka settings)."""

    bootstrap_servers: str = Field(description="Comma-separated host:port list (CDC_KAFKA_BOOTSTRAP_SERVERS).")
    client_config: dict[str, str] = Field(
        default_factory=dict, description="Extra librdkafka settings, e.g. security.protocol, sasl.*."
    )

    def client_settings(self, **extra: Any) -> dict[str, Any]:
        """The librdkafka settings of this cluster (bootstrap servers and `client_config`), and `extra`."""
        return {"bootstrap.servers": self.bootstrap_servers, **self.client_config, **extra}

    def admin(self) -> AdminClient:
        return AdminClient(self.client_settings())

    def consumer(self, group_id: str, **extra: Any) -> Consumer:
        return Consumer(self.client_settings(**{"group.id": group_id, "enable.auto.commit": False, **extra}))

    def health(self) -> Health:
        return kafka_health(self.bootstrap_servers)

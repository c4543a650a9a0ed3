"""The dead-letter topic: records that cannot be decoded or applied, kept byte for byte with the reason."""

from __future__ import annotations

from confluent_kafka import KafkaException, Producer


class DeadLetters:
    """Produces each bad record with its original key and value; headers say why and where it came from."""

    def __init__(self, bootstrap_servers: str, topic: str, client_config: dict[str, str] | None = None) -> None:
        self.topic = topic
        self._producer = Producer(
            {"bootstrap.servers": bootstrap_servers, "enable.idempotence": True, "acks": "all", **(client_config or {})}
        )
        self._errors: list[str] = []

    def send(
        self, key: bytes | None, value: bytes | None, reason: str, topic: str, partition: int, offset: int
    ) -> None:
        headers: list[tuple[str, str | bytes | None]] = [
            ("cdc.error", reason.encode()),
            ("cdc.source.topic", topic.encode()),
            ("cdc.source.partition", str(partition).encode()),
            ("cdc.source.offset", str(offset).encode()),
        ]
        self._producer.produce(
            self.topic, key=bytes(key) if key is not None else None, value=bytes(value) if value is not None else None,
            headers=headers, on_delivery=self._delivered,
        )  # fmt: skip
        self._producer.poll(0)

    def _delivered(self, err, _msg) -> None:  # noqa: ANN001 - librdkafka callback signature
        if err is not None:
            self._errors.append(str(err))

    def flush(self, timeout: float = 60.0) -> None:
        """Block until every dead letter is acknowledged; raise if any could not be written."""
        remaining = self._producer.flush(timeout)
        if remaining or self._errors:
            errors, self._errors = self._errors, []
            raise KafkaException(f"dead-letter topic {self.topic}: {remaining} unsent, errors: {errors[:3]}")

from __future__ import annotations

from typing import Any

from dagster import ConfigurableResource
from pydantic import Field

from cdc_pipeline.kafka_connect import ConnectClient, ConnectError
from cdc_pipeline.probes import Health, connect_health

__all__ = ["ConnectError", "KafkaConnectResource"]  # ConnectError: importable from here too


class KafkaConnectResource(ConfigurableResource):
    """A Kafka Connect cluster's REST API: connector configs, status, pause/resume/restart (`ConnectClient`)."""

    url: str = Field(description="Base URL of the Connect REST API (CDC_CONNECT_URL).")
    timeout_s: float = 30.0

    def client(self) -> ConnectClient:
        return ConnectClient(self.url, self.timeout_s)

    def request(self, method: str, path: str, body: Any = None, *, budget_s: float | None = None) -> Any:
        """One REST call, retried on connection errors and a rebalance (see `ConnectClient`); `budget_s`
        bounds the whole call."""
        return self.client().request(method, path, body, budget_s=budget_s)

    def connector_plugins(self) -> list[dict[str, Any]]:
        return self.client().connector_plugins()

    def connectors(self) -> list[str]:
        return self.client().connectors()

    def put_connector_config(self, name: str, config: dict[str, Any]) -> dict[str, Any]:
        """Create or update (idempotent)."""
        return self.client().put_connector_config(name, config)

    def connector_config(self, name: str) -> dict[str, Any]:
        return self.client().connector_config(name)

    def connector_status(self, name: str, *, budget_s: float | None = None) -> dict[str, Any]:
        return self.client().connector_status(name, budget_s=budget_s)

    def pause(self, name: str) -> None:
        self.client().pause(name)

    def resume(self, name: str) -> None:
        self.client().resume(name)

    def restart(
        self, name: str, *, include_tasks: bool = True, only_failed: bool = False, budget_s: float | None = None
    ) -> Any:
        return self.client().restart(name, include_tasks=include_tasks, only_failed=only_failed, budget_s=budget_s)

    def delete(self, name: str) -> None:
        self.client().delete(name)

    def health(self) -> Health:
        return connect_health(self.url)

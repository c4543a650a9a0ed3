from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import requests
from dagster import ConfigurableResource
from pydantic import Field
from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_before_delay, wait_exponential

from cdc_pipeline.health import Health, connect_health


class ConnectError(RuntimeError):
    """The Kafka Connect REST API refused a request; the message carries Connect's own error."""


def _retryable(exc: BaseException) -> bool:
    # Connection trouble and 409 (a rebalance in progress) pass; other answers are final.
    if isinstance(exc, requests.ConnectionError | requests.Timeout):
        return True
    return isinstance(exc, ConnectError) and "409" in str(exc).split(" ", 1)[0]


class KafkaConnectResource(ConfigurableResource):
    """A Kafka Connect cluster's REST API: connector configs, status, pause/resume/restart."""

    url: str = Field(description="Base URL of the Connect REST API (CDC_CONNECT_URL).")
    timeout_s: float = 30.0

    def request(self, method: str, path: str, body: Any = None, *, budget_s: float | None = None) -> Any:
        """One REST call, retried on connection errors and 409 (a rebalance). `budget_s` bounds the
        whole call, retries included (sensors must answer within the daemon's evaluation timeout)."""
        deadline = None if budget_s is None else time.monotonic() + budget_s
        stop = stop_after_attempt(6) if budget_s is None else stop_after_attempt(6) | stop_before_delay(budget_s)
        retrying = Retrying(
            retry=retry_if_exception(_retryable), stop=stop, wait=wait_exponential(0.5, max=8), reraise=True
        )

        def timeout() -> float:  # within a budget, an attempt may take only what is left of it
            left = self.timeout_s if deadline is None else deadline - time.monotonic()
            return max(0.5, min(self.timeout_s, left))

        return retrying(self._request_once, method, path, body, timeout)

    def _request_once(self, method: str, path: str, body: Any, timeout: Callable[[], float]) -> Any:
        response = requests.request(method, f"{self.url.rstrip('/')}{path}", json=body, timeout=timeout())
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise ConnectError(f"{response.status_code} {method} {path}: {message}")
        return response.json() if response.content else None

    def connector_plugins(self) -> list[dict[str, Any]]:
        return self.request("GET", "/connector-plugins")

    def connectors(self) -> list[str]:
        return self.request("GET", "/connectors")

    def put_connector_config(self, name: str, config: dict[str, Any]) -> dict[str, Any]:
        """Create or update (idempotent)."""
        return self.request("PUT", f"/connectors/{quote(name)}/config", config)

    def connector_config(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/connectors/{quote(name)}/config")

    def connector_status(self, name: str, *, budget_s: float | None = None) -> dict[str, Any]:
        return self.request("GET", f"/connectors/{quote(name)}/status", budget_s=budget_s)

    def pause(self, name: str) -> None:
        self.request("PUT", f"/connectors/{quote(name)}/pause")

    def resume(self, name: str) -> None:
        self.request("PUT", f"/connectors/{quote(name)}/resume")

    def restart(
        self, name: str, *, include_tasks: bool = True, only_failed: bool = False, budget_s: float | None = None
    ) -> Any:
        query = f"?includeTasks={str(include_tasks).lower()}&onlyFailed={str(only_failed).lower()}"
        return self.request("POST", f"/connectors/{quote(name)}/restart{query}", budget_s=budget_s)

    def delete(self, name: str) -> None:
        self.request("DELETE", f"/connectors/{quote(name)}")

    def health(self) -> Health:
        return connect_health(self.url)

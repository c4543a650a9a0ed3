"""The Kafka Connect REST client, free of Dagster: connector configs, status, pause/resume/restart, delete.
`KafkaConnectResource` (resources/connect.py) is a thin Dagster resource around it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import requests
from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_before_delay, wait_exponential

ATTEMPTS = 6


def redact_url(url: str) -> str:
    """`url` without user and password (they are credentials; messages and logs must not carry them)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")))


class ConnectError(RuntimeError):
    """The Kafka Connect REST API refused a request. The message starts with the HTTP status and the request
    (`404 GET /connectors/<name>/status: ...`), carries Connect's own error, and names the connector and the
    worker's URL (without credentials)."""

    def __init__(
        self, status: int, method: str, path: str, message: str, *, url: str, connector: str | None = None
    ) -> None:
        self.status = status
        self.method = method
        self.path = path
        self.message = message
        self.url = redact_url(url)
        self.connector = connector
        where = f"Kafka Connect at {self.url}" + (f", connector {connector}" if connector else "")
        super().__init__(f"{status} {method} {path}: {message} ({where})")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (as exceptions crossing processes are)
        return _connect_error, (self.status, self.method, self.path, self.message, self.url, self.connector)

    @property
    def not_found(self) -> bool:
        return self.status == 404


def _connect_error(status: int, method: str, path: str, message: str, url: str, connector: str | None) -> ConnectError:
    return ConnectError(status, method, path, message, url=url, connector=connector)


def _retryable(exc: BaseException) -> bool:
    """Connection trouble and a worker that cannot answer *yet* pass; other answers are final.
    A rebalance shows up as 409 ("conflicting operation (e.g. worker rebalance)"), as 500 with Connect's
    `RebalanceNeededException` ("Request cannot be completed because a rebalance is expected"), or as 503;
    a worker too busy to answer in time says 500 "Request timed out". Every call this client makes is safe to
    repeat (PUT of a config, pause, resume, restart; a repeated DELETE answers 404, which callers accept)."""
    if isinstance(exc, requests.ConnectionError | requests.Timeout):
        return True
    if not isinstance(exc, ConnectError):
        return False
    if exc.status in (409, 503):
        return True
    message = exc.message.lower()
    return exc.status >= 500 and ("rebalance" in message or "request timed out" in message)


class ConnectClient:
    """A Kafka Connect cluster's REST API. Every call is retried on connection errors and a rebalance
    (409, 503, or 500 saying a rebalance is expected or the request timed out); other refusals raise
    `ConnectError`. `session`: a `requests.Session` to send through (default: a fresh connection per
    request, as `requests.request` does); `sleep`: how to wait between attempts."""

    def __init__(
        self,
        url: str,
        timeout_s: float = 30.0,
        *,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._send = session.request if session is not None else requests.request
        self._sleep = sleep

    def request(
        self, method: str, path: str, body: Any = None, *, budget_s: float | None = None, connector: str | None = None
    ) -> Any:
        """One REST call, retried on connection errors and a rebalance (see `_retryable`). `budget_s` bounds the
        whole call, retries included (sensors must answer within the daemon's evaluation timeout).
        `connector`: the connector the call is about (named in a `ConnectError`)."""
        deadline = None if budget_s is None else time.monotonic() + budget_s
        stop = (
            stop_after_attempt(ATTEMPTS)
            if budget_s is None
            else stop_after_attempt(ATTEMPTS) | stop_before_delay(budget_s)
        )
        retrying = Retrying(
            retry=retry_if_exception(_retryable),
            stop=stop,
            wait=wait_exponential(0.5, max=8),
            sleep=self._sleep,
            reraise=True,
        )

        def timeout() -> float:  # within a budget, an attempt may take only what is left of it
            left = self.timeout_s if deadline is None else deadline - time.monotonic()
            return max(0.5, min(self.timeout_s, left))

        return retrying(self._request_once, method, path, body, timeout, connector)

    def _request_once(
        self, method: str, path: str, body: Any, timeout: Callable[[], float], connector: str | None
    ) -> Any:
        response = self._send(method, f"{self.url.rstrip('/')}{path}", json=body, timeout=timeout())
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise ConnectError(response.status_code, method, path, message, url=self.url, connector=connector)
        return response.json() if response.content else None

    def connector_plugins(self) -> list[dict[str, Any]]:
        return self.request("GET", "/connector-plugins")

    def connectors(self) -> list[str]:
        return self.request("GET", "/connectors")

    def put_connector_config(self, name: str, config: dict[str, Any]) -> dict[str, Any]:
        """Create or update (idempotent)."""
        return self.request("PUT", f"/connectors/{quote(name)}/config", config, connector=name)

    def connector_config(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/connectors/{quote(name)}/config", connector=name)

    def connector_status(self, name: str, *, budget_s: float | None = None) -> dict[str, Any]:
        return self.request("GET", f"/connectors/{quote(name)}/status", budget_s=budget_s, connector=name)

    def pause(self, name: str) -> None:
        self.request("PUT", f"/connectors/{quote(name)}/pause", connector=name)

    def resume(self, name: str) -> None:
        self.request("PUT", f"/connectors/{quote(name)}/resume", connector=name)

    def restart(
        self, name: str, *, include_tasks: bool = True, only_failed: bool = False, budget_s: float | None = None
    ) -> Any:
        query = f"?includeTasks={str(include_tasks).lower()}&onlyFailed={str(only_failed).lower()}"
        return self.request("POST", f"/connectors/{quote(name)}/restart{query}", budget_s=budget_s, connector=name)

    def delete(self, name: str) -> None:
        self.request("DELETE", f"/connectors/{quote(name)}", connector=name)

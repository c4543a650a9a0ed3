from __future__ import annotations

import logging

import requests
from dagster import ConfigurableResource
from pydantic import Field
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from cdc_pipeline.control.alerts import Alert

log = logging.getLogger("cdc_pipeline.alerts")


class AlertDeliveryError(RuntimeError):
    """The webhook did not accept an alert (the URL itself is never part of the message)."""


class NotifierResource(ConfigurableResource):
    """Where alerts go: a Slack-compatible incoming webhook (JSON `text` + `blocks`) and the log."""

    webhook_url: str | None = Field(default=None, description="Incoming webhook URL (CDC_ALERT_WEBHOOK_URL).")
    log_alerts: bool = Field(default=True, description="Also write every alert to the log.")
    # Per attempt (3 attempts): an alert is sent from a sensor, which the daemon gives 60 s in all.
    timeout_s: float = 5.0

    def send(self, alert: Alert) -> None:
        """Deliver `alert` to every channel; AlertDeliveryError if the webhook refuses it after retries."""
        if self.log_alerts:
            level = logging.INFO if alert.resolved or alert.severity == "info" else logging.ERROR
            log.log(level, "%s", alert.text())
        if self.webhook_url:
            self._post(alert.slack_payload())

    @retry(
        retry=retry_if_exception_type(requests.RequestException),
        stop=stop_after_attempt(3),
        wait=wait_exponential(0.5, max=4),
        reraise=True,
    )
    def _post_once(self, payload: dict) -> requests.Response:
        return requests.post(self.webhook_url, json=payload, timeout=self.timeout_s)

    def _post(self, payload: dict) -> None:
        try:
            response = self._post_once(payload)
        except requests.RequestException as exc:
            raise AlertDeliveryError(f"alert webhook unreachable: {type(exc).__name__}") from None
        if response.status_code >= 300:
            raise AlertDeliveryError(f"alert webhook answered {response.status_code}: {response.text[:200]}")

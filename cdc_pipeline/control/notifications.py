"""The Debezium notification channel a backfill follows: an incremental snapshot reports its progress
and its completion on the connector's notification topic (the `sink` channel), so a backfill needs a
running connector that publishes there. Dagster-free: the backfill job reads the connector and asks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cdc_pipeline.control.rules import connector_running, connector_states


class NotificationsUnavailable(RuntimeError):
    """The connector does not run, or does not publish the notifications a backfill follows."""


def notification_topic(name: str, status: Mapping[str, Any], stored: Mapping[str, Any]) -> str:
    """The notification topic of connector `name` from its status and its stored config."""
    if not connector_running(status):
        raise NotificationsUnavailable(
            f"connector {name} is not running ({connector_states(status)}): the snapshot would never start"
        )
    channels = [c.strip() for c in str(stored.get("notification.enabled.channels", "")).split(",")]
    topic = stored.get("notification.sink.topic.name")
    if "sink" not in channels or not topic:
        raise NotificationsUnavailable(
            f"connector {name} does not publish Debezium notifications, which tell a backfill that it is complete: "
            "run the provision job to update its config"
        )
    return str(topic)

"""Provisioning outside Dagster (the `provision` command and the demo): the same steps and checks as
Dagster's `provision` job, reporting each step through `say`; and waiting until the connector runs (the
`provision` asset and the demo)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg

from cdc_pipeline.config import PipelineConfig
from cdc_pipeline.connector import connector_name, prepare_source, provision_connector
from cdc_pipeline.control.checks import ConnectorStatuses
from cdc_pipeline.control.rules import connector_running
from cdc_pipeline.control.source import check_source
from cdc_pipeline.kafka_connect import ConnectClient, ConnectError
from cdc_pipeline.settings import Settings
from cdc_pipeline.topics import ensure_topics


class ProvisionError(RuntimeError):
    """A source check failed or a system refused a step; the message names it."""


class ConnectorFailed(RuntimeError):
    """The connector or one of its tasks FAILED, or it did not run in time; the message names it and why."""


def wait_connector_running(
    connect: ConnectorStatuses,
    name: str,
    timeout: float = 120.0,
    *,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """The connector's status once it and its tasks run; `ConnectorFailed` with the task's error if one fails."""
    deadline = monotonic() + timeout
    status: dict[str, Any] = {}
    while monotonic() < deadline:
        try:
            status = connect.connector_status(name)
        except ConnectError as exc:  # Connect's 404: just created, the status appears after the first assignment
            if not exc.not_found:
                raise
            sleep(2)
            continue
        failed = [t for t in status.get("tasks", []) if t["state"] == "FAILED"]
        if status["connector"]["state"] == "FAILED" or failed:
            trace = (failed[0] if failed else status["connector"]).get("trace", "")
            raise ConnectorFailed(f"connector {name} failed: {trace.splitlines()[0] if trace else 'no trace'}")
        if connector_running(status):
            return status
        sleep(2)
    raise ConnectorFailed(f"connector {name} not RUNNING after {timeout:.0f} s: {status}")


def provision_pipeline(settings: Settings, pipeline: PipelineConfig, say: Callable[[str], None]) -> str:
    """Prepare the source (signal and heartbeat tables), check it (nothing is changed while a check
    fails), create the missing Kafka topics, and create or update the connector; returns its name."""
    try:
        for step in prepare_source(settings.postgres_conninfo(), pipeline):
            say(step)
        with psycopg.connect(settings.postgres_conninfo(), autocommit=True) as conn:
            failed = [check for check in check_source(conn, pipeline) if not check.ok]
        if failed:
            lines = "\n".join(check.line() for check in failed)
            raise ProvisionError(f"source checks failed; no topic or connector was provisioned:\n{lines}")
        for line in ensure_topics({"bootstrap.servers": settings.kafka_bootstrap_servers}, pipeline).lines():
            say(line)
        provision_connector(ConnectClient(settings.connect_url), pipeline, settings)
    except ProvisionError:
        raise
    except Exception as exc:  # psycopg / Connect errors carry the server's own explanation
        raise ProvisionError(f"provisioning failed: {exc}") from exc
    return connector_name(pipeline)

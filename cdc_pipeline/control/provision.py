"""Provisioning, one sequence for every caller (Dagster's `provision` asset, the `provision` command and
the demo): prepare the source, check it (nothing is changed while a check fails), create the missing Kafka
topics, create or update the connector; and waiting until the connector runs."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg

from cdc_pipeline.config import PipelineConfig
from cdc_pipeline.connector import connector_name, prepare_source, provision_connector
from cdc_pipeline.control.checks import ConnectorStatuses
from cdc_pipeline.control.rules import connector_running
from cdc_pipeline.control.source import SourceCheck, check_source
from cdc_pipeline.kafka_connect import ConnectClient, ConnectError
from cdc_pipeline.settings import Settings
from cdc_pipeline.topics import TopicReport, ensure_topics


class ProvisionError(RuntimeError):
    """A source check failed or a system refused a step; the message names it."""


class SourceChecksFailed(ProvisionError):
    """A source check failed; nothing was provisioned. `checks` holds every check, passed or not."""

    def __init__(self, checks: list[SourceCheck]) -> None:
        self.checks = checks
        lines = "\n".join(check.line() for check in self.failed)
        super().__init__(f"source checks failed; no topic or connector was provisioned:\n{lines}")

    @property
    def failed(self) -> list[SourceCheck]:
        return [check for check in self.checks if not check.ok]


@dataclass(frozen=True)
class Provisioned:
    """What provisioning did: the source objects it created, the source checks (all passed), the topics,
    and the connector's name and stored config."""

    connector: str
    created: list[str]
    checks: list[SourceCheck]
    topics: TopicReport
    config: dict[str, Any]


# log(level, line): "info" (a step), "warning" (a topic's), "passed" or "failed" (a source check).
Log = Callable[[str, str], None]


def provision(
    pipeline: PipelineConfig,
    *,
    conninfo: str,
    connect: ConnectClient,
    settings: Settings,
    kafka_config: Mapping[str, Any],
    log: Log,
) -> Provisioned:
    """Prepare the source (signal and heartbeat tables), check it (`SourceChecksFailed` before anything
    else is changed), create the missing Kafka topics (`TopicError`), and create or update the connector
    through `connect`. `settings` carries the source DSN the
    connector config is rendered from."""
    created = prepare_source(conninfo, pipeline)
    for line in created:
        log("info", line)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        checks = check_source(conn, pipeline)
    for check in checks:
        log("passed" if check.ok else "failed", check.line())
    if any(not check.ok for check in checks):
        raise SourceChecksFailed(checks)
    topics = ensure_topics(kafka_config, pipeline)
    for line in topics.lines():
        log("warning" if line.startswith("warning") else "info", line)
    stored = provision_connector(connect, pipeline, settings, kafka_config=kafka_config, create_topics=False)
    return Provisioned(connector_name(pipeline), created, checks, topics, stored)


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
    """`provision` from the settings (the `provision` command and the demo), reporting each step but the
    passed source checks through `say`; any failure is a `ProvisionError` naming it. Returns the connector's
    name."""

    def steps(level: str, line: str) -> None:
        if level in ("info", "warning"):  # the failed source checks are in the error's message
            say(line)

    try:
        return provision(
            pipeline,
            conninfo=settings.postgres_conninfo(),
            connect=ConnectClient(settings.connect_url),
            settings=settings,
            kafka_config={"bootstrap.servers": settings.kafka_bootstrap_servers},
            log=steps,
        ).connector
    except ProvisionError:
        raise
    except Exception as exc:  # psycopg / Connect / topic errors carry the server's own explanation
        raise ProvisionError(f"provisioning failed: {exc}") from exc

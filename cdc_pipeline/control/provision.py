"""Provisioning outside Dagster (the `provision` command and the demo): the same steps and checks as
Dagster's `provision` job, reporting each step through `say`."""

from __future__ import annotations

from collections.abc import Callable

import psycopg

from cdc_pipeline.config import PipelineConfig
from cdc_pipeline.connector import connector_name, prepare_source, provision_connector
from cdc_pipeline.control.source import check_source
from cdc_pipeline.kafka_connect import ConnectClient
from cdc_pipeline.settings import Settings
from cdc_pipeline.topics import ensure_topics


class ProvisionError(RuntimeError):
    """A source check failed or a system refused a step; the message names it."""


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

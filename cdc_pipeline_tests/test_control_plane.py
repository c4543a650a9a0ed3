"""The Dagster control plane on the real stack: jobs executed as Dagster runs, sensors evaluated
against the real Kafka, Connect, checkpoint and ClickHouse, alerts delivered to a local webhook.

One pipeline (its own PostgreSQL schema, connector, topics, checkpoint and ClickHouse database) is
shared by the tests of this module, which run in file order: each leaves the stream running."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from clickhouse_connect.driver.client import Client
from dagster import (
    AssetCheckEvaluation,
    DagsterInstance,
    Definitions,
    SensorResult,
    build_sensor_context,
)

from cdc_pipeline.clickhouse_client import connect_clickhouse
from cdc_pipeline.config import PipelineConfig
from cdc_pipeline.connector import connector_name
from cdc_pipeline.definitions import build_definitions
from cdc_pipeline.defs.common import AUTOMATIC_TAG, stream_lag
from cdc_pipeline.defs.jobs import run_backfill
from cdc_pipeline.kafka_connect import ConnectError
from cdc_pipeline.resources import (
    ClickHouseResource,
    ControlPlaneResource,
    KafkaConnectResource,
    KafkaResource,
    MonitorResource,
    NotifierResource,
    PostgresResource,
    SparkResource,
)
from cdc_pipeline.settings import Settings
from cdc_pipeline.stack.lifecycle import LocalStack
from cdc_pipeline_tests.conftest import free_ports, wait_for
from cdc_pipeline_tests.replica import RunningPipeline, remove_pipeline, write_schema_pipeline

pytestmark = pytest.mark.timeout(1800)

SCHEMA_SQL = """
CREATE SCHEMA {s};
CREATE TABLE {s}.accounts (id int PRIMARY KEY, name text NOT NULL, balance numeric(12, 2), updated_at timestamptz);
CREATE TABLE {s}.events (id bigserial PRIMARY KEY, account_id int, kind text, at timestamptz DEFAULT now());
INSERT INTO {s}.accounts SELECT g, 'account ' || g, g * 1.5, now() FROM generate_series(1, 60) g;
INSERT INTO {s}.events (account_id, kind) SELECT g % 60 + 1, 'open' FROM generate_series(1, 120) g;
"""


class Webhook:
    """A local Slack-style incoming webhook that records every JSON body it receives."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/test"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def texts(self, incident_prefix: str) -> list[str]:
        return [m["text"] for m in self.received if f"incident `{incident_prefix}" in json.dumps(m["blocks"])]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class ControlPlane:
    settings: Settings
    config: PipelineConfig
    config_path: Path
    work_dir: Path
    resources: dict[str, Any]
    defs: Definitions
    instance: DagsterInstance
    webhook: Webhook
    conn: psycopg.Connection
    clickhouse: Client
    cursors: dict[str, str | None] = field(default_factory=dict)

    @property
    def schema(self) -> str:
        return self.config.name

    def with_resources(self, **overrides: Any) -> Definitions:
        """The same pipeline with some resources replaced (e.g. other monitor thresholds)."""
        return build_definitions(self.config, self.config_path, {**self.resources, **overrides})

    def run(  # noqa: ANN201
        self,
        job: str,
        run_config: dict | None = None,
        defs: Definitions | None = None,
        ok: bool = True,
        tags: dict[str, str] | None = None,
    ):
        result = (
            (defs or self.defs)
            .resolve_job_def(job)
            .execute_in_process(run_config=run_config or {}, instance=self.instance, raise_on_error=False, tags=tags)
        )
        if ok:
            assert result.success, _failure(result)
        return result

    def evaluate(self, sensor: str, defs: Definitions | None = None, cursor_key: str | None = None, **resources: Any):  # noqa: ANN201
        """Evaluate a sensor as the daemon would, carrying its cursor across evaluations."""
        definitions = defs or self.defs
        key = cursor_key or sensor
        context = build_sensor_context(
            instance=self.instance, cursor=self.cursors.get(key), resources={**self.resources, **resources},
            definitions=definitions, sensor_name=sensor,
        )  # fmt: skip
        result = definitions.resolve_sensor_def(sensor)(context)
        if isinstance(result, SensorResult) and result.cursor is not None:
            self.cursors[key] = result.cursor
        return result

    def replica(self, table: str) -> list[tuple]:
        return self.clickhouse.query(
            f"SELECT * EXCEPT (_source_ts) FROM `{self.schema}`.`{table}` FINAL WHERE _is_deleted = 0 ORDER BY id"
        ).result_rows

    def running(self) -> RunningPipeline:
        """The replica comparison helper of the data-plane tests, for this pipeline."""
        return RunningPipeline(
            self.settings, self.config, self.config_path, "", self.schema, self.schema, self.work_dir / "unused.log"
        )

    def wait_until_replica_matches(self, timeout: float = 300) -> int:
        return self.running().wait_until_replica_matches(self.conn, self.clickhouse, ["accounts", "events"], timeout)

    def lag(self) -> int:
        return stream_lag(self.resources["kafka"], self.config).total


def _failure(result: Any) -> str:
    messages = [str(e.message) for e in result.all_events if e.is_failure]
    return "\n".join(messages)[-4000:]


def _checks(result: Any) -> dict[str, AssetCheckEvaluation]:
    return {f"{e.asset_key.path[-1]}.{e.check_name}": e for e in result.get_asset_check_evaluations()}


def replace(resource: Any, **changes: Any) -> Any:
    """A copy of a Dagster resource with some fields changed."""
    return type(resource)(**{**resource.model_dump(), **changes})


@pytest.fixture(scope="module")
def control(
    settings: Settings, local_stack: LocalStack, clickhouse_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlPlane]:
    name = f"cp_{os.urandom(4).hex()}"
    work_dir = tmp_path_factory.mktemp("control-plane")
    config, config_path = write_schema_pipeline(
        name,
        ["accounts", "events"],
        work_dir,
        snapshot_chunk_size=25,
        # A task whose database connection breaks fails at once instead of retrying forever: the
        # connector-status test needs a FAILED task.
        connector_properties={"errors.max.retries": "0"},
    )
    conn = psycopg.connect(settings.postgres_conninfo(), autocommit=True)
    conn.execute(SCHEMA_SQL.format(s=name))
    webhook = Webhook()
    resources = {
        "postgres": PostgresResource(dsn=settings.postgres_dsn, password=settings.postgres_password.get_secret_value()),
        "kafka": KafkaResource(bootstrap_servers=settings.kafka_bootstrap_servers),
        "kafka_connect": KafkaConnectResource(url=settings.connect_url),
        "spark": SparkResource(master="local[2]", jvm_cache_dir=str(settings.jvm_cache_dir)),
        "clickhouse": ClickHouseResource(
            url=clickhouse_url, password=os.environ["CDC_CLICKHOUSE_PASSWORD"], database=name
        ),
        "control_plane": ControlPlaneResource(
            config_path=str(config_path), stack_dir=str(work_dir), control_dir=str(work_dir / "control"),
            checkpoint_location=str(work_dir / "checkpoint"),
        ),
        "notifier": NotifierResource(webhook_url=webhook.url),
        "monitor": MonitorResource(lag_window=3, lag_threshold=1_000_000, stall_after_s=30, check_wait_s=120),
    }  # fmt: skip
    defs = build_definitions(config, config_path, resources)
    client = connect_clickhouse(clickhouse_url, "default", os.environ["CDC_CLICKHOUSE_PASSWORD"])
    plane = ControlPlane(
        settings, config, config_path, work_dir, resources, defs, DagsterInstance.ephemeral(), webhook, conn, client
    )
    try:
        yield plane
    finally:
        resources["control_plane"].controller(config).stop(timeout=60)
        remove_pipeline(settings, config)
        webhook.close()
        client.close()
        conn.close()


def test_provision_start_and_every_check_passes(control: ControlPlane) -> None:
    provision = control.run("provision")
    materialization = provision.asset_materializations_for_node(f"{control.schema}_provision_connector")[0]
    assert "ok wal_level" in materialization.metadata["source_checks"].value
    assert materialization.metadata["state"].value == "RUNNING"
    assert "${env:" not in json.dumps(materialization.metadata["config"].value)  # the reference is masked too
    control.run("provision")  # idempotent: a second run changes nothing and succeeds

    control.run("start_stream")
    status = control.resources["control_plane"].controller(control.config).status()
    assert status.running and status.desired == "running"

    with control.conn.transaction():
        control.conn.execute(f"UPDATE {control.schema}.accounts SET balance = balance + 1 WHERE id <= 10")
        control.conn.execute(f"DELETE FROM {control.schema}.events WHERE id <= 5")
        control.conn.execute(f"INSERT INTO {control.schema}.accounts VALUES (61, 'late', 1, now())")
    control.wait_until_replica_matches()

    checks = _checks(control.run("check_replicas"))
    assert len(checks) == 8 and all(c.passed for c in checks.values()), {k: c.metadata for k, c in checks.items()}
    assert checks["accounts.row_count_matches_source"].metadata["source_rows"].value == 61
    assert checks["accounts.row_count_matches_source"].metadata["replica_rows"].value == 61
    assert checks["events.row_count_matches_source"].metadata["replica_rows"].value == 115
    assert checks["events.no_duplicate_keys"].metadata["duplicate_keys"].value == 0
    assert checks["accounts.no_schema_drift"].metadata["missing_in_replica"].value == []
    assert "ReplacingMergeTree" in checks["accounts.no_schema_drift"].metadata["ddl"].value

    observed = control.run("observe_source_tables")
    observations = [e for e in observed.all_events if e.event_type_value == "ASSET_OBSERVATION"]
    assert len(observations) == 2
    by_table = {e.asset_key.path[-1]: e.event_specific_data.asset_observation.metadata for e in observations}
    assert by_table["accounts"]["row_count"].value == 61
    assert by_table["events"]["current_wal_lsn"].value.count("/") == 1

    # Streaming metrics: the progress table's batches become observations of the streaming query.
    metrics = control.evaluate("stream_metrics")
    assert isinstance(metrics, SensorResult) and metrics.asset_events
    batch = metrics.asset_events[-1].metadata
    assert {"input_rows_per_second", "processed_rows_per_second", "batch_duration_ms", "dlq_count"} <= set(batch)

    # The control plane's state is on disk: a new Definitions (a restarted Dagster) still sees the stream.
    restarted = build_definitions(control.config, control.config_path, control.resources)
    control.run("stream_status", defs=restarted)
    assert control.resources["control_plane"].controller(control.config).status().running


def test_lag_sensor_alerts_once_while_stopped_and_recovers_once(control: ControlPlane) -> None:
    control.evaluate("consumer_lag")
    control.run("stop_stream")
    assert not control.resources["control_plane"].controller(control.config).status().running
    for i in range(5):
        before = control.lag()
        control.conn.execute(
            f"INSERT INTO {control.schema}.events (account_id, kind) SELECT 1, 'while stopped {i}' "
            "FROM generate_series(1, 20)"
        )
        wait_for(lambda before=before: control.lag() > before, 120, "the new changes to reach Kafka")
        result = control.evaluate("consumer_lag")
        assert any(e.metadata.get("total_lag") for e in result.asset_events)
    alerts = control.webhook.texts("lag:")
    assert len(alerts) == 1, alerts
    assert "Consumer lag" in alerts[0] and "stream" in alerts[0]

    # A restart the checkpoint sensor requested before the operator stopped the stream does not undo the stop.
    control.run("restart_stream", tags={AUTOMATIC_TAG: "true"})
    assert not control.resources["control_plane"].controller(control.config).status().running

    control.run("start_stream")
    wait_for(lambda: control.lag() == 0, 300, "the restarted stream to catch up")
    control.evaluate("consumer_lag")
    control.evaluate("consumer_lag")
    alerts = control.webhook.texts("lag:")
    assert len(alerts) == 2 and alerts[1].startswith("[RESOLVED]"), alerts
    control.wait_until_replica_matches()


def _checkpoint_copy(control: ControlPlane, name: str) -> Path:
    source = Path(control.resources["control_plane"].checkpoint_location)
    copy = control.work_dir / name
    shutil.copytree(source, copy)
    return copy


def test_checkpoint_sensor_alerts_on_dead_unreadable_and_stalled_streams(control: ControlPlane) -> None:
    # A dead stream that should run: alert, and (restart enabled) a run request for restart_stream.
    healing = replace(control.resources["monitor"], **{"restart_stream": True, "restart_backoff_s": 1})
    defs = control.with_resources(monitor=healing)
    status = control.resources["control_plane"].controller(control.config).status()
    os.killpg(status.pid, signal.SIGKILL)
    wait_for(lambda: not control.resources["control_plane"].controller(control.config).status().running, 60, "death")
    result = control.evaluate("checkpoint_health", defs=defs, monitor=healing)
    assert [r.job_name for r in result.run_requests] in ([None], ["restart_stream"]), (result, control.webhook.received)
    alerts = control.webhook.texts("checkpoint:")
    assert len(alerts) == 1 and "not running" in alerts[0], alerts
    control.run("restart_stream", defs=defs)
    control.evaluate("checkpoint_health", defs=defs, monitor=healing)
    alerts = control.webhook.texts("checkpoint:")
    assert len(alerts) == 2 and alerts[1].startswith("[RESOLVED]"), alerts

    # An unreadable checkpoint (a copy, so the running stream is not disturbed).
    broken = _checkpoint_copy(control, "checkpoint-unreadable")
    (broken / "metadata").write_text("{not json")
    watcher = replace(
        control.resources["control_plane"],
        **{"checkpoint_location": str(broken), "control_dir": str(control.work_dir / "control-copy")},
    )
    control.evaluate("checkpoint_health", cursor_key="unreadable", control_plane=watcher)
    alerts = control.webhook.texts("checkpoint:")
    assert len(alerts) == 3 and "unreadable" in alerts[2], alerts

    # A batch that started (offsets/N) and never committed, for longer than stall_after_s.
    stalled = _checkpoint_copy(control, "checkpoint-stalled")
    last = max(int(p.name) for p in (stalled / "offsets").iterdir() if p.name.isdigit())
    pending = stalled / "offsets" / str(last + 1)
    shutil.copy(stalled / "offsets" / str(last), pending)
    old = time.time() - 3600
    os.utime(pending, (old, old))
    watcher = replace(watcher, **{"checkpoint_location": str(stalled)})
    # A stall matters for a stream that should run: say so in the watcher's (copied) control state.
    watcher.controller(control.config)._write_state(desired="running")
    control.evaluate("checkpoint_health", cursor_key="stalled", control_plane=watcher)
    alerts = control.webhook.texts("checkpoint:")
    assert len(alerts) == 4 and f"batch {last + 1} started" in alerts[3], alerts


def test_connector_sensor_alerts_on_a_failed_task_and_restarts_it(control: ControlPlane) -> None:
    name = connector_name(control.config)
    connect = control.resources["kafka_connect"]
    # Break the task's replication connection; with errors.max.retries=0 the task FAILS.
    control.conn.execute(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = %s AND active",
        (control.config.slot_name,),
    )
    wait_for(lambda: any(t["state"] == "FAILED" for t in connect.connector_status(name)["tasks"]), 180, "a FAILED task")
    healing = replace(control.resources["monitor"], **{"restart_connector_tasks": True})
    defs = control.with_resources(monitor=healing)
    control.evaluate("connector_status", defs=defs, monitor=healing)
    alerts = control.webhook.texts("connector:")
    assert len(alerts) == 1 and "FAILED" in alerts[0] and "restarted=True" in alerts[0], alerts

    def running() -> bool:
        status = connect.connector_status(name)
        return status["tasks"] and all(t["state"] == "RUNNING" for t in status["tasks"])

    wait_for(running, 180, "the restarted task to run")
    control.evaluate("connector_status", defs=defs, monitor=healing)
    alerts = control.webhook.texts("connector:")
    assert len(alerts) == 2 and alerts[1].startswith("[RESOLVED]"), alerts
    # Changes still flow after the restart.
    control.conn.execute(f"UPDATE {control.schema}.accounts SET name = 'after restart' WHERE id = 7")
    control.wait_until_replica_matches()


def test_truncated_replica_fails_the_count_check_and_backfill_restores_it(control: ControlPlane) -> None:
    impatient = replace(control.resources["monitor"], **{"check_wait_s": 5})
    defs = control.with_resources(monitor=impatient)
    control.evaluate("alert_on_check_failure")  # every check passed so far: nothing to say
    assert control.webhook.texts("check:") == []
    control.clickhouse.command(f"TRUNCATE TABLE `{control.schema}`.`accounts`")
    checks = _checks(control.run("check_replicas", defs=defs))
    count = checks["accounts.row_count_matches_source"]
    assert not count.passed and count.metadata["replica_rows"].value == 0
    assert count.metadata["source_rows"].value == 61
    # The failed ERROR check is alerted like a failed run (the run itself succeeded), once.
    control.evaluate("alert_on_check_failure")
    control.evaluate("alert_on_check_failure")
    alerts = control.webhook.texts("check:")
    assert len(alerts) == 1 and "row_count_matches_source failed" in alerts[0] and "accounts" in alerts[0], alerts
    assert "source_rows=61" in alerts[0] and "replica_rows=0" in alerts[0], alerts

    result = control.run(
        "backfill_table", {"ops": {"backfill_table_op": {"config": {"table": f"{control.schema}.accounts"}}}}
    )
    logs = [entry.user_message for entry in control.instance.all_logs(result.run_id)]
    progress = [message for message in logs if "rows snapshotted" in message]
    assert progress and "61 of 61" in progress[-1], logs
    observed = [e for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"]
    backfill = observed[0].event_specific_data.asset_observation.metadata["backfill"].value
    assert backfill["snapshotted_rows"] == 61 and backfill["applied"], backfill
    # Debezium's own report of the scan (its notification topic) agrees.
    assert backfill["scan_status"] == "SUCCEEDED" and backfill["debezium_rows_scanned"] == 61, backfill
    checks = _checks(control.run("check_replicas"))
    assert all(c.passed for c in checks.values()), {k: c.metadata for k, c in checks.items() if not c.passed}
    control.evaluate("alert_on_check_failure")
    control.evaluate("alert_on_check_failure")
    alerts = control.webhook.texts("check:")
    assert len(alerts) == 2 and alerts[1].startswith("[RESOLVED]") and "passes again" in alerts[1], alerts
    control.wait_until_replica_matches()


def test_overlapping_backfills_each_end_with_their_own_scan(control: ControlPlane) -> None:
    # Two backfills of one table at once: Debezium may queue the second into the first's snapshot and
    # report both under one id; each job must still end with its own table scan.
    table = control.config.table(f"{control.schema}.events")
    condition = "id > 100"
    with control.conn.cursor() as cursor:
        everything = cursor.execute(f"SELECT count(*) FROM {control.schema}.events").fetchone()[0]
        some = cursor.execute(f"SELECT count(*) FROM {control.schema}.events WHERE {condition}").fetchone()[0]
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def backfill(name: str, where: str | None) -> None:
        context = SimpleNamespace(log=logging.getLogger(f"test.backfill.{name}"))
        try:
            results[name] = run_backfill(
                context, control.config, table, where, control.resources["postgres"], control.resources["kafka"],
                control.resources["kafka_connect"], 600, True,
            )  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=backfill, args=args) for args in (("all", None), ("some", condition))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(900)
    assert not errors and not any(t.is_alive() for t in threads), errors
    assert results["all"]["scan_status"] == "SUCCEEDED" and results["all"]["debezium_rows_scanned"] == everything
    assert results["some"]["scan_status"] == "SUCCEEDED" and results["some"]["debezium_rows_scanned"] == some
    assert results["all"]["applied"] and results["some"]["applied"]
    control.wait_until_replica_matches()


def test_replay_of_applied_ranges_changes_nothing(control: ControlPlane) -> None:
    control.wait_until_replica_matches()
    before = {table: control.replica(table) for table in ("accounts", "events")}
    config = {"table": f"{control.schema}.events", "start_offset": 0}
    result = control.run("replay", {"ops": {"replay_op": {"config": config}}})
    replayed = [e for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"]
    summary = replayed[0].event_specific_data.asset_observation.metadata["replay"].value
    assert summary["records"] > 100 and summary["dlq_count"] == 0, summary
    window = {"table": f"{control.schema}.accounts", "start_time": "2000-01-01T00:00:00+00:00"}
    control.run("replay", {"ops": {"replay_op": {"config": window}}})
    after = {table: control.replica(table) for table in ("accounts", "events")}
    assert after == before


def test_reconcile_reports_tampered_rows_by_key_and_backfill_repairs_them(control: ControlPlane) -> None:
    control.wait_until_replica_matches()
    table = f"`{control.schema}`.`accounts`"
    # Behind the pipeline's back: a changed row (a newer version), a deleted row, an invented row.
    control.clickhouse.command(
        f"INSERT INTO {table} SELECT * REPLACE ('tampered' AS name, _version + 1 AS _version) "
        f"FROM {table} FINAL WHERE id = 3"
    )
    control.clickhouse.command(
        f"INSERT INTO {table} SELECT * REPLACE (1 AS _is_deleted, _version + 1 AS _version) "
        f"FROM {table} FINAL WHERE id = 4"
    )
    # (A subquery: in ClickHouse an alias in SELECT is visible in WHERE, so `id` there would be 99999.)
    control.clickhouse.command(
        f"INSERT INTO {table} SELECT * REPLACE (99999 AS id) FROM (SELECT * FROM {table} FINAL WHERE id = 5)"
    )
    control.evaluate("alert_on_run_failure")  # the daemon watches for failed runs from now on
    run_config = {"ops": {"reconcile_op": {"config": {"tables": [f"{control.schema}.accounts"], "settle_s": 30}}}}
    result = control.run("reconcile_tables", run_config, ok=False)
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.user_failure_data
    report = failure.metadata["report"].value[f"{control.schema}.accounts"]
    assert report["different_keys"] == [["3"]] and report["missing_keys"] == [["4"]], report
    assert report["extra_keys"] == [["99999"]], report

    # The failed run is alerted by the run-failure sensor, with the step's error; an alert the webhook did
    # not take (it was down) is sent at the next evaluation, and only once.
    (closed_port,) = free_ports(1)
    down = replace(control.resources["notifier"], webhook_url=f"http://127.0.0.1:{closed_port}/hooks/down")
    control.evaluate("alert_on_run_failure", notifier=down)

    def run_alerts() -> list[str]:
        return [t for t in control.webhook.texts("run:") if "Run of reconcile_tables failed" in t]

    assert run_alerts() == []
    control.evaluate("alert_on_run_failure")
    control.evaluate("alert_on_run_failure")
    assert len(run_alerts()) == 1 and "replicas differ from their source" in run_alerts()[0], run_alerts()

    run_config["ops"]["reconcile_op"]["config"]["backfill_differences"] = True
    result = control.run("reconcile_tables", run_config)
    control.wait_until_replica_matches()


def test_pause_and_resume_the_connector(control: ControlPlane) -> None:
    name = connector_name(control.config)
    connect = control.resources["kafka_connect"]

    def state(expected: str) -> bool:
        status = connect.connector_status(name)
        return status["connector"]["state"] == expected and all(t["state"] == expected for t in status["tasks"])

    control.run("pause_connector")
    wait_for(lambda: state("PAUSED"), 120, "the connector to pause")
    control.run("resume_connector")
    wait_for(lambda: state("RUNNING"), 120, "the connector to resume")
    control.conn.execute(f"UPDATE {control.schema}.accounts SET name = 'after resume' WHERE id = 8")
    control.wait_until_replica_matches()


def _connector_state(control: ControlPlane) -> str | None:
    try:
        return control.resources["kafka_connect"].connector_status(connector_name(control.config))["connector"]["state"]
    except ConnectError as exc:
        if str(exc).startswith("404 "):
            return None
        raise


def test_replication_sensor_alerts_on_slot_retention_and_a_long_pause(control: ControlPlane) -> None:
    # Tight limits: 512 KiB of retained WAL, a slot that has not advanced for 20 s, a pause of 5 s.
    strict = replace(
        control.resources["monitor"],
        **{"slot_max_retained_bytes": 512 * 1024, "slot_max_retention_age_s": 20, "connector_max_paused_s": 5},
    )
    defs = control.with_resources(monitor=strict)
    incidents = ("slot_retention_bytes:", "slot_retention_age:", "connector_paused:")

    def evaluate() -> None:
        control.evaluate("replication_health", defs=defs, cursor_key="replication-strict", monitor=strict)

    def opened() -> bool:
        evaluate()
        return all(len(control.webhook.texts(prefix)) == 1 for prefix in incidents)

    def resolved() -> bool:
        evaluate()
        return all(len(control.webhook.texts(prefix)) == 2 for prefix in incidents)

    control.run("pause_connector")
    wait_for(lambda: _connector_state(control) == "PAUSED", 120, "the connector to pause")
    # About 1.5 MB of WAL the paused connector cannot confirm.
    control.conn.execute(
        f"INSERT INTO {control.schema}.events (account_id, kind) "
        "SELECT 1, repeat('w', 200) FROM generate_series(1, 5000)"
    )
    wait_for(opened, 180, "the retention and pause alerts", interval=2)
    texts = {prefix: control.webhook.texts(prefix) for prefix in incidents}
    assert (
        "retains" in texts["slot_retention_bytes:"][0] and control.config.slot_name in texts["slot_retention_bytes:"][0]
    )
    assert "has not advanced" in texts["slot_retention_age:"][0], texts
    assert "PAUSED" in texts["connector_paused:"][0] and "resume_connector" in texts["connector_paused:"][0], texts
    evaluate()  # still paused: no second alert
    assert all(len(control.webhook.texts(prefix)) == 1 for prefix in incidents)

    control.run("resume_connector")
    wait_for(resolved, 300, "the slot to advance and the incidents to clear", interval=2)
    for prefix in incidents:
        assert control.webhook.texts(prefix)[1].startswith("[RESOLVED]"), control.webhook.texts(prefix)
    control.wait_until_replica_matches()


def test_replication_sensor_alerts_on_a_missing_connector(control: ControlPlane) -> None:
    watch = replace(control.resources["monitor"], **{"connector_missing_grace_s": 0})
    defs = control.with_resources(monitor=watch)

    def evaluate() -> None:
        control.evaluate("replication_health", defs=defs, cursor_key="replication-missing", monitor=watch)

    evaluate()
    assert control.webhook.texts("connector_missing:") == []
    control.resources["kafka_connect"].delete(connector_name(control.config))
    wait_for(lambda: _connector_state(control) is None, 120, "the connector to be deleted")
    control.conn.execute(f"UPDATE {control.schema}.accounts SET name = 'while missing' WHERE id = 9")
    evaluate()
    evaluate()
    alerts = control.webhook.texts("connector_missing:")
    assert len(alerts) == 1 and "is missing" in alerts[0] and "provision" in alerts[0], alerts

    control.run("provision")  # re-created: it resumes from its stored offsets and slot
    evaluate()
    alerts = control.webhook.texts("connector_missing:")
    assert len(alerts) == 2 and alerts[1].startswith("[RESOLVED]"), alerts
    control.wait_until_replica_matches()  # the change made while it was missing arrives

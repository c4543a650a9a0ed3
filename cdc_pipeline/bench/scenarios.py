"""The benchmark run: sets up a source table and a connector, starts the repo's streaming application the
way the product does (`SparkSubmit.stream_argv` + `submit_env`, i.e. spark-submit of
`cdc_pipeline/streaming/app.py`), drives each scenario and measures it from the outside: Kafka high
watermarks for the capture stage, ClickHouse `FINAL` for the pipeline, process RSS for memory."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
import yaml
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from psycopg import sql
from rich.console import Console

from cdc_pipeline.bench import SCENARIOS
from cdc_pipeline.bench.env import child_env, python_path_env
from cdc_pipeline.bench.memory import SPARK, RssSampler
from cdc_pipeline.bench.report import Report, Stage, percentile
from cdc_pipeline.bench.table import (
    ORDERS,
    PROBE,
    BackgroundLoad,
    Prober,
    create_tables,
    fill_orders,
    update_burst,
)
from cdc_pipeline.clickhouse_client import connect_clickhouse
from cdc_pipeline.config import PipelineConfig, StreamConfig, parse_pipeline_config
from cdc_pipeline.connector import connector_name, prepare_source, provision_connector
from cdc_pipeline.kafka_connect import ConnectClient
from cdc_pipeline.settings import Settings
from cdc_pipeline.streaming.launch import APPLICATION, SparkSubmit

DEFAULT_STREAM = StreamConfig()
PROBE_INTERVAL_S = 0.1
VISIBILITY_POLL_S = 0.05
# The least time the latency scenario waits after its window for the probes to become visible.
LATENCY_DRAIN_MIN_S = 180
MAX_POLL_S = 2.0
BASELINE = "plain consumer"  # its RSS component: not part of the stack


class BenchError(RuntimeError):
    """A scenario could not be measured; the message says what did not happen."""


@dataclass
class BenchOptions:
    rows: int = 100_000
    rate: int = 1_000
    latency_seconds: float = 60.0
    latency_warmup_seconds: float = 20.0
    scenarios: tuple[str, ...] = SCENARIOS
    rows_per_transaction: int = 10_000
    trigger_interval: str = DEFAULT_STREAM.trigger_interval
    max_offsets_per_trigger: int = DEFAULT_STREAM.max_offsets_per_trigger
    latency_trigger: str = "500 milliseconds"
    master: str | None = None
    timeout_s: float | None = None
    keep: bool = False

    @property
    def wait_timeout_s(self) -> float:
        """How long any one condition may take: generous (today's stream applies ~1,200 rows/s)."""
        return self.timeout_s or 600 + self.rows * 0.03


# -------------------------------------------------------------------------------------------------
def wait_until(
    checks: dict[str, Callable[[], bool]],
    *,
    started: float,
    timeout: float,
    interval: float = 0.5,
    intervals: dict[str, float] | None = None,
    guard: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Poll every check until each has returned True once; returns seconds from `started` to each one's
    first success, to within the poll interval (`interval`, growing to 2% of the elapsed time, at most
    2 s). A check that raises counts as not done (the table may not exist yet). `guard` raises when
    waiting is pointless (the stream died)."""
    done: dict[str, float] = {}
    last_error: dict[str, str] = {}
    due = dict.fromkeys(checks, 0.0)
    deadline = time.monotonic() + timeout
    while len(done) < len(checks):
        now = time.monotonic()
        if now > deadline:
            pending = ", ".join(f"{n} ({last_error.get(n, 'condition not met')})" for n in checks if n not in done)
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {pending}")
        for name, check in checks.items():
            if name in done or due[name] > now:
                continue
            try:
                ok = check()
            except Exception as exc:  # e.g. the replica table does not exist yet
                ok = False
                last_error[name] = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            if ok:
                done[name] = time.monotonic() - started
            # Resolution stays within ~2% of the elapsed time while long waits load the services less.
            pause = max((intervals or {}).get(name, interval), min(MAX_POLL_S, 0.02 * (time.monotonic() - started)))
            due[name] = time.monotonic() + pause
        if guard:
            guard()
        time.sleep(min(0.05, interval))
    return done


class Kafka:
    """High watermarks and topic creation."""

    def __init__(self, bootstrap_servers: str) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.consumer = Consumer(
            {"bootstrap.servers": bootstrap_servers, "group.id": "cdc-bench-watermarks", "enable.auto.commit": False}
        )

    def offsets(self, topic: str) -> dict[int, tuple[int, int]]:
        """partition -> (low, high) watermark; empty while the topic does not exist."""
        metadata = self.consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return {}
        return {
            p: self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)
            for p in metadata.partitions
        }

    def high(self, topic: str) -> int:
        return sum(high for _, high in self.offsets(topic).values())

    def records(self, topic: str) -> int:
        return sum(high - low for low, high in self.offsets(topic).values())

    def create_topics(self, topics: list[str]) -> None:
        """Create the table topics up front (one partition, as the connector would): the stream can then
        subscribe and warm up before the first change exists."""
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
        futures = admin.create_topics([NewTopic(t, num_partitions=1, replication_factor=-1) for t in topics])
        for topic, future in futures.items():
            try:
                future.result(timeout=30)
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise BenchError(f"could not create topic {topic}: {exc}") from exc

    def delete_topics(self, prefix: str) -> None:
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
        topics = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix)]
        if topics:
            for future in admin.delete_topics(topics).values():
                with contextlib.suppress(Exception):
                    future.result(timeout=30)

    def close(self) -> None:
        self.consumer.close()


@dataclass
class StreamRun:
    """One run of the repo's streaming application (spark-submit of streaming/app.py) for one pipeline."""

    label: str
    config_path: Path
    checkpoint: Path
    log_path: Path
    process: subprocess.Popen | None = None
    started_at: float = 0.0

    def start(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=cwd, start_new_session=True,
            )  # fmt: skip
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def guard(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise BenchError(
                f"the {self.label} stream exited with code {self.process.returncode}; last lines of "
                f"{self.log_path}:\n{self.log_tail()}"
            )

    def source_initialized(self) -> bool:
        """Spark wrote the Kafka source's starting offsets: the query runs and is planning its first batch."""
        return (self.checkpoint / "sources" / "0" / "0").exists()

    def batch_committed(self) -> bool:
        """Spark committed a micro-batch (the first one runs at once, even on empty topics)."""
        commits = self.checkpoint / "commits"
        return commits.is_dir() and any(p.name.isdigit() for p in commits.iterdir())

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM to the whole process group (the query stops cleanly), SIGKILL after `timeout`. Also kills
        what outlives spark-submit: its Python driver can stay behind when the JVM exits mid-batch."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _group_alive(process.pid) and time.monotonic() < deadline:
            process.poll()  # reap spark-submit itself, or the group never looks empty
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def trigger_limit(self) -> str | None:
        """What the stream logged it reads per trigger (streaming/limits.py), e.g. `18,000 offsets per trigger
        (bounded from ...)`; None before it logged it."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return None
        found = re.search(r"reads at most (.+)$", text, re.MULTILINE)
        return found.group(1).strip() if found else None

    def out_of_memory(self) -> bool:
        try:
            return "OutOfMemoryError" in self.log_path.read_text(errors="replace")
        except OSError:
            return False


@dataclass
class Bench:
    settings: Settings
    options: BenchOptions
    console: Console
    sampler: RssSampler
    report: Report
    name: str = field(default_factory=lambda: f"bench_{uuid.uuid4().hex[:8]}")
    work_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cdc-bench-")))
    streams: dict[str, StreamRun] = field(default_factory=dict)
    revision: int = 0  # the `revision` every source row has (the burst raises it)
    provisioned: bool = False
    failed: bool = False

    def __post_init__(self) -> None:
        self.conninfo = self.settings.postgres_conninfo()
        self.kafka = Kafka(self.settings.kafka_bootstrap_servers)
        password = self.settings.clickhouse_password.get_secret_value() if self.settings.clickhouse_password else None
        self._ch_password = password
        self.clickhouse = connect_clickhouse(self.settings.clickhouse_endpoint, self.settings.clickhouse_user, password)
        self.main = self._pipeline(self.name, [ORDERS, PROBE], self.options.trigger_interval)
        self.orders_topic = self.main.topic_for(self.main.table(f"{self.name}.{ORDERS}"))
        self.probe_topic = self.main.topic_for(self.main.table(f"{self.name}.{PROBE}"))
        self.report.stream_config = {
            "trigger_interval": self.options.trigger_interval,
            "max_offsets_per_trigger": self.options.max_offsets_per_trigger,
            "latency_trigger_interval": self.options.latency_trigger,
            "master": self.options.master or self.settings.spark_master,
            "driver_memory": SparkSubmit().driver_memory,
            "application": str(APPLICATION),
        }

    def say(self, message: str) -> None:
        self.console.log(message)

    # ---------------------------------------------------------------------------------------------
    def _pipeline(
        self, name: str, tables: list[str], trigger: str, *, starting_offsets: str = "earliest"
    ) -> PipelineConfig:
        """A pipeline over the bench schema's tables, replicated to ClickHouse database `name`. Every
        pipeline reads the main pipeline's topics (`topic_prefix`); only the main one has a connector."""
        raw = {
            "name": name,
            "source": {
                "schemas": [self.name],
                "topic_prefix": self.name,
                "signal_table": f"{self.name}.cdc_signal",
                "heartbeat_table": None,
            },
            "tables": [{"name": f"{self.name}.{t}", "clickhouse_table": t} for t in tables],
            "sink": {"clickhouse": {"database": name}},
            "stream": {
                "trigger_interval": trigger,
                "max_offsets_per_trigger": self.options.max_offsets_per_trigger,
                "starting_offsets": starting_offsets,
                "dlq_topic": f"{name}.dlq",
            },
        }
        config = parse_pipeline_config(raw, source=f"{name}.yaml")
        (self.work_dir / f"{name}.yaml").write_text(yaml.safe_dump(raw))
        return config

    def _env(self) -> dict[str, str]:
        return child_env(self.settings, python_path_env())

    def start_stream(self, label: str, config: PipelineConfig) -> StreamRun:
        """spark-submit the repo's streaming application for `config`, as `cdc-pipeline stream run` does."""
        config_path = self.work_dir / f"{config.name}.yaml"
        checkpoint = self.work_dir / "checkpoints" / config.name
        stream = StreamRun(label, config_path, checkpoint, self.work_dir / f"stream-{label}.log")
        submit = SparkSubmit(
            master=self.options.master or self.settings.spark_master, jvm_cache_dir=self.settings.jvm_cache_dir
        )
        argv = submit.stream_argv(config_path, checkpoint_location=str(checkpoint), name=config.query_name)
        stream.start(argv, self._env(), self.work_dir)
        self.streams[label] = stream
        self.sampler.watch(SPARK, stream.process.pid if stream.process else None)
        self.say(f"started the {label} stream (query {config.query_name}, log {stream.log_path})")
        return stream

    def stop_stream(self, label: str) -> None:
        stream = self.streams.pop(label, None)
        if stream is None:
            return
        self.sampler.sample()
        stream.stop()
        self.sampler.forget(SPARK)
        limit = stream.trigger_limit()
        if limit:
            self.report.trigger_limits[label] = limit
        if stream.out_of_memory():
            self.report.out_of_memory.append(f"{label}: {stream.log_path}")

    def _ready(self, stream: StreamRun) -> float:
        """Wait until the stream committed its first (empty) batch: JVM up, query running, writer warmed."""
        waited = wait_until(
            {"first batch": stream.batch_committed},
            started=stream.started_at,
            timeout=self.options.wait_timeout_s,
            guard=stream.guard,
        )
        self.say(f"the {stream.label} stream is running ({waited['first batch']:.1f}s after spark-submit)")
        return waited["first batch"]

    def replica(self, database: str) -> tuple[int, int]:
        """(live rows, live rows with the current revision) of the orders replica, with FINAL."""
        row = self.clickhouse.query(
            "SELECT count(), countIf(revision = {r:Int32}) FROM {db:Identifier}.{t:Identifier} FINAL",
            parameters={"r": self.revision, "db": database, "t": ORDERS},
        ).result_rows[0]
        return int(row[0]), int(row[1])

    def replica_complete(self, database: str) -> bool:
        return self.replica(database) == (self.options.rows, self.options.rows)

    # ---------------------------------------------------------------------------------------------
    def run(self) -> None:
        rows = self.options.rows
        self.say(
            f"run {self.name}: {rows:,} rows, scenarios {', '.join(self.options.scenarios)}; work dir {self.work_dir}"
        )
        started = time.monotonic()
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            create_tables(conn, self.name)
            fill_orders(conn, self.name, rows)
        self.say(f"loaded {rows:,} rows into {self.name}.{ORDERS} in {time.monotonic() - started:.1f}s")
        prepare_source(self.conninfo, self.main)
        self.kafka.create_topics([self.orders_topic, self.probe_topic])

        for scenario in SCENARIOS:
            if scenario not in self.options.scenarios and not (scenario == "snapshot" and not self.provisioned):
                continue
            measured = scenario in self.options.scenarios
            try:
                if scenario == "snapshot":
                    self.snapshot(measured)
                else:
                    getattr(self, scenario)()
            except BenchError as exc:
                self.failed = True
                self.report.errors[scenario] = str(exc)
                self.say(f"[red]{scenario}: {exc}[/red]")
                if scenario == "snapshot":
                    break  # without a captured topic nothing else can be measured
        for label in list(self.streams):
            self.stop_stream(label)

    def snapshot(self, measured: bool) -> None:
        """N pre-existing rows through a fresh connector: until Kafka has them (capture), until ClickHouse
        FINAL has them (pipeline). The stream runs and is warm before the connector is created."""
        rows = self.options.rows
        stream = None
        if measured:
            stream = self.start_stream("main", self.main)
            self._ready(stream)
        started = time.monotonic()
        provision_connector(ConnectClient(self.settings.connect_url), self.main, self.settings)
        self.provisioned = True
        checks: dict[str, Callable[[], bool]] = {"capture": lambda: self.kafka.high(self.orders_topic) >= rows}
        if measured:
            checks["pipeline"] = lambda: self.replica(self.name)[0] >= rows
        done = wait_until(
            checks,
            started=started,
            timeout=self.options.wait_timeout_s,
            intervals={"capture": 0.2, "pipeline": 0.5},
            guard=stream.guard if stream else None,
        )
        self.say(f"snapshot: Kafka has {rows:,} rows after {done['capture']:.1f}s")
        if not measured:
            return
        capture = self.report.add(Stage("snapshot", "capture", rows, done["capture"], note="Debezium -> Kafka"))
        pipeline = self.report.add(Stage("snapshot", "pipeline", rows, done["pipeline"], note="-> ClickHouse FINAL"))
        pipeline.ratio_vs_capture = _ratio(pipeline.rows_per_s, capture.rows_per_s)
        self.say(f"snapshot: ClickHouse FINAL has {rows:,} rows after {done['pipeline']:.1f}s")

    def burst(self) -> None:
        """N updates committed in transactions of `rows_per_transaction`: capture vs pipeline."""
        rows = self.options.rows
        stream = self.streams.get("main")
        if stream is None:
            stream = self.start_stream("main", self.main)
            self._ready(stream)
        wait_until(
            {"replica holds the snapshot": lambda: self.replica(self.name)[0] >= rows},
            started=time.monotonic(),
            timeout=self.options.wait_timeout_s,
            guard=stream.guard,
        )
        before = self.kafka.high(self.orders_topic)
        self.revision += 1
        revision = self.revision
        written: dict[str, Any] = {}

        def write() -> None:
            try:
                written["seconds"] = update_burst(
                    self.conninfo, self.name, rows, self.options.rows_per_transaction, revision
                )
            except Exception as exc:
                written["error"] = exc

        writer = threading.Thread(target=write, name="bench-burst", daemon=True)
        started = time.monotonic()
        writer.start()

        def guard() -> None:
            stream.guard()
            if "error" in written:
                raise BenchError(f"the burst's updates failed: {written['error']}")

        done = wait_until(
            {
                "capture": lambda: self.kafka.high(self.orders_topic) >= before + rows,
                "pipeline": lambda: self.replica(self.name)[1] >= rows,
            },
            started=started,
            timeout=self.options.wait_timeout_s,
            intervals={"capture": 0.2, "pipeline": 0.5},
            guard=guard,
        )
        writer.join()
        per_tx = self.options.rows_per_transaction
        self.report.add(
            Stage("burst", "source commit", rows, written.get("seconds", 0.0), note=f"{per_tx:,} rows/transaction")
        )
        capture = self.report.add(Stage("burst", "capture", rows, done["capture"], note="from the first update"))
        pipeline = self.report.add(Stage("burst", "pipeline", rows, done["pipeline"], note="every row's new revision"))
        pipeline.ratio_vs_capture = _ratio(pipeline.rows_per_s, capture.rows_per_s)
        self.say(f"burst: capture {done['capture']:.1f}s, pipeline {done['pipeline']:.1f}s")

    def catchup(self) -> None:
        """The topic as it is now, applied from a fresh checkpoint into a fresh database by the stream, then
        by the plain single-process consumer into another; both end in the same replica."""
        self.stop_stream("main")  # the catch-up has the machine to itself
        offsets = self.kafka.offsets(self.orders_topic)
        records = sum(high - low for low, high in offsets.values())
        end_offsets = {self.orders_topic: {str(p): high for p, (_, high) in offsets.items()}}
        capture = self.report.stage("snapshot", "capture")
        capture_rate = capture.rows_per_s if capture else None

        config = self._pipeline(f"{self.name}_cs", [ORDERS], self.options.trigger_interval)
        stream = self.start_stream("catchup", config)
        ready = wait_until(
            {"source": stream.source_initialized},
            started=stream.started_at,
            timeout=self.options.wait_timeout_s,
            interval=0.1,
            guard=stream.guard,
        )["source"]
        t_ready = stream.started_at + ready
        done = wait_until(
            {"applied": lambda: self.replica_complete(config.name)},
            started=t_ready,
            timeout=self.options.wait_timeout_s,
            guard=stream.guard,
        )["applied"]
        self.stop_stream("catchup")
        self.say(f"catch-up: the stream applied {records:,} records in {done:.1f}s (+{ready:.1f}s to start)")

        baseline = self.run_baseline(f"{self.name}_cb", end_offsets)
        if baseline["records"] != records:
            raise BenchError(f"the plain consumer read {baseline['records']} records, expected {records}")
        if not self.replica_complete(f"{self.name}_cb"):
            raise BenchError(f"the plain consumer's replica is not complete: {self.replica(f'{self.name}_cb')}")
        self.say(f"catch-up: the plain consumer applied {records:,} records in {baseline['seconds']:.1f}s")

        self.report.add(Stage("catchup", "stream startup", 0, ready, note="spark-submit -> source initialized"))
        applied = self.report.add(Stage("catchup", "stream", records, done, note=f"{records:,} change events"))
        plain = self.report.add(Stage("catchup", "plain consumer", records, baseline["seconds"], note="baseline"))
        applied.ratio_vs_baseline = _ratio(applied.rows_per_s, plain.rows_per_s)
        if capture_rate:
            applied.ratio_vs_capture = _ratio(applied.rows_per_s, capture_rate)
            plain.ratio_vs_capture = _ratio(plain.rows_per_s, capture_rate)

    def run_baseline(self, database: str, end_offsets: dict[str, dict[str, int]]) -> dict[str, Any]:
        config = self._pipeline(database, [ORDERS], self.options.trigger_interval)
        argv = [
            sys.executable, "-m", "cdc_pipeline.bench.baseline", "--config", str(self.work_dir / f"{config.name}.yaml"),
            "--database", database, "--end-offsets", json.dumps(end_offsets),
        ]  # fmt: skip
        log_path = self.work_dir / "baseline.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=log, env=self._env(), cwd=self.work_dir, start_new_session=True
            )
        self.sampler.watch(BASELINE, process.pid)
        try:
            out, _ = process.communicate(timeout=self.options.wait_timeout_s)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
        finally:
            self.sampler.forget(BASELINE)
        if process.returncode != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            raise BenchError(f"the plain consumer failed (exit {process.returncode}):\n{tail}")
        return json.loads(out.decode().strip().splitlines()[-1])

    def latency(self) -> None:
        """A probe row every 100 ms under `rate` background changes/s, with a sub-second trigger: the time
        from its commit in PostgreSQL until ClickHouse FINAL shows it."""
        self.stop_stream("main")
        database = f"{self.name}_lat"
        config = self._pipeline(database, [ORDERS, PROBE], self.options.latency_trigger, starting_offsets="latest")
        stream = self.start_stream("latency", config)
        self._ready(stream)
        load = BackgroundLoad(self.conninfo, self.name, self.options.rows, self.options.rate)
        prober = Prober(self.conninfo, self.name)
        watcher = VisibilityWatcher(self, database)
        load.start()
        watcher.start()
        try:
            # Warm-up (not measured): until a probe is visible, the stream may still be creating tables.
            warmup = threading.Event()

            def warm() -> bool:
                if watcher.seen:
                    warmup.set()
                    return True
                watcher.expect(*prober.probe())
                return False

            load_started = time.monotonic()
            wait_until(
                {"first visible probe": warm},
                started=load_started,
                timeout=self.options.wait_timeout_s,
                interval=PROBE_INTERVAL_S,
                guard=stream.guard,
            )
            # ...and for at least `latency_warmup_seconds` of load: the first batches run on a cold JVM (code
            # generation, JIT) and leave a backlog the stream then drains; the window measures the steady state.
            while time.monotonic() < load_started + self.options.latency_warmup_seconds:
                watcher.expect(*prober.probe())
                stream.guard()
                time.sleep(PROBE_INTERVAL_S)
            watcher.reset()
            committed: dict[int, float] = {}
            end = time.monotonic() + self.options.latency_seconds
            next_probe = time.monotonic()
            while time.monotonic() < end:
                probe_id, at = prober.probe()
                committed[probe_id] = at
                watcher.expect(probe_id, at)
                stream.guard()
                next_probe += PROBE_INTERVAL_S
                time.sleep(max(0.0, next_probe - time.monotonic()))
            # A stream slower than the load falls further behind for as long as the load runs: its latency has
            # no bound. The drain is bounded too; a probe not visible by then counts with the time it has
            # waited (a lower bound), and the figures say so.
            with contextlib.suppress(BenchError):
                wait_until(
                    {"every probe visible": lambda: set(committed) <= set(watcher.seen)},
                    started=time.monotonic(),
                    timeout=min(
                        self.options.wait_timeout_s, max(LATENCY_DRAIN_MIN_S, 3 * self.options.latency_seconds)
                    ),
                    guard=stream.guard,
                )
            drained_at = time.monotonic()
        finally:
            load.stop()
            watcher.stop()
            prober.close()
            self.stop_stream("latency")
        if load.error:
            raise BenchError(f"the background load failed: {load.error}")
        seen = dict(watcher.seen)
        latencies = [seen[i] - at for i, at in committed.items() if i in seen]
        if not latencies:
            raise BenchError("no probe became visible in ClickHouse")
        waited = [drained_at - at for i, at in committed.items() if i not in seen]
        every = latencies + waited
        self.report.latency = {
            "probes": len(committed),
            "visible": len(latencies),
            "not_visible": len(waited),
            # With probes not visible, every figure is a lower bound (they count with the time they waited).
            "lower_bound": bool(waited),
            "p50_s": round(percentile(every, 50), 3),
            "p99_s": round(percentile(every, 99), 3),
            "max_s": round(max(every), 3),
            "mean_s": round(sum(every) / len(every), 3),
            "seconds": self.options.latency_seconds,
            "warmup_s": self.options.latency_warmup_seconds,
            "load_changes_per_s": round(load.achieved_rate, 1),
            "load_target_per_s": self.options.rate,
            "trigger": self.options.latency_trigger,
            "poll_interval_s": VISIBILITY_POLL_S,
        }
        lat = self.report.latency
        at_least = ">= " if lat["lower_bound"] else ""
        self.say(
            f"latency: p50 {at_least}{lat['p50_s']:.2f}s, p99 {at_least}{lat['p99_s']:.2f}s, "
            f"max {at_least}{lat['max_s']:.2f}s ({lat['not_visible']} of {lat['probes']} probes not visible)"
        )

    # ---------------------------------------------------------------------------------------------
    def cleanup(self, *, drop_data: bool) -> None:
        """Stop what the run started; with `drop_data`, also remove its connector, slot, publication, schema,
        ClickHouse databases and topics (on a stack the bench did not start)."""
        for label in list(self.streams):
            with contextlib.suppress(Exception):
                self.stop_stream(label)
        if drop_data:
            with contextlib.suppress(Exception):
                remove_connector(self.settings, self.main)
            with contextlib.suppress(Exception), psycopg.connect(self.conninfo, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.name)))
            for database in (self.name, f"{self.name}_cs", f"{self.name}_cb", f"{self.name}_lat"):
                with contextlib.suppress(Exception):
                    self.clickhouse.command(f"DROP DATABASE IF EXISTS `{database}`")
            with contextlib.suppress(Exception):
                self.kafka.delete_topics(self.name)
            with contextlib.suppress(Exception):
                self.kafka.delete_topics(f"__debezium-heartbeat.{self.name}")
        with contextlib.suppress(Exception):
            self.kafka.close()
        with contextlib.suppress(Exception):
            self.clickhouse.close()


class VisibilityWatcher(threading.Thread):
    """Polls the probe replica with FINAL and records, per probe id, when it was first visible (epoch s)."""

    def __init__(self, bench: Bench, database: str) -> None:
        super().__init__(name="bench-visibility", daemon=True)
        self.client = connect_clickhouse(
            bench.settings.clickhouse_endpoint, bench.settings.clickhouse_user, bench._ch_password
        )
        self.database = database
        self.seen: dict[int, float] = {}
        self._pending: set[int] = set()
        self._lock = threading.Lock()
        self._stop_event = threading.Event()

    def expect(self, probe_id: int, _committed_at: float) -> None:
        with self._lock:
            self._pending.add(probe_id)

    def reset(self) -> None:
        with self._lock:
            self.seen = {}
            self._pending = set()

    def run(self) -> None:
        while not self._stop_event.wait(VISIBILITY_POLL_S):
            with self._lock:
                if not self._pending:
                    continue
                low = min(self._pending)
            try:
                ids = self.client.query(
                    "SELECT id FROM {db:Identifier}.{t:Identifier} FINAL WHERE id >= {low:Int64}",
                    parameters={"db": self.database, "t": PROBE, "low": low},
                ).result_rows
            except Exception:  # the replica table does not exist before the first probe arrives
                continue
            now = time.time()
            with self._lock:
                for (probe_id,) in ids:
                    if probe_id in self._pending:
                        self._pending.discard(probe_id)
                        self.seen[probe_id] = now

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)
        with contextlib.suppress(Exception):
            self.client.close()


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies waiting to be reaped do not count)."""
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
    return False


def remove_connector(settings: Settings, config: PipelineConfig) -> None:
    """Delete the connector, then its slot (once inactive) and publication."""
    with contextlib.suppress(Exception):
        ConnectClient(settings.connect_url).delete(connector_name(config))
    with psycopg.connect(settings.postgres_conninfo(), autocommit=True) as conn:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (config.slot_name,)
            ).fetchone()
            if row is None:
                break
            if not row[0]:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (config.slot_name,))
                break
            time.sleep(1)
        conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(config.publication_name)))


def _ratio(value: float, reference: float) -> float | None:
    return value / reference if reference else None

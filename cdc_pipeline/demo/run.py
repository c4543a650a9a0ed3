"""The demo: start (or find) the stack, create the shop with a generated history, provision the connector,
start the stream and Dagster, run the shop's live activity while showing the pipeline's progress, and end
with a summary that compares every replica with its source. Everything it started is stopped at the end,
on Ctrl-C or SIGTERM; nothing it found running is touched."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import yaml
from clickhouse_connect.driver.binding import quote_identifier
from psycopg import sql
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from cdc_pipeline.bench.env import free_ports
from cdc_pipeline.clickhouse_client import connect_clickhouse
from cdc_pipeline.config import PipelineConfig, parse_pipeline_config
from cdc_pipeline.contract import LIVE_ROWS
from cdc_pipeline.control.reconcile import primary_key, reconcile
from cdc_pipeline.control.replicas import ClickHouseReplica
from cdc_pipeline.demo.dagster import DagsterProcess, start_dagster
from cdc_pipeline.process import port_open
from cdc_pipeline.settings import Settings
from cdc_pipeline.streaming.progress import PROGRESS_TABLE
from cdc_pipeline.terminal import count_bar, maven_spinner
from cdc_pipeline.workload.shop import SHOP_TABLES, LiveActivity, Shop, ShopState, create_shop_schema

MATCH_LINE = "every replica table matches its source"  # printed (and tested) when the demo ends well
POLL_S = 2.0


class DemoError(RuntimeError):
    """A step of the demo failed; the message names the step and what to look at."""


@dataclass
class DemoOptions:
    rate: float = 50.0  # changed rows per second
    duration: float | None = None  # seconds of live activity; None: until Ctrl-C
    dagster: bool = True
    dagster_port: int = 3000
    name: str = "shop"  # the pipeline's name: connector, slot, topics, query derive from it
    schema: str = "public"
    database: str | None = None  # ClickHouse database; None: CDC_CLICKHOUSE_DATABASE
    customers: int = 1000
    products: int = 300
    orders: int = 5000
    seed: int = 0
    trigger_interval: str = "2 seconds"
    timeout_s: float = 900.0  # for each wait: the stream starting, the snapshot, settling at the end


def demo_pipeline(options: DemoOptions) -> dict[str, Any]:
    """The demo's pipeline definition (pipeline.yaml syntax) over the shop's five tables."""
    schema = options.schema
    tables: list[dict[str, Any]] = [{"name": f"{schema}.{t}", "clickhouse_table": t} for t in SHOP_TABLES]
    for entry in tables:
        if entry["clickhouse_table"] == "orders":
            entry["partition_by"] = "toYYYYMM(created_at)"
        if entry["clickhouse_table"] == "order_items":
            entry["primary_key"] = ["order_id", "line_no"]
    return {
        "name": options.name,
        "source": {
            "schemas": [schema],
            "signal_table": f"{schema}.cdc_signal",
            "heartbeat_table": f"{schema}.cdc_heartbeat",
            "heartbeat_interval_ms": 10000,
        },
        "tables": tables,
        "sink": {"clickhouse": {"database": options.database}},
        "stream": {"trigger_interval": options.trigger_interval},
    }


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class _Log:
    """What the asset checks' code logs to (Dagster's context.log outside Dagster): nothing."""

    def info(self, *_: object) -> None:
        pass

    warning = error = info


@dataclass
class Demo:
    settings: Settings
    options: DemoOptions
    console: Console
    started_services: list[str] = field(default_factory=list)
    stream_started: bool = False
    dagster: DagsterProcess | None = None
    activity: LiveActivity | None = None
    pipeline: PipelineConfig | None = None
    config_path: Path | None = None
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="milliseconds"))
    local: Any = None  # the LocalStack

    def __post_init__(self) -> None:
        self.directory = self.settings.stack_dir.resolve() / "demo"
        self.conninfo = self.settings.postgres_conninfo()
        password = self.settings.clickhouse_password
        self._ch_password = password.get_secret_value() if password else None

    def say(self, message: str) -> None:
        self.console.log(message)

    # --- resources shared with Dagster (the stream is started exactly as the start_stream job does) ------
    def resources(self) -> dict[str, Any]:
        from cdc_pipeline.resources import (
            ClickHouseResource,
            ControlPlaneResource,
            KafkaConnectResource,
            KafkaResource,
            MonitorResource,
            PostgresResource,
            SparkResource,
        )

        s = self.settings
        return {
            "control_plane": ControlPlaneResource(
                config_path=str(self.config_path), stack_dir=str(s.stack_dir.resolve())
            ),
            "spark": SparkResource(master=s.spark_master, jvm_cache_dir=str(s.jvm_cache_dir)),
            "kafka": KafkaResource(bootstrap_servers=s.kafka_bootstrap_servers),
            "kafka_connect": KafkaConnectResource(url=s.connect_url),
            "clickhouse": ClickHouseResource(
                url=s.clickhouse_endpoint,
                user=s.clickhouse_user,
                password=self._ch_password,
                database=s.clickhouse_database,
            ),  # fmt: skip
            "postgres": PostgresResource(
                dsn=s.postgres_dsn, password=s.postgres_password.get_secret_value() if s.postgres_password else None
            ),
            "monitor": MonitorResource(check_wait_s=60),
        }

    def clickhouse(self):  # noqa: ANN201 - clickhouse_connect Client
        return connect_clickhouse(self.settings.clickhouse_endpoint, self.settings.clickhouse_user, self._ch_password)

    @property
    def database(self) -> str:
        assert self.pipeline is not None
        return self.pipeline.clickhouse_database(self.settings.clickhouse_database)

    # --- steps ---------------------------------------------------------------------------------------
    def start_stack(self) -> None:
        from cdc_pipeline.jvm import ArtifactError
        from cdc_pipeline.stack.lifecycle import LocalStack
        from cdc_pipeline.stack.services import StackError

        with maven_spinner(self.console) as progress:
            local = LocalStack(self.settings, say=self.say, maven_progress=progress)
            before = set(local.running())
            self.local = local
            try:
                local.up()
            except (StackError, ArtifactError) as exc:
                self.started_services = [n for n in local.running() if n not in before]
                raise DemoError(f"the stack did not start: {exc}") from exc
        self.started_services = [n for n in local.running() if n not in before]
        if before:
            self.say(f"using the running {', '.join(sorted(before))} (left running at the end)")

    def create_shop(self) -> Shop:
        options = self.options
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            create_shop_schema(conn, options.schema)
            count = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(options.schema, "orders"))
            ).fetchone()[0]
            if count:
                self.say(f"the shop in schema {options.schema} has {count:,} orders already: continuing it")
                return Shop(options.schema, seed=options.seed + count, state=ShopState.load(conn, options.schema))
            shop = Shop(options.schema, seed=options.seed)
            self.say(
                f"generating the shop's history in schema {options.schema}: {options.customers:,} customers, "
                f"{options.products:,} products, {options.orders:,} orders with their items and payments"
            )
            with count_bar(self.console) as bar:
                task = bar.add_task("history (orders)", total=options.orders)
                chunk = max(1, options.orders // 50)
                first = True
                for done in range(0, options.orders, chunk):
                    size = min(chunk, options.orders - done)
                    shop.history(
                        conn, customers=options.customers if first else 0, products=options.products if first else 0,
                        orders=size, start_index=done, total_orders=options.orders,
                    )  # fmt: skip
                    first = False
                    bar.update(task, advance=size)
            self.say(f"history written: {shop.changes:,} row changes")
            return shop

    def write_pipeline(self) -> None:
        raw = demo_pipeline(self.options)
        self.pipeline = parse_pipeline_config(raw, source=f"demo pipeline {self.options.name}")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path = self.directory / f"{self.options.name}.yaml"
        header = "# Written by `cdc-pipeline demo`: the demo's pipeline (Dagster started by the demo reads it).\n"
        self.config_path.write_text(header + yaml.safe_dump(raw, sort_keys=False))

    def provision(self) -> None:
        from cdc_pipeline.control.provision import ProvisionError, provision_pipeline, wait_connector_running

        assert self.pipeline is not None
        try:
            name = provision_pipeline(self.settings, self.pipeline, self.say)
            with self.console.status(f"waiting until connector {name} runs..."):
                wait_connector_running(self.resources()["kafka_connect"], name)
        except ProvisionError as exc:
            raise DemoError(str(exc)) from exc
        except Exception as exc:  # ConnectorFailed with the task's error
            raise DemoError(f"connector of {self.options.name} did not start: {exc}") from exc
        self.say(f"connector {name} runs: its initial snapshot reads the history")

    def start_dagster(self) -> None:
        port = self.options.dagster_port
        if port_open("127.0.0.1", port):
            (port,) = free_ports(1)
            self.say(f"port {self.options.dagster_port} is in use: Dagster gets port {port}")
        assert self.config_path is not None
        self.dagster = start_dagster(self.settings, self.config_path, self.directory / "dagster_home", port)
        self.say(f"starting Dagster (webserver + daemon) at {self.dagster.url}; log {self.dagster.log_path}")

    def controller(self):  # noqa: ANN201 - StreamController
        assert self.pipeline is not None
        return self.resources()["control_plane"].controller(self.pipeline)

    def start_stream(self) -> None:
        from cdc_pipeline.control.stream import StreamControlError
        from cdc_pipeline.defs.common import start_stream
        from cdc_pipeline.jvm import ArtifactError

        r = self.resources()
        already = self.controller().status().running
        try:
            with self.console.status("starting the stream (spark-submit; the JVM takes a while)..."):
                status = start_stream(
                    r["control_plane"], r["spark"], r["kafka"], r["clickhouse"], started_by="cdc-pipeline demo",
                    timeout=self.options.timeout_s,
                )  # fmt: skip
        except (StreamControlError, ArtifactError) as exc:
            self.stream_started = not already
            raise DemoError(str(exc)) from exc
        self.stream_started = not already
        verb = "was already running" if already else "runs"
        self.say(f"stream {self.pipeline.query_name} {verb} (pid {status.pid}, log {status.log_path})")

    def guard(self) -> None:
        """Raise when waiting is pointless: the stream or Dagster died."""
        controller = self.controller()
        if not controller.status().running:
            raise DemoError(f"the stream exited; last lines of {controller.log_path}:\n{controller.log_tail(30)}")
        if self.activity is not None and self.activity.error is not None:
            raise DemoError(f"the shop's activity failed: {self.activity.error}")

    # --- measurements -------------------------------------------------------------------------------
    def source_counts(self) -> dict[str, int]:
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            return {
                t: conn.execute(
                    sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(self.options.schema, t))
                ).fetchone()[0]
                for t in SHOP_TABLES
            }

    def replica_counts(self, client: Any) -> dict[str, int]:
        counts = {}
        for table in SHOP_TABLES:
            try:
                counts[table] = int(
                    client.command(
                        f"SELECT count() FROM {quote_identifier(self.database)}.{quote_identifier(table)} FINAL "
                        f"WHERE {LIVE_ROWS}"
                    )
                )
            except Exception:  # not created yet: the stream creates it with its first batch
                counts[table] = 0
        return counts

    def lag(self) -> int | None:
        from cdc_pipeline.defs.common import stream_lag

        try:
            return stream_lag(self.resources()["kafka"], self.pipeline).total
        except Exception:
            return None

    def stream_progress(self, client: Any) -> dict[str, Any]:
        """Batches, records read, DLQ records and the newest batch's latency since the demo started."""
        try:
            row = client.query(
                f"SELECT count(), sum(num_input_rows), sum(dlq_count), "
                f"dateDiff('millisecond', argMax(latest_source_ts, batch_id), argMax(recorded_at, batch_id)) "
                f"FROM {quote_identifier(self.database)}.{PROGRESS_TABLE} FINAL "
                "WHERE query_name = {q:String} AND recorded_at > parseDateTime64BestEffort({t:String}, 3, 'UTC')",
                parameters={"q": self.pipeline.query_name, "t": self.started_at},
            ).result_rows[0]
        except Exception:
            return {}
        return {"batches": row[0], "applied": row[1] or 0, "dlq": row[2] or 0, "latency_ms": row[3]}

    def wait_snapshot(self) -> None:
        expected = self.source_counts()
        total = sum(expected.values())
        deadline = time.monotonic() + self.options.timeout_s
        client = self.clickhouse()
        try:
            with count_bar(self.console) as bar:
                task = bar.add_task("initial snapshot -> ClickHouse (rows)", total=total)
                while True:
                    counts = self.replica_counts(client)
                    bar.update(task, completed=sum(min(counts[t], expected[t]) for t in SHOP_TABLES))
                    if counts == expected:
                        break
                    if time.monotonic() > deadline:
                        raise DemoError(
                            f"the snapshot did not reach ClickHouse in {self.options.timeout_s:.0f} s: replica "
                            f"{counts}, source {expected}; see {self.controller().log_path}"
                        )
                    self.guard()
                    time.sleep(POLL_S)
        finally:
            client.close()
        self.say(f"the replica holds the history: {total:,} rows in {len(SHOP_TABLES)} tables")

    # --- the live phase -----------------------------------------------------------------------------
    def where_to_look(self) -> None:
        from cdc_pipeline.defs.translator import CdcTranslator

        assert self.pipeline is not None
        stream_key = "/".join(CdcTranslator(self.pipeline).stream_key().path)
        lines = [f"ClickHouse: {self.settings.clickhouse_endpoint}, database {self.database} (tables with FINAL)"]
        if self.dagster is not None:
            lines.insert(0, f"Dagster:    {self.dagster.url}  (asset graph: {self.dagster.url}/asset-groups)")
            lines.insert(1, f"The stream: {self.dagster.url}/assets/{stream_key}  (observations, lag, checks)")
        lines.append(f"Stream log: {self.controller().log_path}")
        self.console.rule("where to look")
        for line in lines:
            self.console.print(line)
        self.console.rule()

    def live(self, shop: Shop) -> bool:
        """Run the activity until the duration is over (True) or Ctrl-C (False)."""
        options = self.options
        self.activity = LiveActivity(self.conninfo, shop, options.rate)
        started = time.monotonic()
        self.activity.start()
        client = self.clickhouse()
        metrics: dict[str, Any] = {}
        next_poll = 0.0
        interrupted = False
        try:
            with Live(self._panel(0, metrics), console=self.console, refresh_per_second=2) as live:
                while options.duration is None or time.monotonic() - started < options.duration:
                    if time.monotonic() >= next_poll:
                        metrics = {**self.stream_progress(client), "lag": self.lag()}
                        if self.dagster is not None:
                            metrics["dagster"] = (
                                "ready" if self.dagster.ready() else "starting" if self.dagster.alive() else "EXITED"
                            )
                        next_poll = time.monotonic() + POLL_S
                        self.guard()
                    live.update(self._panel(time.monotonic() - started, metrics))
                    time.sleep(0.5)
        except KeyboardInterrupt:
            interrupted = True
            self.console.log("[yellow]Ctrl-C: stopping the activity[/yellow]")
        finally:
            self.activity.stop()
            client.close()
        self.say(f"the activity wrote {self.activity.changes:,} changes in {time.monotonic() - started:.0f} s")
        return not interrupted

    def _panel(self, elapsed: float, m: dict[str, Any]) -> Group:
        activity = self.activity
        written = activity.changes if activity else 0
        table = Table(title=f"pipeline {self.options.name}: live", show_header=True, expand=False)
        for column in ("elapsed", "changes written", "records applied", "lag", "latency", "DLQ", "Dagster"):
            table.add_column(column, justify="right")
        duration = f" / {self.options.duration:.0f}" if self.options.duration else ""
        latency = m.get("latency_ms")
        table.add_row(
            f"{elapsed:.0f}{duration} s",
            f"{written:,} ({written / elapsed if elapsed else 0:.0f}/s)",
            f"{m.get('applied', 0):,} in {m.get('batches', 0)} batches",
            "?" if m.get("lag") is None else f"{m['lag']:,}",
            "-" if latency is None else f"{latency / 1000:.1f} s",
            f"{m.get('dlq', 0):,}",
            m.get("dagster", "off"),
        )
        return Group(table, "[dim]Ctrl-C stops the demo and everything it started[/dim]")

    # --- the end --------------------------------------------------------------------------------------
    def settle(self) -> tuple[dict[str, int], dict[str, int]]:
        """Wait until the stream applied everything (lag 0 and counts equal), bounded by the timeout."""
        deadline = time.monotonic() + self.options.timeout_s
        client = self.clickhouse()
        try:
            with self.console.status("waiting until the stream has applied every change...") as status:
                while True:
                    source, replica = self.source_counts(), self.replica_counts(client)
                    lag = self.lag()
                    if source == replica and lag == 0:
                        return source, replica
                    if time.monotonic() > deadline:
                        return source, replica
                    status.update(f"waiting until the stream has applied every change (lag {lag})...")
                    self.guard()
                    time.sleep(POLL_S)
        finally:
            client.close()

    def summary(self) -> bool:
        from cdc_pipeline.defs.assets import table_checks
        from cdc_pipeline.defs.translator import CdcTranslator

        assert self.pipeline is not None
        source, replica = self.settle()
        r = self.resources()
        translator = CdcTranslator(self.pipeline)
        client = self.clickhouse()
        table = Table(title=f"summary: PostgreSQL {self.options.schema} vs ClickHouse {self.database} (FINAL)")
        for column in ("table", "source rows", "replica rows", "row-by-row", "checks"):
            table.add_column(column, justify="right" if "rows" in column else "left")
        ok = True
        try:
            with psycopg.connect(self.conninfo, autocommit=True) as conn:
                for name in SHOP_TABLES:
                    table_config = self.pipeline.table(f"{self.options.schema}.{name}")
                    key = table_config.primary_key or primary_key(conn, self.options.schema, name)
                    sink = ClickHouseReplica(client, self.database, name)
                    diff = reconcile(conn, sink, self.options.schema, name, key)
                    results = table_checks(
                        table_config, self.pipeline, r["postgres"], r["kafka"], r["kafka_connect"], sink, r["monitor"],
                        translator.sink_key(table_config), _Log(),
                    )  # fmt: skip
                    failed = [c.check_name for c in results if not c.passed]
                    rows_ok = source[name] == replica[name] and diff.total == 0
                    ok = ok and rows_ok and not failed
                    table.add_row(
                        name, f"{source[name]:,}", f"{replica[name]:,}",
                        "equal" if diff.total == 0 else f"[red]{len(diff.missing)} missing, {len(diff.extra)} "
                        f"extra, {len(diff.different)} differ[/red]",
                        f"{len(results)} passed" if not failed else f"[red]failed: {', '.join(failed)}[/red]",
                    )  # fmt: skip
                money_ok, money = self.money(conn, client)
                ok = ok and money_ok
        finally:
            client.close()
        self.console.print(table)
        self.console.print(money)
        if ok:
            self.console.print(f"[bold green]OK: {MATCH_LINE}[/bold green] (row counts, every row and the checks)")
        else:
            self.console.print("[bold red]MISMATCH: a replica differs from its source or a check failed[/bold red]")
        return ok

    def money(self, conn: psycopg.Connection, client: Any) -> tuple[bool, str]:
        """Revenue and captured payments, summed on both sides: exact decimals, to the cent."""
        schema, db = self.options.schema, quote_identifier(self.database)
        query = sql.SQL(
            "SELECT (SELECT coalesce(sum(total), 0) FROM {} WHERE status <> 'cancelled'), "
            "(SELECT coalesce(sum(amount), 0) FROM {} WHERE status = 'captured')"
        ).format(sql.Identifier(schema, "orders"), sql.Identifier(schema, "payments"))
        pg = conn.execute(query).fetchone()
        ch = client.query(
            f"SELECT (SELECT sum(total) FROM {db}.orders FINAL WHERE {LIVE_ROWS} AND status != 'cancelled'), "
            f"(SELECT sum(amount) FROM {db}.payments FINAL WHERE {LIVE_ROWS} AND status = 'captured')"
        ).result_rows[0]
        same = [a == b for a, b in zip(pg, ch, strict=True)]
        text = (
            f"money: orders {pg[0]} EUR in PostgreSQL, {ch[0]} in ClickHouse ({'equal' if same[0] else 'DIFFERENT'}); "
            f"captured payments {pg[1]} vs {ch[1]} ({'equal' if same[1] else 'DIFFERENT'})"
        )
        return all(same), text

    def stop(self) -> None:
        """Stop what the demo started, newest first; nothing it found running."""
        if self.activity is not None and self.activity.is_alive():
            self.activity.stop()
        if self.dagster is not None and self.dagster.alive():
            self.say("stopping Dagster")
            self.dagster.stop()
        if self.stream_started:
            self.say("stopping the stream")
            with contextlib.suppress(Exception):
                self.controller().stop()
        if self.started_services:
            self.say(f"stopping the services the demo started: {', '.join(self.started_services)}")
            self.local.down(only=self.started_services)


def run_demo(settings: Settings, options: DemoOptions, console: Console | None = None) -> int:
    """Returns the exit code: 0 when the summary shows every replica equal to its source."""
    console = console or Console(log_path=False, width=None if sys.stdout.isatty() else 120)
    logging.getLogger("clickhouse_connect").setLevel(logging.CRITICAL)
    signal.signal(signal.SIGTERM, _interrupt)  # a terminated demo still stops what it started
    demo = Demo(settings, options, console)
    try:
        demo.start_stack()
        shop = demo.create_shop()
        demo.write_pipeline()
        demo.provision()
        if options.dagster:
            demo.start_dagster()  # boots while the stream starts
        demo.start_stream()
        demo.wait_snapshot()
        demo.where_to_look()
        demo.live(shop)
        try:
            return 0 if demo.summary() else 1
        except KeyboardInterrupt:
            console.log("[yellow]interrupted: no summary[/yellow]")
            return 130
    except KeyboardInterrupt:
        console.log("[yellow]interrupted: stopping what the demo started[/yellow]")
        return 130
    except DemoError as exc:
        console.print(f"[bold red]demo failed:[/bold red] {exc}")
        return 1
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            demo.stop()

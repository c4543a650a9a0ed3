"""The `cdc-pipeline` command."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click
from pydantic import ValidationError

from cdc_pipeline.settings import Settings, load_settings


def _settings(state_dir: Path | None) -> Settings:
    try:
        return load_settings(stack_dir=state_dir)
    except ValidationError as exc:
        raise click.ClickException(f"invalid settings:\n{exc}") from exc


@click.group()
def main() -> None:
    """cdc-pipeline: PostgreSQL -> Debezium -> Kafka -> Spark -> ClickHouse, run by Dagster."""
    # Health probes expect refusals while services start; the client's own error logs are noise.
    logging.getLogger("clickhouse_connect").setLevel(logging.CRITICAL)


@main.group()
def stack() -> None:
    """The local stack (PostgreSQL, Kafka, Kafka Connect + Debezium, ClickHouse) without Docker."""


state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the stack keeps data, logs and pid files [env CDC_STACK_DIR; default .stack].",
)


@stack.command()
@state_dir_option
def up(state_dir: Path | None) -> None:
    """Start every service that is not running and wait until all answer (idempotent)."""
    from rich.console import Console

    from cdc_pipeline.jvm import ArtifactError
    from cdc_pipeline.stack.lifecycle import LocalStack
    from cdc_pipeline.stack.services import StackError
    from cdc_pipeline.terminal import maven_spinner

    try:
        with maven_spinner(Console()) as progress:
            local = LocalStack(_settings(state_dir), maven_progress=progress)
            statuses = local.up()
    except (StackError, ArtifactError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Stack is up (state in {local.state_dir}):")
    for status in statuses:
        click.echo(f"  {status.name:<10} {status.endpoint:<45} pid {status.pid or '-'}")


@stack.command()
@state_dir_option
@click.option("--purge", is_flag=True, help="Also delete all data (PostgreSQL, Kafka, ClickHouse) and logs.")
def down(state_dir: Path | None, purge: bool) -> None:
    """Stop every service the stack started; data survives unless --purge."""
    from cdc_pipeline.stack.lifecycle import LocalStack

    stopped = LocalStack(_settings(state_dir)).down(purge=purge)
    click.echo("Nothing was running." if not stopped else f"Stack is down ({', '.join(stopped)}).")


@stack.command()
@state_dir_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(state_dir: Path | None, as_json: bool) -> None:
    """Each service's endpoint, pid and health. Exit code 1 if any service is unhealthy."""
    from cdc_pipeline.stack.lifecycle import LocalStack

    statuses = LocalStack(_settings(state_dir), say=lambda _: None).status()
    if as_json:
        click.echo(json.dumps({s.name: s.as_dict() for s in statuses}, indent=2))
    else:
        for s in statuses:
            mark = "healthy" if s.healthy else "DOWN"
            owner = f"pid {s.pid}" if s.pid else ("external" if not s.managed else "not running")
            click.echo(f"{s.name:<10} {mark:<8} {s.endpoint:<45} {owner:<12} {s.detail}")
    sys.exit(0 if all(s.healthy for s in statuses) else 1)


config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="pipeline.yaml [env CDC_PIPELINE_CONFIG; default ./pipeline.yaml].",
)  # fmt: skip


def _pipeline(config_path: Path | None):  # noqa: ANN202 - PipelineConfig, imported lazily
    from cdc_pipeline.config import PipelineConfigError, default_config_path, load_pipeline_config

    try:
        return load_pipeline_config(config_path or default_config_path())
    except PipelineConfigError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@config_option
def provision(config_path: Path | None) -> None:
    """Prepare the source (signal and heartbeat tables), check it (the same checks as Dagster's
    `provision` job: nothing is changed while one fails), create the missing Kafka topics, and create
    or update the Debezium connector."""
    from cdc_pipeline.control.provision import ProvisionError, provision_pipeline

    settings = _settings(None)
    pipeline = _pipeline(config_path)
    try:
        name = provision_pipeline(settings, pipeline, click.echo)
    except ProvisionError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Connector {name} is configured ({len(pipeline.tables)} tables).")


@main.command()
@click.option("--schema", default="public", show_default=True, help="PostgreSQL schema of the e-commerce tables.")
@click.option("--changes", default=1000, show_default=True, help="How many random changes to make.")
@click.option("--seed", default=0, show_default=True)
def workload(schema: str, changes: int, seed: int) -> None:
    """Create the e-commerce tables if needed and make random inserts, updates and deletes."""
    import psycopg

    from cdc_pipeline.workload.ecommerce import Workload, create_schema

    settings = _settings(None)
    with psycopg.connect(settings.postgres_conninfo(), autocommit=True) as conn:
        create_schema(conn, schema)
        generator = Workload(schema, seed=seed)
        generator.resume(conn)
        generator.run(conn, changes)
    click.echo(f"Made {changes} changes in {schema}.")


_IDENTIFIER = r"[a-z_][a-z0-9_]*"


def _identifier(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    import re

    if value is not None and not re.fullmatch(_IDENTIFIER, value):
        raise click.BadParameter(f"{value!r}: use lower-case letters, digits and _ (not a digit first)")
    return value


@main.command()
@click.option(
    "--duration", type=click.FloatRange(min=1), default=None, help="Seconds of live activity [default: until Ctrl-C]."
)
@click.option("--rate", type=click.FloatRange(min=1), default=50, show_default=True, help="Changed rows per second.")
@click.option("--no-dagster", is_flag=True, help="Do not start Dagster (webserver + daemon).")
@click.option(
    "--dagster-port",
    default=3000,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="Dagster's port (a free one if taken).",
)
@click.option(
    "--name",
    default="shop",
    show_default=True,
    callback=_identifier,
    help="Pipeline name: connector, slot, topics and stream derive from it.",
)
@click.option(
    "--schema", default="public", show_default=True, callback=_identifier, help="PostgreSQL schema of the shop."
)
@click.option(
    "--database",
    default=None,
    callback=_identifier,
    help="ClickHouse database of the replicas [default: CDC_CLICKHOUSE_DATABASE].",
)
@click.option("--orders", default=5000, show_default=True, type=click.IntRange(min=1), help="Orders in the history.")
@click.option("--customers", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--products", default=300, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--timeout",
    "timeout_s",
    default=900,
    show_default=True,
    type=click.FloatRange(min=10),
    help="Longest wait for any one step (stream start, snapshot, catching up at the end).",
)
@state_dir_option
def demo(
    duration: float | None,
    rate: float,
    no_dagster: bool,
    dagster_port: int,
    name: str,
    schema: str,
    database: str | None,
    orders: int,
    customers: int,
    products: int,
    seed: int,
    timeout_s: float,
    state_dir: Path | None,
) -> None:
    """The whole pipeline in one command: start the local stack (what is not running), create a shop with a
    generated history, provision the connector, start the stream and Dagster, run the shop's live activity
    while showing changes written and applied, lag, latency and DLQ, and end (Ctrl-C or --duration) with a
    summary comparing every replica with its source. Stops only what it started."""
    from cdc_pipeline.demo.run import DemoOptions, run_demo

    options = DemoOptions(
        rate=rate,
        duration=duration,
        dagster=not no_dagster,
        dagster_port=dagster_port,
        name=name,
        schema=schema,
        database=database,
        customers=customers,
        products=products,
        orders=orders,
        seed=seed,
        timeout_s=timeout_s,
    )
    sys.exit(run_demo(_settings(state_dir), options))


@main.group()
def stream() -> None:
    """The Spark Structured Streaming application (PostgreSQL changes -> ClickHouse)."""


@stream.command("run")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="pipeline.yaml [env CDC_PIPELINE_CONFIG; default ./pipeline.yaml].",
)
@click.option("--master", default=None, help="Spark master [env CDC_SPARK_MASTER; default local[2]].")
@click.option("--checkpoint-location", default=None, help="Override stream.checkpoint_location.")
@click.option("--conf", "confs", multiple=True, metavar="KEY=VALUE", help="Extra Spark conf (repeatable).")
@click.option(
    "--driver-memory",
    default="1g",
    show_default=True,
    help="Driver JVM heap (e.g. 2g); each micro-batch is bounded to what it holds (README: Memory).",
)
@click.option("--dry-run", is_flag=True, help="Print the spark-submit command instead of running it.")
def stream_run(
    config_path: Path | None,
    master: str | None,
    checkpoint_location: str | None,
    confs: tuple[str, ...],
    driver_memory: str,
    dry_run: bool,
) -> None:
    """Run the streaming application under spark-submit in the foreground (Ctrl-C stops it cleanly)."""
    import shlex
    import subprocess

    from cdc_pipeline.config import default_config_path
    from cdc_pipeline.jvm import ArtifactError
    from cdc_pipeline.streaming.launch import SparkSubmit, submit_env
    from cdc_pipeline.streaming.limits import spark_memory_bytes

    try:
        spark_memory_bytes(driver_memory)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--driver-memory") from None
    settings = _settings(None)
    path = config_path or default_config_path()
    pipeline = _pipeline(path)
    try:
        conf = dict(item.split("=", 1) for item in confs)
        submit = SparkSubmit(
            master=master or settings.spark_master,
            conf=conf,
            jvm_cache_dir=settings.jvm_cache_dir,
            driver_memory=driver_memory,
        )
        argv = submit.stream_argv(path, checkpoint_location=checkpoint_location, name=pipeline.query_name)
    except (ArtifactError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if dry_run:
        click.echo(shlex.join(argv))
        return
    sys.exit(subprocess.call(argv, env=submit_env(master=submit.master)))


@main.command()
@click.option("--rows", default=100_000, show_default=True, type=click.IntRange(min=100), help="Rows of the table.")
@click.option("--rate", default=1_000, show_default=True, type=click.IntRange(min=1), help="Background changes/s.")
@click.option(
    "--latency-seconds", default=60.0, show_default=True, type=click.FloatRange(min=1), help="Latency window."
)
@click.option(
    "--latency-warmup-seconds", default=20.0, show_default=True, type=click.FloatRange(min=0),
    help="Load before the latency window (not measured): the JVM's first batches compile and catch up.",
)  # fmt: skip
@click.option(
    "--scenarios", default="snapshot,burst,catchup,latency", show_default=True, help="Comma list of scenarios."
)
@click.option(
    "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("bench.json"), show_default=True,
    help="Where to write the results as JSON.",
)  # fmt: skip
@click.option("--keep-stack", is_flag=True, help="Leave the stack (and the run's data) in place afterwards.")
@click.option(
    "--use-running-stack", is_flag=True, help="Use the stack the settings point at instead of a throwaway one."
)
@click.option("--rows-per-transaction", default=10_000, show_default=True, type=click.IntRange(min=1))
@click.option("--max-offsets-per-trigger", type=click.IntRange(min=1), default=None, help="Default: pipeline default.")
@click.option("--trigger-interval", default=None, help="Throughput streams' trigger. Default: pipeline default.")
@click.option("--latency-trigger", default="500 milliseconds", show_default=True, help="Latency stream's trigger.")
@click.option("--master", default=None, help="Spark master [env CDC_SPARK_MASTER; default local[2]].")
def bench(
    rows: int,
    rate: int,
    latency_seconds: float,
    latency_warmup_seconds: float,
    scenarios: str,
    output: Path,
    keep_stack: bool,
    use_running_stack: bool,
    rows_per_transaction: int,
    max_offsets_per_trigger: int | None,
    trigger_interval: str | None,
    latency_trigger: str,
    master: str | None,
) -> None:
    """Benchmark the whole pipeline on this machine: snapshot, update burst, catch-up (stream vs a plain
    consumer), latency under load, and peak memory; prints tables and writes JSON."""
    from cdc_pipeline.bench import SCENARIOS
    from cdc_pipeline.bench.main import run_bench
    from cdc_pipeline.bench.scenarios import BenchOptions
    from cdc_pipeline.config import StreamConfig, trigger_interval_ms

    chosen = tuple(s.strip() for s in scenarios.split(",") if s.strip())
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown or not chosen:
        raise click.BadParameter(
            f"unknown {unknown or 'empty list'}; choose from {', '.join(SCENARIOS)}", param_hint="--scenarios"
        )
    for value, hint in ((trigger_interval, "--trigger-interval"), (latency_trigger, "--latency-trigger")):
        try:
            if value is not None:
                trigger_interval_ms(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=hint) from None
    defaults = StreamConfig()
    options = BenchOptions(
        rows=rows, rate=rate, latency_seconds=latency_seconds, latency_warmup_seconds=latency_warmup_seconds,
        scenarios=chosen,
        rows_per_transaction=rows_per_transaction,
        trigger_interval=trigger_interval or defaults.trigger_interval,
        max_offsets_per_trigger=max_offsets_per_trigger or defaults.max_offsets_per_trigger,
        latency_trigger=latency_trigger, master=master, keep=keep_stack,
    )  # fmt: skip
    sys.exit(run_bench(_settings(None), options, output=output, use_running_stack=use_running_stack))


if __name__ == "__main__":
    main()

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
    from cdc_pipeline.stack.jvm import ArtifactError
    from cdc_pipeline.stack.services import StackError
    from cdc_pipeline.stack.stack import LocalStack

    local = LocalStack(_settings(state_dir))
    try:
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
    from cdc_pipeline.stack.stack import LocalStack

    stopped = LocalStack(_settings(state_dir)).down(purge=purge)
    click.echo("Nothing was running." if not stopped else f"Stack is down ({', '.join(stopped)}).")


@stack.command()
@state_dir_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(state_dir: Path | None, as_json: bool) -> None:
    """Each service's endpoint, pid and health. Exit code 1 if any service is unhealthy."""
    from cdc_pipeline.stack.stack import LocalStack

    statuses = LocalStack(_settings(state_dir), say=lambda _: None).status()
    if as_json:
        click.echo(json.dumps({s.name: s.as_dict() for s in statuses}, indent=2))
    else:
        for s in statuses:
            mark = "healthy" if s.healthy else "DOWN"
            owner = f"pid {s.pid}" if s.pid else ("external" if not s.managed else "not running")
            click.echo(f"{s.name:<10} {mark:<8} {s.endpoint:<45} {owner:<12} {s.detail}")
    sys.exit(0 if all(s.healthy for s in statuses) else 1)


if __name__ == "__main__":
    main()

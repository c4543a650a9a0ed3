"""`cdc-pipeline bench`: start (or find) the stack, run the scenarios, print and write the results, and
always stop what the run started (also on Ctrl-C, SIGTERM or a failure)."""

from __future__ import annotations

import shlex
import shutil
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

import click
from rich.console import Console

from cdc_pipeline.bench.env import throwaway_settings
from cdc_pipeline.bench.memory import RssSampler, watch_stack
from cdc_pipeline.bench.report import Report
from cdc_pipeline.bench.scenarios import BASELINE, Bench, BenchOptions
from cdc_pipeline.settings import Settings


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_bench(base: Settings, options: BenchOptions, *, output: Path, use_running_stack: bool) -> int:
    """Returns the exit code: 0 when every scenario was measured (targets do not change it), 1 otherwise."""
    from cdc_pipeline.jvm import ArtifactError
    from cdc_pipeline.stack.lifecycle import LocalStack
    from cdc_pipeline.stack.services import StackError

    console = Console(width=None if sys.stdout.isatty() else 150)
    signal.signal(signal.SIGTERM, _interrupt)  # a terminated run still stops its stack
    settings = base if use_running_stack else throwaway_settings(base)
    local = LocalStack(settings, say=lambda message: console.log(message))
    started_stack = False
    report = Report(
        options={
            "rows": options.rows,
            "rate": options.rate,
            "latency_seconds": options.latency_seconds,
            "latency_warmup_seconds": options.latency_warmup_seconds,
            "scenarios": list(options.scenarios),
            "rows_per_transaction": options.rows_per_transaction,
            "use_running_stack": use_running_stack,
        }
    )
    sampler = RssSampler(outside_total=(BASELINE,))
    bench: Bench | None = None
    try:
        if use_running_stack:
            unhealthy = [s for s in local.status() if not s.healthy]
            if unhealthy:
                names = ", ".join(f"{s.name} ({s.endpoint}: {s.detail})" for s in unhealthy)
                raise click.ClickException(
                    f"--use-running-stack: not reachable: {names}. Start the stack with `cdc-pipeline stack up`, "
                    "or run without --use-running-stack to let the bench start a throwaway one."
                )
        else:
            console.log(f"starting a throwaway stack in {settings.stack_dir} (free ports)")
            started_stack = True
            try:
                local.up()
            except (StackError, ArtifactError) as exc:
                raise click.ClickException(f"the bench's stack did not start: {exc}") from exc
        services = {s.name: s.process.running for s in local.services if s.managed}
        report.memory_unwatched = watch_stack(sampler, services)
        report.memory_unwatched += [s.name for s in local.services if not s.managed]
        sampler.start()
        bench = Bench(settings, options, console, sampler, report)
        bench.run()
    except KeyboardInterrupt:
        console.log("[yellow]interrupted: stopping what the bench started[/yellow]")
        report.errors["run"] = "interrupted"
    except (click.ClickException, click.Abort):
        raise
    except Exception as exc:  # reported with what was measured so far; the stack is still stopped
        console.print_exception(max_frames=5)
        report.errors["run"] = f"{type(exc).__name__}: {exc}"
    finally:
        sampler.stop()
        report.memory = dict(sampler.peaks)
        report.memory_total = sampler.peak_total
        report.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
        keep_data = options.keep or (bench is not None and bench.failed)
        if bench is not None:
            bench.cleanup(drop_data=use_running_stack and not options.keep)
        if started_stack:
            if options.keep:
                env = " ".join(f"{k}={shlex.quote(v)}" for k, v in _port_env(settings).items())
                console.log(
                    f"the stack keeps running (--keep-stack); stop it with: {env} cdc-pipeline stack down "
                    f"--state-dir {settings.stack_dir} --purge"
                )
            else:
                local.down(purge=True)
        if bench is not None:
            if keep_data:
                console.log(f"stream logs and checkpoints kept in {bench.work_dir}")
            else:
                shutil.rmtree(bench.work_dir, ignore_errors=True)
    if bench is None:
        return 1
    report.print(console)
    report.write_json(output)
    console.log(f"results written to {output}")
    return 1 if report.errors else 0


def _port_env(settings: Settings) -> dict[str, str]:
    """The variables `stack down` needs to find a throwaway stack's ports (no secret among them)."""
    return {
        "CDC_POSTGRES_DSN": settings.postgres_dsn,
        "CDC_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "CDC_KAFKA_CONTROLLER_PORT": str(settings.kafka_controller_port),
        "CDC_CONNECT_URL": settings.connect_url,
        "CDC_CLICKHOUSE_LOCAL_PORT": str(settings.clickhouse_local_port),
    }

"""What a benchmark run found: stages with rates and ratios, latency percentiles, peak memory, and the
targets of issue 9 with pass/miss; printed as tables (rich) and written as JSON."""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

GIB = 1024**3
TARGET_RATE = 25_000  # rows/s applied, snapshot and catch-up
TARGET_VS_CAPTURE = 0.9
TARGET_VS_BASELINE = 1.0
TARGET_P50_S = 1.0
TARGET_P99_S = 2.0
TARGET_PEAK_RSS = 6 * GIB
TARGET_MAX_OFFSETS = 200_000


@dataclass
class Stage:
    scenario: str
    stage: str
    rows: int
    seconds: float
    ratio_vs_capture: float | None = None
    ratio_vs_baseline: float | None = None
    note: str = ""

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        found = {**asdict(self), "rows_per_s": round(self.rows_per_s, 1), "seconds": round(self.seconds, 3)}
        for key in ("ratio_vs_capture", "ratio_vs_baseline"):
            if found[key] is not None:
                found[key] = round(found[key], 3)
        return found


@dataclass
class Target:
    name: str
    measured: str
    passed: bool | None  # None: not measured in this run
    detail: str = ""


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Report:
    options: dict[str, Any]
    stream_config: dict[str, Any] = field(default_factory=dict)
    stages: list[Stage] = field(default_factory=list)
    latency: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    memory_total: int = 0
    memory_unwatched: list[str] = field(default_factory=list)
    out_of_memory: list[str] = field(default_factory=list)
    # What each stream read per trigger: max_offsets_per_trigger, or less when its batches would not fit the heap.
    trigger_limits: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    finished_at: str | None = None

    def stage(self, scenario: str, name: str) -> Stage | None:
        return next((s for s in self.stages if s.scenario == scenario and s.stage == name), None)

    def add(self, stage: Stage) -> Stage:
        self.stages.append(stage)
        return stage

    # ---------------------------------------------------------------------------------------------
    def targets(self) -> list[Target]:
        found: list[Target] = []
        capture = self.stage("snapshot", "capture")
        for scenario, name in (("snapshot", "pipeline"), ("catchup", "stream")):
            applied = self.stage(scenario, name)
            label = f"{scenario} applied"
            if applied is None:
                found.append(Target(f"{label} >= {TARGET_RATE:,} rows/s", "not run", None))
                continue
            found.append(
                Target(
                    f"{label} >= {TARGET_RATE:,} rows/s",
                    f"{applied.rows_per_s:,.0f} rows/s",
                    applied.rows_per_s >= TARGET_RATE,
                    _by(applied.rows_per_s, TARGET_RATE),
                )
            )
            if capture is not None and capture.rows_per_s > 0:
                ratio = applied.rows_per_s / capture.rows_per_s
                found.append(
                    Target(
                        f"{label} >= {TARGET_VS_CAPTURE}x capture",
                        f"{ratio:.2f}x",
                        ratio >= TARGET_VS_CAPTURE,
                        _by(ratio, TARGET_VS_CAPTURE),
                    )
                )
            if scenario == "catchup" and applied.ratio_vs_baseline is not None:
                ratio = applied.ratio_vs_baseline
                found.append(
                    Target(
                        f"{label} >= {TARGET_VS_BASELINE}x plain consumer",
                        f"{ratio:.2f}x",
                        ratio >= TARGET_VS_BASELINE,
                        _by(ratio, TARGET_VS_BASELINE),
                    )
                )
        if self.latency.get("p50_s") is not None:
            for key, limit in (("p50_s", TARGET_P50_S), ("p99_s", TARGET_P99_S)):
                value = self.latency[key]
                over = f"{value / limit:.1f}x over" if value > limit else ""
                measured = f"{'>= ' if self.latency.get('lower_bound') else ''}{value:.2f} s"
                found.append(Target(f"latency {key[:3]} <= {limit:g} s", measured, value <= limit, over))
        else:
            found.append(Target(f"latency p50 <= {TARGET_P50_S:g} s, p99 <= {TARGET_P99_S:g} s", "not run", None))
        max_offsets = self.stream_config.get("max_offsets_per_trigger") or 0
        if max_offsets >= TARGET_MAX_OFFSETS:
            found.append(
                Target(
                    f"no OutOfMemoryError at max_offsets_per_trigger {TARGET_MAX_OFFSETS:,}",
                    f"{len(self.out_of_memory)} stream(s) with OOM",
                    not self.out_of_memory,
                )
            )
        else:
            found.append(
                Target(
                    f"no OutOfMemoryError at max_offsets_per_trigger {TARGET_MAX_OFFSETS:,}",
                    f"not run (ran {max_offsets:,}; use --max-offsets-per-trigger {TARGET_MAX_OFFSETS})",
                    None,
                )
            )
        if self.memory_total:
            found.append(
                Target(
                    f"stack peak RSS <= {TARGET_PEAK_RSS / GIB:g} GiB",
                    f"{self.memory_total / GIB:.2f} GiB",
                    self.memory_total <= TARGET_PEAK_RSS,
                    f"{self.memory_total / TARGET_PEAK_RSS:.1f}x over" if self.memory_total > TARGET_PEAK_RSS else "",
                )
            )
        return found

    # ---------------------------------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        scenarios: dict[str, dict[str, Any]] = {}
        for stage in self.stages:
            scenarios.setdefault(stage.scenario, {})[stage.stage] = stage.as_dict()
        if self.latency:
            scenarios["latency"] = self.latency
        return {
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "machine": machine(),
            "options": self.options,
            "stream_config": self.stream_config,
            "scenarios": scenarios,
            "stages": [stage.as_dict() for stage in self.stages],
            "memory": {
                "peak_rss_bytes": self.memory,
                "peak_total_rss_bytes": self.memory_total,
                "not_watched": self.memory_unwatched,
            },
            "out_of_memory": self.out_of_memory,
            "trigger_limits": self.trigger_limits,
            "targets": [asdict(t) for t in self.targets()],
            "errors": self.errors,
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.as_dict(), indent=2, default=str) + "\n")

    def print(self, console: Console) -> None:
        stages = Table(title="Throughput", title_justify="left")
        for column in ("scenario", "stage", "rows", "seconds", "rows/s", "vs capture", "vs baseline", "note"):
            stages.add_column(column, justify="right" if column not in ("scenario", "stage", "note") else "left")
        for s in self.stages:
            stages.add_row(
                s.scenario,
                s.stage,
                f"{s.rows:,}",
                f"{s.seconds:.1f}",
                f"{s.rows_per_s:,.0f}" if s.rows else "",
                _ratio(s.ratio_vs_capture),
                _ratio(s.ratio_vs_baseline),
                s.note,
            )
        console.print(stages)
        if self.trigger_limits:
            limits = Table(title="Read per trigger (README: Memory)", title_justify="left")
            limits.add_column("stream")
            limits.add_column("reads at most")
            for label, limit in self.trigger_limits.items():
                limits.add_row(label, limit)
            console.print(limits)
        if self.latency:
            latency = Table(
                title="Latency (visible in ClickHouse FINAL - committed in PostgreSQL)", title_justify="left"
            )
            for column in ("probes", "p50 s", "p99 s", "max s", "not visible", "load changes/s", "trigger"):
                latency.add_column(column, justify="right")
            lat = self.latency
            latency.add_row(
                str(lat.get("probes", 0)),
                _seconds(lat.get("p50_s"), lat.get("lower_bound", False)),
                _seconds(lat.get("p99_s"), lat.get("lower_bound", False)),
                _seconds(lat.get("max_s"), lat.get("lower_bound", False)),
                str(lat.get("not_visible", 0)),
                f"{lat.get('load_changes_per_s', 0):,.0f}",
                str(lat.get("trigger", "")),
            )
            console.print(latency)
        if self.memory:
            memory = Table(title="Peak RSS", title_justify="left")
            memory.add_column("component")
            memory.add_column("peak MiB", justify="right")
            for name, rss in sorted(self.memory.items()):
                memory.add_row(name, f"{rss / 2**20:,.0f}")
            memory.add_row("[b]stack total (at one instant)[/b]", f"[b]{self.memory_total / 2**20:,.0f}[/b]")
            memory.caption = "the stack total leaves out the plain consumer (it runs alone, as a comparison)"
            for name in self.memory_unwatched:
                memory.add_row(name, "not local")
            console.print(memory)
        targets = Table(title="Targets (issue 9)", title_justify="left")
        for column in ("target", "measured", "result", "miss by"):
            targets.add_column(column)
        for t in self.targets():
            mark = "[green]pass[/green]" if t.passed else "[red]miss[/red]" if t.passed is False else "-"
            targets.add_row(t.name, t.measured, mark, t.detail if t.passed is False else "")
        console.print(targets)
        for scenario, error in self.errors.items():
            console.print(f"[red]{scenario} failed:[/red] {error}")


def _by(value: float, target: float) -> str:
    """How far below target a measured value is, as a factor."""
    if value <= 0:
        return "no progress"
    return f"{target / value:.1f}x short" if value < target else ""


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else ""


def _seconds(value: float | None, lower_bound: bool = False) -> str:
    if value is None:
        return "-"
    return f">= {value:.2f}" if lower_bound else f"{value:.2f}"


def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "load_average_at_end": load,
    }

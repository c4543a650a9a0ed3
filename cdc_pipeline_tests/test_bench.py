"""`cdc-pipeline bench` runs every scenario end to end on the real stack and reports positive figures.
Correctness only: the benchmark's numbers are never asserted (the machine's load decides them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pyspark.sql import SparkSession

from cdc_pipeline.bench import SCENARIOS
from cdc_pipeline.bench.baseline import position
from cdc_pipeline.bench.report import Report, Stage, percentile
from cdc_pipeline.stack.lifecycle import LocalStack
from cdc_pipeline.streaming.envelope import decode_envelope

DATA = Path(__file__).parent / "data" / "debezium"


def test_baseline_positions_equal_the_streams(spark: SparkSession) -> None:
    """The plain consumer orders changes exactly like the stream: same (commit_lsn, change_lsn) for real
    Debezium messages (snapshot rows, concurrent transactions, truncates, updates and deletes)."""
    records = [
        (json.dumps(r["key"]).encode() if r.get("key") is not None else None, json.dumps(r["value"]).encode())
        for path in sorted(DATA.glob("*.json"))
        for r in json.loads(path.read_text())
        if isinstance(r, dict) and r.get("value") is not None and "payload" in r["value"]
    ]
    assert len(records) > 10
    rows = [(key, value, "t", 0, offset) for offset, (key, value) in enumerate(records)]
    frame = spark.createDataFrame(rows, "key binary, value binary, topic string, partition int, offset long")
    expected = {r.offset: (r.commit_lsn, r.change_lsn) for r in decode_envelope(frame).collect() if r.error is None}
    actual = {offset: position(json.loads(value)["payload"]) for offset, (_, value) in enumerate(records)}
    assert actual == expected


@pytest.mark.integration
def test_bench_measures_every_scenario(local_stack: LocalStack, tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    # The session stack's settings are exported as CDC_* variables; the working directory has no `.env`.
    result = subprocess.run(
        [
            sys.executable, "-m", "cdc_pipeline.cli", "bench", "--rows", "2000", "--latency-seconds", "10",
            "--latency-warmup-seconds", "5", "--rate", "100", "--use-running-stack", "--output", str(output),
        ],
        cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=1700,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout[-6000:]}\n{result.stderr[-4000:]}"
    assert "Throughput" in result.stdout and "Targets (issue 9)" in result.stdout
    report = json.loads(output.read_text())
    assert report["errors"] == {}
    scenarios = report["scenarios"]
    assert set(scenarios) == set(SCENARIOS)
    stages = {
        "snapshot": ("capture", "pipeline"),
        "burst": ("capture", "pipeline"),
        "catchup": ("stream", "plain consumer"),
    }
    for scenario, names in stages.items():
        for name in names:
            stage = scenarios[scenario][name]
            assert stage["rows"] >= 2000 and stage["seconds"] > 0 and stage["rows_per_s"] > 0, (scenario, stage)
    assert scenarios["snapshot"]["pipeline"]["ratio_vs_capture"] > 0
    # The stream and the plain consumer apply the same range: the snapshot and the burst's updates.
    assert scenarios["catchup"]["stream"]["rows"] == scenarios["catchup"]["plain consumer"]["rows"] >= 4000
    assert scenarios["catchup"]["stream"]["ratio_vs_baseline"] > 0
    latency = scenarios["latency"]
    assert latency["visible"] > 0 and latency["not_visible"] == 0
    assert 0 < latency["p50_s"] <= latency["p99_s"] <= latency["max_s"]
    memory = report["memory"]["peak_rss_bytes"]
    for component in ("postgres", "kafka", "connect", "clickhouse", "spark driver (JVM)", "spark driver (Python)"):
        assert memory[component] > 0, component
    assert memory["plain consumer"] > 0
    assert report["memory"]["peak_total_rss_bytes"] >= memory["spark driver (JVM)"]
    assert {t["name"] for t in report["targets"]} >= {"stack peak RSS <= 6 GiB"}
    # Each stream says how many offsets it read per trigger (max_offsets_per_trigger, or what the heap holds).
    assert report["trigger_limits"] and all("offsets per trigger" in v for v in report["trigger_limits"].values())


def test_targets_say_pass_miss_and_by_how_much() -> None:
    report = Report(options={}, stream_config={"max_offsets_per_trigger": 10_000})
    report.add(Stage("snapshot", "capture", 100_000, 4.0))  # 25,000 rows/s
    report.add(Stage("snapshot", "pipeline", 100_000, 2.0))  # 50,000 rows/s
    report.add(Stage("catchup", "stream", 200_000, 80.0, ratio_vs_baseline=0.5))  # 2,500 rows/s
    report.latency = {"p50_s": 0.5, "p99_s": 3.0}
    report.memory_total = 7 * 1024**3
    targets = {t.name: t for t in report.targets()}
    assert targets["snapshot applied >= 25,000 rows/s"].passed is True
    assert targets["snapshot applied >= 0.9x capture"].passed is True
    assert targets["catchup applied >= 25,000 rows/s"].detail == "10.0x short"
    assert targets["catchup applied >= 0.9x capture"].passed is False
    assert targets["catchup applied >= 1.0x plain consumer"].passed is False
    assert targets["latency p50 <= 1 s"].passed is True
    assert targets["latency p99 <= 2 s"].detail == "1.5x over"
    assert targets["no OutOfMemoryError at max_offsets_per_trigger 200,000"].passed is None
    assert targets["stack peak RSS <= 6 GiB"].passed is False
    # Probes still invisible when the drain ended make every latency figure a lower bound.
    report.latency = {"p50_s": 30.0, "p99_s": 90.0, "lower_bound": True}
    targets = {t.name: t for t in report.targets()}
    assert targets["latency p50 <= 1 s"].measured == ">= 30.00 s" and targets["latency p50 <= 1 s"].passed is False
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0 and percentile([1.0, 2.0], 99) == 2.0

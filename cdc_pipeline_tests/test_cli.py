"""`cdc-pipeline stream run` builds the spark-submit command from the settings and pipeline.yaml."""

from __future__ import annotations

from pathlib import Path

import pyspark
from click.testing import CliRunner

from cdc_pipeline.cli import main
from cdc_pipeline_tests.conftest import REPO_ROOT


def test_stream_run_dry_run_prints_a_spark_submit_for_any_master() -> None:
    result = CliRunner().invoke(
        main,
        [
            "stream",
            "run",
            "--config",
            str(REPO_ROOT / "pipeline.yaml"),
            "--master",
            "spark://10.0.0.1:7077",
            "--dry-run",
        ],
    )
    assert result.exit_code == 0, result.output
    command = result.output
    assert "spark-submit --master spark://10.0.0.1:7077" in command
    assert f"spark-sql-kafka-0-10_2.13-{pyspark.__version__}.jar" in command  # same version as pyspark
    assert "cdc_pipeline/streaming/app.py --config" in command and "--name cdc_shop" in command


def test_stream_run_names_the_bad_config_key(tmp_path: Path) -> None:
    bad = tmp_path / "pipeline.yaml"
    bad.write_text("name: shop\ntables:\n  - name: public.orders\n    primary_key: []\n")
    result = CliRunner().invoke(main, ["stream", "run", "--config", str(bad), "--dry-run"])
    assert result.exit_code != 0
    assert "tables[0].primary_key" in result.output


def test_stream_run_takes_the_driver_memory() -> None:
    config = ["stream", "run", "--config", str(REPO_ROOT / "pipeline.yaml"), "--dry-run"]
    result = CliRunner().invoke(main, [*config, "--driver-memory", "3g"])
    assert result.exit_code == 0, result.output
    assert "--driver-memory 3g" in result.output
    assert "--driver-memory 1g" in CliRunner().invoke(main, config).output
    bad = CliRunner().invoke(main, [*config, "--driver-memory", "lots"])
    assert bad.exit_code != 0 and "--driver-memory" in bad.output and "not a Spark memory size" in bad.output

"""Run the streaming application under `spark-submit` on any master (local[*], spark://, yarn, k8s://)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyspark

from cdc_pipeline.jvm import ensure_artifacts

APPLICATION = Path(__file__).with_name("app.py")
# The Kafka source must match the pyspark version exactly.
KAFKA_SOURCE_PACKAGE = f"org.apache.spark:spark-sql-kafka-0-10_2.13:{pyspark.__version__}"


def kafka_source_jars(cache_dir: Path) -> list[str]:
    """The Kafka source jars, resolved once by Maven (from cdc_pipeline/pom.xml) into the cache.

    Preferred over `--packages`, whose Ivy resolution stumbles over partial ~/.m2 entries and needs
    the network at every cold start."""
    layout = ensure_artifacts(cache_dir, {"spark.version": pyspark.__version__}, profiles=("spark-kafka",))
    return layout.jars("spark-kafka")


# The Spark UI serves job details and (unless disabled) kill links to anyone who reaches its port, on
# every interface: off by default, and read-only when turned on (`--conf spark.ui.enabled=true`, or the
# spark resource's `conf`). With a local master nothing outside this machine needs the driver: it and
# an enabled UI bind loopback only (see `submit_env`). Every key can be overridden with `conf`.
DEFAULT_CONF = {
    "spark.sql.shuffle.partitions": "4",
    "spark.ui.showConsoleProgress": "false",
    "spark.ui.enabled": "false",
    "spark.ui.killEnabled": "false",
}
LOCAL_MASTER_CONF = {"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1"}


def is_local_master(master: str) -> bool:
    return master == "local" or master.startswith("local[")


# Any OutOfMemoryError ends the driver JVM at once, and with it the Python driver (see app.bind_to_jvm):
# a JVM that lost a thread other than a task's to OOM limps on with its query hung.
DRIVER_JAVA_OPTIONS_KEY = "spark.driver.extraJavaOptions"
DRIVER_JAVA_OPTIONS = "-XX:+ExitOnOutOfMemoryError"


@dataclass(frozen=True)
class SparkSubmit:
    """spark-submit settings; `SparkResource` holds the same fields for Dagster."""

    master: str = "local[2]"
    spark_home: str | None = None
    packages: Sequence[str] = ()
    # Empty: the Kafka source jars from the Maven cache (see kafka_source_jars).
    jars: Sequence[str] = ()
    jvm_cache_dir: Path = Path("~/.cache/cdc-pipeline")
    conf: Mapping[str, str] = field(default_factory=dict)
    driver_memory: str = "1g"
    deploy_mode: str = "client"

    def spark_submit(self) -> str:
        home = Path(self.spark_home) if self.spark_home else Path(pyspark.__file__).parent
        return str(home / "bin" / "spark-submit")

    def argv(self, application: str, *args: str, name: str | None = None) -> list[str]:
        argv = [self.spark_submit(), "--master", self.master, "--deploy-mode", self.deploy_mode]
        argv += ["--driver-memory", self.driver_memory]
        if name:
            argv += ["--name", name]
        if self.packages:
            argv += ["--packages", ",".join(self.packages)]
        jars = list(self.jars) or ([] if self.packages else kafka_source_jars(self.jvm_cache_dir))
        if jars:
            argv += ["--jars", ",".join(jars)]
        for key, value in sorted(self.effective_conf().items()):
            argv += ["--conf", f"{key}={value}"]
        return [*argv, application, *args]

    def effective_conf(self) -> dict[str, str]:
        """The Spark conf passed to spark-submit: the defaults above, then `conf`; the driver's JVM
        options always include DRIVER_JAVA_OPTIONS."""
        local = LOCAL_MASTER_CONF if is_local_master(self.master) else {}
        merged = {**DEFAULT_CONF, **local, **self.conf}
        options = merged.get(DRIVER_JAVA_OPTIONS_KEY, "")
        if DRIVER_JAVA_OPTIONS not in options.split():
            merged[DRIVER_JAVA_OPTIONS_KEY] = f"{options} {DRIVER_JAVA_OPTIONS}".strip()
        return merged

    def stream_argv(
        self, config_path: Path, *, checkpoint_location: str | None = None, name: str | None = None
    ) -> list[str]:
        """The command that runs the CDC streaming application for `config_path`."""
        args = ["--config", str(Path(config_path).resolve())]
        if checkpoint_location:
            args += ["--checkpoint-location", checkpoint_location]
        return self.argv(str(APPLICATION), *args, name=name)


def submit_env(extra: Mapping[str, str] | None = None, master: str | None = None) -> dict[str, str]:
    """Environment for spark-submit: the driver runs this interpreter (where cdc_pipeline is installed).
    With a local `master`, SPARK_LOCAL_IP=127.0.0.1 (unless set): the only way to keep an enabled Spark
    UI, which binds SPARK_LOCAL_IP or else every interface, on loopback."""
    env = dict(os.environ)
    env.setdefault("PYSPARK_PYTHON", sys.executable)
    env.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if master is not None and is_local_master(master):
        env.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    env.update(extra or {})
    return env

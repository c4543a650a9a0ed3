from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from cdc_pipeline.probes import Health, spark_health
from cdc_pipeline.streaming.launch import SparkSubmit


class SparkResource(ConfigurableResource):
    """How to submit the streaming application: master, dependencies and Spark conf (any master)."""

    master: str = Field(default="local[2]", description="Spark master URL (CDC_SPARK_MASTER).")
    spark_home: str | None = Field(default=None, description="SPARK_HOME; default: the pyspark distribution.")
    packages: list[str] = Field(
        default_factory=list, description="--packages; empty: the Kafka source jars come from the Maven cache."
    )
    jars: list[str] = Field(default_factory=list, description="--jars; empty: the Kafka source from the Maven cache.")
    jvm_cache_dir: str = Field(default="~/.cache/cdc-pipeline", description="Maven cache (CDC_JVM_CACHE_DIR).")
    conf: dict[str, str] = Field(default_factory=dict)
    driver_memory: str = "1g"
    deploy_mode: str = "client"

    def submit(self) -> SparkSubmit:
        return SparkSubmit(
            master=self.master, spark_home=self.spark_home, packages=tuple(self.packages), jars=tuple(self.jars),
            conf=dict(self.conf), driver_memory=self.driver_memory, deploy_mode=self.deploy_mode,
            jvm_cache_dir=Path(self.jvm_cache_dir),
        )  # fmt: skip

    def spark_submit(self) -> str:
        return self.submit().spark_submit()

    def health(self) -> Health:
        return spark_health(self.spark_submit(), self.master)

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from cdc_pipeline.health import Health, spark_health


def pyspark_home() -> Path:
    """The Spark distribution that ships inside the pyspark wheel (has bin/spark-submit)."""
    import pyspark

    return Path(pyspark.__file__).parent


def kafka_source_package() -> str:
    """Spark's Kafka source, always the same version as the installed pyspark."""
    import pyspark

    return f"org.apache.spark:spark-sql-kafka-0-10_2.13:{pyspark.__version__}"


class SparkResource(ConfigurableResource):
    """How to submit the streaming application: master, dependencies and Spark conf (any master)."""

    master: str = Field(default="local[2]", description="Spark master URL (CDC_SPARK_MASTER).")
    spark_home: str | None = Field(default=None, description="SPARK_HOME; default: the pyspark distribution.")
    packages: list[str] = Field(default_factory=lambda: [kafka_source_package()])
    jars: list[str] = Field(default_factory=list)
    conf: dict[str, str] = Field(default_factory=dict)
    driver_memory: str = "1g"
    deploy_mode: str = "client"

    def spark_submit(self) -> str:
        home = Path(self.spark_home) if self.spark_home else pyspark_home()
        return str(home / "bin" / "spark-submit")

    def submit_argv(self, application: str, *args: str, name: str | None = None) -> list[str]:
        """The spark-submit command line for `application` with this resource's settings."""
        argv = [self.spark_submit(), "--master", self.master, "--deploy-mode", self.deploy_mode]
        argv += ["--driver-memory", self.driver_memory]
        if name:
            argv += ["--name", name]
        if self.packages:
            argv += ["--packages", ",".join(self.packages)]
        if self.jars:
            argv += ["--jars", ",".join(self.jars)]
        for key, value in sorted(self.conf.items()):
            argv += ["--conf", f"{key}={value}"]
        return [*argv, application, *args]

    def health(self) -> Health:
        return spark_health(self.spark_submit(), self.master)

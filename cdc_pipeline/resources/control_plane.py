from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from cdc_pipeline.config import PipelineConfig, load_pipeline_config
from cdc_pipeline.control.stream import StreamController


class ControlPlaneResource(ConfigurableResource):
    """The control plane's handle on one pipeline: its pipeline.yaml and local state (stream tracking, checkpoints)."""

    config_path: str = Field(description="pipeline.yaml (CDC_PIPELINE_CONFIG).")
    stack_dir: str = Field(default=".stack", description="CDC_STACK_DIR: default parent of checkpoints.")
    control_dir: str | None = Field(default=None, description="CDC_CONTROL_DIR; default <stack_dir>/control.")
    checkpoint_location: str | None = Field(
        default=None, description="Override of stream.checkpoint_location (default: from pipeline.yaml)."
    )

    def load(self) -> PipelineConfig:
        return load_pipeline_config(self.config_path)

    @property
    def resolved_config_path(self) -> Path:
        return Path(self.config_path).resolve()

    def checkpoint(self, pipeline: PipelineConfig) -> str:
        return self.checkpoint_location or pipeline.checkpoint_location(Path(self.stack_dir).resolve())

    def controller(self, pipeline: PipelineConfig) -> StreamController:
        directory = Path(self.control_dir) if self.control_dir else Path(self.stack_dir) / "control"
        return StreamController(directory.resolve(), pipeline.name)


class MonitorResource(ConfigurableResource):
    """Thresholds and self-healing switches of the sensors and asset checks."""

    lag_threshold: int = Field(default=10_000, description="Messages; held over the window, alert (CDC_LAG_THRESHOLD).")
    lag_window: int = Field(default=5, ge=2, description="Evaluations the lag rules look back over.")
    stall_after_s: float = Field(default=300, description="Uncommitted batch, or no commit while lagging: stall.")
    restart_stream: bool = Field(default=False, description="Restart a dead stream (CDC_AUTO_RESTART_STREAM).")
    restart_backoff_s: float = Field(default=60, description="First wait between restarts; doubles per attempt.")
    restart_backoff_max_s: float = Field(default=1800, description="Longest wait between restarts.")
    restart_backoff_reset_s: float = Field(
        default=600, description="Healthy this long after a restart: the next incident starts with the first wait."
    )
    restart_connector_tasks: bool = Field(False, description="Restart failed tasks (CDC_AUTO_RESTART_CONNECTOR).")
    check_wait_s: float = Field(default=120, description="How long the row-count check waits for lag to reach zero.")
    freshness_max_age_s: float = Field(default=600, description="Oldest unapplied change may be this old.")
    slot_max_retained_bytes: int = Field(
        default=1 << 30, gt=0, description="WAL the slot may retain before an alert (CDC_SLOT_MAX_RETAINED_BYTES)."
    )
    slot_max_retention_age_s: float = Field(
        default=3600, gt=0,
        description="The slot may stay behind this long without advancing (CDC_SLOT_MAX_RETENTION_AGE_S).",
    )  # fmt: skip
    connector_max_paused_s: float = Field(
        default=1800, ge=0, description="The connector may stay PAUSED this long (CDC_CONNECTOR_MAX_PAUSED_S)."
    )
    connector_missing_grace_s: float = Field(
        default=120, ge=0, description="The connector may be absent from Kafka Connect this long (being re-created)."
    )

"""Rules of the stream's sensors (consumer lag, checkpoint health), as pure functions, and their typed
cursors. No Dagster, no I/O: the sensors gather the observations (a lag snapshot, the controller's status,
the checkpoint's state), call these, and deliver the alerts and run requests; the tests call them with
made-up observations.

Rules:
- consumer lag: Burrow's rules (`lag.evaluate_window`) over a sliding window of lag snapshots kept in
  the cursor;
- checkpoint health: the stream should run and does not (dead); a batch started and never committed for
  `stall_after_s` (stalled); messages wait, the committed offsets did not move since the last evaluation
  and the newest commit is older than `stall_after_s` (no progress); the checkpoint is unreadable. A dead,
  stalled or stuck stream is restarted (if enabled, with backoff) unless its checkpoint is unreadable.

Cursors parse whatever an older sensor stored (or garbage) into defaults rather than fail: a sensor
must keep evaluating after an upgrade.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cdc_pipeline.control.checkpoint import CheckpointState
from cdc_pipeline.control.cursors import as_dict, as_int, load_state
from cdc_pipeline.control.lag import LagSnapshot, LagVerdict, evaluate_window
from cdc_pipeline.control.rules import RestartStep

RESTARTABLE = ("dead", "stalled", "no_progress")


@dataclass
class LagCursor:
    """The consumer_lag sensor's cursor: the newest lag snapshots (`LagSnapshot.to_json()`, oldest first)
    and the open incidents."""

    window: list[dict[str, Any]] = field(default_factory=list)
    incidents: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str | None) -> LagCursor:
        state = load_state(text)
        window = state.get("window")
        snapshots = [s for s in window if isinstance(s, dict)] if isinstance(window, list) else []
        return cls([s for s in snapshots if "total" in s and "committed" in s], as_dict(state.get("incidents")))

    def serialize(self) -> str:
        return json.dumps({"window": self.window, "incidents": self.incidents})


def lag_rule(
    window: Sequence[dict[str, Any]], snapshot: LagSnapshot, threshold: int, size: int
) -> tuple[LagVerdict, list[dict[str, Any]]]:
    """(verdict, new window): `snapshot` appended to the window, which keeps its newest `size` entries,
    and Burrow's rules over it."""
    new_window = [*window, snapshot.to_json()][-size:]
    return evaluate_window(new_window, threshold, size), new_window


@dataclass
class CheckpointCursor:
    """The checkpoint_health sensor's cursor: open incidents, the restart backoff's state, and the committed
    offsets' total at the last evaluation (None: not measured)."""

    incidents: dict[str, Any] = field(default_factory=dict)
    restart: dict[str, Any] = field(default_factory=dict)
    committed: int | None = None

    @classmethod
    def parse(cls, text: str | None) -> CheckpointCursor:
        state = load_state(text)
        return cls(as_dict(state.get("incidents")), as_dict(state.get("restart")), as_int(state.get("committed")))

    def serialize(self) -> str:
        return json.dumps({"incidents": self.incidents, "restart": self.restart, "committed": self.committed})


def started_at_epoch(started_at: str | None) -> float:
    """The stream's start time (ISO 8601, from its controller's status) as epoch seconds; 0.0 when unknown
    or unparsable."""
    try:
        return datetime.fromisoformat(started_at).timestamp() if started_at else 0.0
    except ValueError:
        return 0.0


@dataclass(frozen=True)
class StreamObservation:
    """What the checkpoint_health sensor saw at `now`.

    `starting`: a start_stream or restart_stream run created within the start grace is active (the stream
    is being brought up, not dead); `started_at`: when the stream's process started (epoch s, 0 unknown);
    `checkpoint`: None when this process cannot list the checkpoint (s3a://, hdfs://); `lag_total` and
    `committed`: None when Kafka could not be read."""

    now: float
    desired: str
    running: bool
    pid: int | None
    started_at: float
    starting: bool
    location: str
    checkpoint: CheckpointState | None
    lag_total: int | None
    committed: int | None


@dataclass(frozen=True)
class StreamHealth:
    """The verdict: `problems` by kind (dead, unreadable, stalled, no_progress) with their words;
    `settling`: a start is under way, so the incident and backoff stay as they are; `restart`: the rules
    want a restart (before the backoff and any queued restart run are considered)."""

    problems: dict[str, str]
    settling: bool
    restart: bool

    @property
    def unreadable(self) -> bool:
        return "unreadable" in self.problems


def stream_health(
    observation: StreamObservation, previous_committed: int | None, stall_after_s: float, restart_enabled: bool
) -> StreamHealth:
    """The checkpoint-health rules (see the module's doc) for one observation; `previous_committed` is the
    committed total at the previous evaluation (the cursor's)."""
    o, checkpoint = observation, observation.checkpoint
    problems: dict[str, str] = {}
    wanted = o.desired == "running"
    if wanted and not o.running and not o.starting:
        problems["dead"] = f"the stream (pid {o.pid or '-'}) is not running though it should"
    if checkpoint is not None and checkpoint.exists and not checkpoint.readable:
        problems["unreadable"] = f"checkpoint {o.location} is unreadable: {checkpoint.error}"
    # A restarted query re-runs its unfinished batch from the old offsets file and commits nothing
    # before its first batch: ages count from the stream's start at the earliest.
    pending = checkpoint.pending_batch if checkpoint is not None else None
    if wanted and checkpoint is not None and pending is not None and checkpoint.pending_since is not None:
        age = o.now - max(checkpoint.pending_since, o.started_at)
        if age > stall_after_s:
            problems["stalled"] = f"batch {pending} started {age:.0f} s ago and never committed"
    # No progress: messages wait, the committed offsets did not move since the last evaluation, and the
    # newest commit is older than stall_after_s (a first write after an idle hour is not a stall).
    if (
        o.running and o.lag_total and o.committed == previous_committed
        and checkpoint is not None and checkpoint.last_commit_at is not None and "stalled" not in problems
    ):  # fmt: skip
        idle = o.now - max(checkpoint.last_commit_at, o.started_at)
        if idle > stall_after_s:
            problems["no_progress"] = f"no batch committed for {idle:.0f} s while {o.lag_total} messages wait"
    restart = restart_enabled and wanted and "unreadable" not in problems and any(p in problems for p in RESTARTABLE)
    # While a start/restart run brings the stream up, its state is neither a failure nor a recovery.
    settling = o.starting and wanted and not o.running
    return StreamHealth(problems, settling, restart)


def stream_restart_step(health: StreamHealth, restart_now: bool) -> RestartStep:
    """What the checkpoint_health sensor does with its restart backoff: `restart` the stream (`restart_now`:
    the rules want it, the backoff allows it and no restart run is queued), `wait` (still failing), count a
    `healthy` evaluation, or nothing (`none`: a start is under way)."""
    if restart_now:
        return "restart"
    if health.problems:
        return "wait"
    return "none" if health.settling else "healthy"

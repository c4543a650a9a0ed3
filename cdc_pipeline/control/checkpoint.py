"""What a Spark Structured Streaming checkpoint says about the query, read from its files:
`metadata` (the query id), `offsets/<batch>` (written when a batch starts, with the source offsets)
and `commits/<batch>` (written when the batch's sink work is done). A batch in `offsets` without a
`commits` entry has started and not finished; if that lasts, the query is stuck or dead mid-batch."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class UnsupportedCheckpoint(ValueError):
    """A checkpoint on a file system this process cannot list (e.g. s3a://, hdfs://)."""


@dataclass(frozen=True)
class CheckpointState:
    location: str
    exists: bool
    readable: bool
    error: str | None = None
    query_id: str | None = None
    last_started_batch: int | None = None  # newest offsets/<n>
    last_committed_batch: int | None = None  # newest commits/<n>
    last_commit_at: float | None = None  # mtime of that commit file
    pending_since: float | None = None  # mtime of offsets/<n> when n was never committed
    end_offsets: dict[str, dict[str, int]] | None = None  # of the newest committed batch

    @property
    def pending_batch(self) -> int | None:
        started, committed = self.last_started_batch, self.last_committed_batch
        if started is not None and (committed is None or started > committed):
            return started
        return None

    def as_metadata(self) -> dict[str, Any]:
        return {
            "location": self.location, "exists": self.exists, "readable": self.readable, "error": self.error,
            "query_id": self.query_id, "last_started_batch": self.last_started_batch,
            "last_committed_batch": self.last_committed_batch, "pending_batch": self.pending_batch,
        }  # fmt: skip


def local_path(location: str) -> Path:
    """The local directory of a checkpoint location (a path or file:// URI)."""
    parts = urlsplit(location)
    if parts.scheme in ("", "file"):
        return Path(parts.path if parts.scheme else location)
    raise UnsupportedCheckpoint(
        f"{location}: only local or file:// checkpoints can be inspected by the control plane; "
        "the stream's liveness and progress table are still monitored"
    )


def _batches(directory: Path) -> list[int]:
    try:
        return sorted(int(name) for name in os.listdir(directory) if name.isdigit())
    except FileNotFoundError:
        return []


def _read_log_entry(path: Path) -> list[str]:
    """A metadata-log entry: a `v<N>` version line, then JSON lines."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or not lines[0].startswith("v"):
        raise ValueError(f"{path}: not a Spark metadata log entry (no version line)")
    for line in lines[1:]:
        if line.strip() and line.strip() != "-":
            json.loads(line)
    return lines


def inspect_checkpoint(location: str) -> CheckpointState:
    """Read the checkpoint at `location`; never raises for a damaged checkpoint (`readable=False`)."""
    root = local_path(location)
    if not root.exists():
        return CheckpointState(location, exists=False, readable=True)
    try:
        metadata = json.loads((root / "metadata").read_text(encoding="utf-8"))
        query_id = metadata["id"]
        started = _batches(root / "offsets")
        committed = _batches(root / "commits")
        end_offsets = None
        last_commit_at = pending_since = None
        if started:
            _read_log_entry(root / "offsets" / str(started[-1]))
        if committed:
            commit_file = root / "commits" / str(committed[-1])
            _read_log_entry(commit_file)
            last_commit_at = commit_file.stat().st_mtime
            offsets_file = root / "offsets" / str(committed[-1])
            if offsets_file.exists():
                source_line = _read_log_entry(offsets_file)[2:3]
                end_offsets = json.loads(source_line[0]) if source_line else None
        if started and (not committed or started[-1] > committed[-1]):
            pending_since = (root / "offsets" / str(started[-1])).stat().st_mtime
    except FileNotFoundError as exc:
        return CheckpointState(location, True, False, error=f"{exc.filename} is missing")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return CheckpointState(location, True, False, error=f"{type(exc).__name__}: {exc}"[:500])
    return CheckpointState(
        location, True, True, None, query_id, started[-1] if started else None,
        committed[-1] if committed else None, last_commit_at, pending_since, end_offsets,
    )  # fmt: skip

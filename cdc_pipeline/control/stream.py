"""The streaming application's process, tracked on disk so any Dagster process (a run worker, the
daemon's sensors, a restarted webserver) can tell whether it runs, stop it or restart it.

State lives in `<state_dir>/<pipeline>/`: `stream.pid` (pid, start time and argv, as for the stack's
services, so a recycled pid is never taken for the stream), `stream.json` (the desired state: whether
an operator wants it running, when and by which run it was started) and `stream.log`. The driver runs
where spark-submit runs (client deploy mode, any master), so the state directory must be on the host
that runs the Dagster run workers and sensors."""

from __future__ import annotations

import fcntl
import json
import signal
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from cdc_pipeline.process import ManagedProcess, ProcessRecord, group_members
from cdc_pipeline.streaming.launch import APPLICATION, submit_env


class StreamControlError(RuntimeError):
    """The stream could not be started or stopped; the message says why and shows the log's end."""


@dataclass(frozen=True)
class StreamStatus:
    pipeline: str
    running: bool
    desired: str  # "running" or "stopped"
    pid: int | None
    host: str | None
    started_at: str | None
    started_by: str | None
    master: str | None
    checkpoint: str | None
    log_path: str
    stopped_at: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class StreamController:
    """Start, stop and inspect one pipeline's streaming application."""

    def __init__(self, state_dir: Path, pipeline: str) -> None:
        self.pipeline = pipeline
        self.directory = Path(state_dir) / pipeline
        directory = self.directory
        self.process = ManagedProcess(f"stream {pipeline}", directory / "stream.pid", directory / "stream.log")
        self.state_file = self.directory / "stream.json"

    @property
    def log_path(self) -> Path:
        return self.process.log_file

    def _state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self.state_file.read_text())
            return state
        except (OSError, ValueError):
            return {}

    def _write_state(self, **changes: Any) -> None:
        state = {**self._state(), **changes}
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)  # atomic: a reader never sees half a file

    def status(self) -> StreamStatus:
        state = self._state()
        record = self.process.record()
        on_this_host = state.get("host") in (None, socket.gethostname())
        running = bool(record and on_this_host and record.process() is not None)
        return StreamStatus(
            self.pipeline, running, state.get("desired", "stopped"), record.pid if record else None,
            state.get("host"), state.get("started_at"), state.get("started_by"), state.get("master"),
            state.get("checkpoint"), str(self.log_path), state.get("stopped_at"),
        )  # fmt: skip

    def start(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        master: str,
        checkpoint: str,
        started_by: str | None = None,
        ready: Callable[[], bool] | None = None,
        timeout: float = 300.0,
    ) -> StreamStatus:
        """Start the application unless it already runs (idempotent); wait until `ready()` holds or
        the process exits (then raise with the log's end). `env` is added to this process's env."""
        with self._lock():
            return self._start(argv, env, master, checkpoint, started_by, ready, timeout)

    def _start(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        master: str,
        checkpoint: str,
        started_by: str | None,
        ready: Callable[[], bool] | None,
        timeout: float,
    ) -> StreamStatus:
        current = self.status()
        if current.running:
            self._write_state(desired="running")
            return self.status()
        # The previous run's leader is gone; anything left of its process group (a driver it orphaned)
        # must not run beside the new one.
        self._end_group(self.process.record(), timeout=10)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process.start(argv, env=submit_env(env, master=master))
        self._write_state(
            desired="running", host=socket.gethostname(), master=master, checkpoint=checkpoint,
            started_by=started_by, started_at=datetime.now(UTC).isoformat(timespec="seconds"), stopped_at=None,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while ready is not None and not ready():
            if self.process.running() is None:
                raise StreamControlError(f"the stream of {self.pipeline} exited at start:\n{self.process.log_tail(60)}")
            if time.monotonic() > deadline:
                raise StreamControlError(
                    f"the stream of {self.pipeline} did not become ready in {timeout:.0f} s "
                    f"(it still runs; see {self.log_path}):\n{self.process.log_tail(30)}"
                )
            time.sleep(2)
        return self.status()

    def stop(self, *, timeout: float = 90.0, desired: str = "stopped") -> bool:
        """Stop the application: SIGTERM to the Python driver, which stops the query between batches
        and exits (and spark-submit with it); then SIGTERM to the whole process group, and SIGKILL,
        only if it has not exited after `timeout`. A stream whose spark-submit already exited may have
        left processes in its group: they are ended too. Raises StreamControlError if any process of
        the group survives. Returns True if a process was stopped."""
        with self._lock():
            if desired == "stopped":
                self._write_state(desired="stopped")
            record = self.process.record()
            proc = record.process() if record else None
            if proc is None:
                # Not running; a crashed run may still have left members of its group (an orphaned driver).
                stopped = self._end_group(record, timeout=10)
                self._write_state(stopped_at=datetime.now(UTC).isoformat(timespec="seconds"))
                return stopped
            try:
                drivers = [
                    child for child in proc.children(recursive=True)
                    if any(part.endswith(APPLICATION.name) for part in child.cmdline())
                ]  # fmt: skip
                for driver in drivers:
                    driver.send_signal(signal.SIGTERM)
                if drivers:
                    psutil.wait_procs([proc], timeout=timeout)
            except psutil.Error:
                pass
            self._end_group(record, timeout=30)
            self._write_state(stopped_at=datetime.now(UTC).isoformat(timespec="seconds"))
            return True

    def _end_group(self, record: ProcessRecord | None, timeout: float) -> bool:
        """End every process of `record`'s process group (SIGTERM, then SIGKILL after `timeout`) and
        check that none is left; True if there was something to end."""
        if record is None:
            return False
        if self._state().get("host") not in (None, socket.gethostname()):
            return False  # the pid is another host's: nothing of it runs here
        stopped = self.process.stop(timeout=timeout, group=True)
        left = group_members(record)
        if left:
            raise StreamControlError(
                f"processes of the stream of {self.pipeline} (process group {record.pid}) are still alive after "
                f"SIGKILL: {', '.join(str(p.pid) for p in left)}; end them (kill -9) before starting it again"
            )
        return stopped

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """One start or stop at a time per pipeline, across processes (run workers, the daemon)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "stream.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def log_tail(self, lines: int = 40) -> str:
        return self.process.log_tail(lines)

"""Background processes (the local stack's services and the stream's spark-submit): started detached,
tracked by a pid file that also records the process start time (so a recycled pid is never mistaken for
ours), stopped politely."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class ProcessRecord:
    pid: int
    create_time: float
    argv: list[str]

    def process(self) -> psutil.Process | None:
        """The live process this record describes, or None if it has exited (or the pid was reused)."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > 0.01:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None


class ManagedProcess:
    """One long-running service process with its pid file and log under the stack's state dir."""

    def __init__(self, name: str, pid_file: Path, log_file: Path) -> None:
        self.name = name
        self.pid_file = pid_file
        self.log_file = log_file

    def record(self) -> ProcessRecord | None:
        try:
            data = json.loads(self.pid_file.read_text())
            return ProcessRecord(int(data["pid"]), float(data["create_time"]), list(data["argv"]))
        except (OSError, ValueError, KeyError):
            return None

    def running(self) -> psutil.Process | None:
        record = self.record()
        return record.process() if record else None

    def start(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: str | None = None,
    ) -> psutil.Process:
        """Start detached (own session, so Ctrl-C in the caller's terminal does not reach it)."""
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name}\n".encode())
            log.flush()
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                user=user,
                start_new_session=True,
                close_fds=True,
            )
        proc = psutil.Process(popen.pid)
        self.pid_file.write_text(json.dumps({"pid": popen.pid, "create_time": proc.create_time(), "argv": list(argv)}))
        return proc

    def group_members(self) -> list[psutil.Process]:
        """Live processes of the process group the recorded process leads (it was started in its own
        session), also after the leader itself exited: e.g. a child orphaned by a crashed leader."""
        record = self.record()
        return group_members(record) if record else []

    def stop(self, *, timeout: float = 60.0, sig: int = signal.SIGTERM, group: bool = False) -> bool:
        """Stop the process (and anything it spawned). Returns True if something was stopped.
        `group`: signal its whole process group (it leads one: started in its own session), and end
        the group's remaining processes even when the leader has already exited."""
        proc = self.running()
        if proc is None:
            orphans = self.group_members() if group else []
            if orphans:
                _signal_all(orphans, sig)
                alive = _wait_exited(orphans, min(timeout, 10.0))
                _signal_all(alive, signal.SIGKILL)
                _wait_exited(alive, 10)
            self.pid_file.unlink(missing_ok=True)
            return bool(orphans)
        try:
            family = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            family = [proc]
        if group:  # also members that are no longer the leader's descendants
            family += [member for member in self.group_members() if member.pid not in {p.pid for p in family}]
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        alive = _wait_exited(family, timeout)
        for straggler in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                straggler.kill()
        _wait_exited(alive, 10)
        self.pid_file.unlink(missing_ok=True)
        return True

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_file, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - 64 * 1024))
                text = handle.read().decode("utf-8", errors="replace")
        except OSError:
            return f"(no log at {self.log_file})"
        return "\n".join(text.splitlines()[-lines:])


def group_members(record: ProcessRecord) -> list[psutil.Process]:
    """Live (non-zombie) processes whose process group id is `record`'s pid, started no earlier than
    it. A pid is not reused while a group of that id has members, so these are the recorded
    process's own group, unless the pid now belongs to another process (then: none)."""
    leader = record.process()
    if leader is None and psutil.pid_exists(record.pid):
        try:
            if abs(psutil.Process(record.pid).create_time() - record.create_time) > 0.01:
                return []  # the pid was reused: the group of that id is someone else's
        except psutil.Error:
            pass
    members = []
    for proc in psutil.process_iter(["create_time", "status"]):
        try:
            if (
                os.getpgid(proc.pid) == record.pid
                and proc.info["status"] != psutil.STATUS_ZOMBIE
                and proc.info["create_time"] >= record.create_time - 0.01
            ):
                members.append(proc)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return members


def _signal_all(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            proc.send_signal(sig)


def _exited(proc: psutil.Process) -> bool:
    # A process whose parent has not reaped it yet (e.g. a test runner that started the stack) is a
    # zombie: it holds no ports or files, so it counts as stopped.
    try:
        proc.wait(timeout=0)  # reaps it when it is our own child
        return True
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # still running, or not ours to reap
        pass
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_exited(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited; return those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    alive = list(procs)
    while alive:
        alive = [proc for proc in alive if not _exited(proc)]
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    return alive


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port_closed(host: str, port: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not port_open(host, port):
            return True
        time.sleep(0.2)
    return not port_open(host, port)

"""Peak resident memory (RSS) of every component, sampled by a background thread with psutil.

A component is a process and all its descendants (PostgreSQL's backends, the Spark driver JVM and its
Python driver). RSS counts shared pages in every process that maps them, so multi-process servers
(PostgreSQL's shared buffers) are over- rather than under-counted."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import psutil

# Processes of a Spark driver tree are split by what they run: the JVM, and the Python driver (+ workers).
SPARK = "spark"


def _family(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return [root]


def _rss(proc: psutil.Process) -> int:
    try:
        return proc.memory_info().rss
    except psutil.Error:
        return 0


def _is_java(proc: psutil.Process) -> bool:
    try:
        return proc.name().startswith("java")
    except psutil.Error:
        return False


class RssSampler:
    """Samples the registered components every `interval` seconds until stopped; keeps per-component peaks
    and the peak of their sum at one instant (the stack's peak, not the sum of peaks), without the
    components in `outside_total`."""

    def __init__(self, interval: float = 0.5, outside_total: tuple[str, ...] = ()) -> None:
        self.interval = interval
        # Components sampled but not part of the stack total (the bench's own baseline consumer).
        self.outside_total = set(outside_total)
        self.peaks: dict[str, int] = {}
        self.peak_total = 0
        self.samples = 0
        self._roots: dict[str, psutil.Process] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def watch(self, component: str, pid: int | None) -> None:
        """Sample the process `pid` (and its descendants) as `component` from now on; None stops watching."""
        with self._lock:
            self._roots.pop(component, None)
            if pid is not None:
                with contextlib.suppress(psutil.Error):
                    self._roots[component] = psutil.Process(pid)
        self.sample()

    def forget(self, component: str) -> None:
        self.watch(component, None)

    def sample(self) -> None:
        with self._lock:
            roots = dict(self._roots)
        now: dict[str, int] = {}
        for component, root in roots.items():
            family = _family(root)
            if component == SPARK:
                now[f"{SPARK} driver (JVM)"] = sum(_rss(p) for p in family if _is_java(p))
                now[f"{SPARK} driver (Python)"] = sum(_rss(p) for p in family if not _is_java(p))
            else:
                now[component] = sum(_rss(p) for p in family)
        with self._lock:
            for component, rss in now.items():
                self.peaks[component] = max(self.peaks.get(component, 0), rss)
            total = sum(rss for component, rss in now.items() if component not in self.outside_total)
            self.peak_total = max(self.peak_total, total)
            self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def __enter__(self) -> RssSampler:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def watch_stack(sampler: RssSampler, services: dict[str, Callable[[], psutil.Process | None]]) -> list[str]:
    """Watch each running service (name -> its running process, or None); returns the names not found
    (not managed by a local stack, e.g. a remote ClickHouse)."""
    missing = []
    for name, running in services.items():
        proc = running()
        if proc is None:
            missing.append(name)
        else:
            sampler.watch(name, proc.pid)
    return missing

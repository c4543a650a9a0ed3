"""How much the local ClickHouse endpoint's requests wait on each other: concurrent inserts and concurrent
``SELECT ... FINAL`` reads, each kind alone and both together, through clickhouse-connect as the stream
and the control plane use it.

    python -m cdc_pipeline.bench.endpoint [--rows 300000] [--insert-rows 10000] [--rounds 8]

Starts a throwaway endpoint (free port, temporary data directory, generated password), loads a
replica-like ``ReplacingMergeTree`` table, and prints per-request latency (p50 / max) and the wall time
of each phase. Requests that did not wait on each other take about as long together as alone (on a
machine with spare cores); an endpoint that serializes requests adds the other kind's time to each one.
A development tool, not a test.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from cdc_pipeline.bench.env import free_ports
from cdc_pipeline.contract import CLICKHOUSE_ENGINE, IS_DELETED, VERSION

_PASSWORD_ENV = "CDC_ENDPOINT_BENCH_PASSWORD"
_COLUMNS = ["id", "customer_id", "quantity", "amount", "note", "created_at", VERSION, IS_DELETED]
_READ_SQL = "SELECT count(), sum(amount), max(created_at) FROM bench.orders FINAL"


@contextmanager
def endpoint() -> Iterator[tuple[str, str]]:
    """A throwaway endpoint process; yields its URL and password, and stops it (and its data) after."""
    port = free_ports(1)[0]
    password = secrets.token_urlsafe(16)
    work = Path(tempfile.mkdtemp(prefix="cdc-endpoint-bench-"))
    env = {**os.environ, _PASSWORD_ENV: password}
    argv = [
        sys.executable, "-m", "cdc_pipeline.stack.clickhouse_local", "--port", str(port),
        "--data-dir", str(work / "data"), "--password-env", _PASSWORD_ENV, "--log-level", "WARNING",
    ]  # fmt: skip
    with open(work / "endpoint.log", "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the endpoint did not start:\n{(work / 'endpoint.log').read_text()}") from None
                time.sleep(0.2)
        yield url, password
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(work, ignore_errors=True)


def _batch(start: int, rows: int) -> list[list[object]]:
    now = datetime.now(UTC)
    return [
        [i, i % 977, i % 7, Decimal(i % 100_000) / 100, f"note {i:>12} " + "x" * 80, now, 1, 0]
        for i in range(start, start + rows)
    ]


@dataclass
class Phase:
    """Latencies (seconds) of each request kind in one phase, and the phase's wall time."""

    name: str
    wall: float = 0.0
    latencies: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""

    def line(self) -> str:
        parts = [f"{self.name:<19} wall {self.wall:6.2f} s"]
        for kind, values in self.latencies.items():
            p50, worst = statistics.median(values) * 1000, max(values) * 1000
            parts.append(f"{kind} {len(values)} x p50 {p50:7.0f} ms max {worst:7.0f} ms")
        return "  ".join([*parts, self.note] if self.note else parts)


def _run_phase(
    name: str, workers: dict[str, tuple[int, Callable[[Client], None]]], url: str, password: str, rounds: int
) -> Phase:
    phase = Phase(name)
    lock = threading.Lock()
    errors: list[BaseException] = []
    start = threading.Barrier(sum(count for count, _ in workers.values()) + 1)

    def work(kind: str, action: Callable[[Client], None]) -> None:
        client = clickhouse_connect.get_client(dsn=url, password=password, compress="lz4")
        try:
            start.wait()
            for _ in range(rounds):
                began = time.monotonic()
                action(client)
                with lock:
                    phase.latencies.setdefault(kind, []).append(time.monotonic() - began)
        except BaseException as exc:  # reported after the phase
            errors.append(exc)
        finally:
            client.close()

    threads = [
        threading.Thread(target=work, args=(kind, action), daemon=True)
        for kind, (count, action) in workers.items()
        for _ in range(count)
    ]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.monotonic()
    for thread in threads:
        thread.join()
    phase.wall = time.monotonic() - began
    if errors:
        raise errors[0]
    return phase


def measure(rows: int, insert_rows: int, rounds: int, writers: int, readers: int) -> list[Phase]:
    """Run the three phases against a fresh endpoint and return them."""
    with endpoint() as (url, password):
        admin = clickhouse_connect.get_client(dsn=url, password=password)
        admin.command("CREATE DATABASE bench")
        admin.command(
            "CREATE TABLE bench.orders (id Int64, customer_id Int32, quantity Int32, amount Decimal(12, 2), "
            f"note String, created_at DateTime64(6, 'UTC'), {VERSION} UInt128, {IS_DELETED} UInt8) "
            f"ENGINE = {CLICKHOUSE_ENGINE} ORDER BY id"
        )
        admin.command(
            "INSERT INTO bench.orders SELECT number, number % 977, number % 7, toDecimal64(number % 100000, 2) / 100, "
            f"concat('note ', toString(number), repeat('x', 80)), now64(6), 1, 0 FROM numbers({rows})"
        )
        batch = _batch(0, insert_rows)
        counter = iter(range(1, 1 << 30))
        counter_lock = threading.Lock()

        def insert(client: Client) -> None:
            with counter_lock:
                n = next(counter)
            data = [[*row[:6], n + 1, 0] for row in batch]
            client.insert("bench.orders", data, column_names=_COLUMNS)

        def read(client: Client) -> None:
            client.query(_READ_SQL)

        phases = [
            _run_phase("inserts", {"insert": (writers, insert)}, url, password, rounds),
            _run_phase("reads", {"read": (readers, read)}, url, password, rounds),
            _run_phase("together", {"insert": (writers, insert), "read": (readers, read)}, url, password, rounds),
            _insert_beside_slow_query(url, password, insert),
        ]
        admin.close()
        return phases


def _insert_beside_slow_query(url: str, password: str, insert: Callable[[Client], None]) -> Phase:
    """Inserts and small reads sent one after another while a 10-second query runs on another connection;
    counts those that completed while it still ran (an endpoint that serializes requests completes none)."""
    phase = Phase("beside a 10 s query")
    slow = clickhouse_connect.get_client(dsn=url, password=password)
    client = clickhouse_connect.get_client(dsn=url, password=password, compress="lz4")
    sql = "SELECT sleepEachRow(1), 'beside' FROM numbers(10) SETTINGS max_block_size = 1"
    running = threading.Thread(target=slow.query, args=(sql,), daemon=True)
    began = time.monotonic()
    running.start()
    while running.is_alive() and not client.command(
        "SELECT count() FROM system.processes WHERE position(query, 'sleepEachRow') > 0 "
        "AND position(query, 'system.processes') = 0"
    ):
        time.sleep(0.05)
    during = 0
    for _ in range(5):
        for kind, action in (("insert", insert), ("read", lambda c: c.query("SELECT 1"))):
            started = time.monotonic()
            action(client)
            phase.latencies.setdefault(kind, []).append(time.monotonic() - started)
        during += running.is_alive()
    running.join()
    phase.wall = time.monotonic() - began
    phase.note = f"{during} of 5 insert + read pairs completed while the query ran"
    slow.close()
    client.close()
    return phase


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cdc_pipeline.bench.endpoint", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=300_000, help="rows in the table read with FINAL")
    parser.add_argument("--insert-rows", type=int, default=10_000, help="rows per insert")
    parser.add_argument("--rounds", type=int, default=8, help="requests per worker")
    parser.add_argument("--writers", type=int, default=2, help="concurrent inserting clients")
    parser.add_argument("--readers", type=int, default=2, help="concurrent reading clients")
    args = parser.parse_args(argv)
    phases = measure(args.rows, args.insert_rows, args.rounds, args.writers, args.readers)
    print(
        f"{args.writers} writers x {args.rounds} inserts of {args.insert_rows:,} rows; {args.readers} readers x "
        f"{args.rounds} `{_READ_SQL}` over {args.rows:,}+ rows"
    )
    for phase in phases:
        print(phase.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The PostgreSQL side of the benchmark: an orders-like table, bulk loads, bursts of updates in large
transactions, a steady background load, and latency probes that store their own commit time."""

from __future__ import annotations

import random
import threading
import time
from datetime import datetime

import psycopg
from psycopg import sql

ORDERS = "orders"
PROBE = "probe"

# A realistic OLTP row: bigint key, a few ints, an exact decimal, ~100 bytes of text, a timestamptz and
# a small jsonb document. `revision` is what the burst changes (pipeline done = every row has the new one).
ORDERS_DDL = """
CREATE TABLE {table} (
    id bigint PRIMARY KEY,
    customer_id integer NOT NULL,
    status smallint NOT NULL,
    quantity integer NOT NULL,
    revision integer NOT NULL DEFAULT 0,
    amount numeric(12, 2) NOT NULL,
    note text,
    created_at timestamptz NOT NULL,
    attrs jsonb
)"""
PROBE_DDL = "CREATE TABLE {table} (id bigint PRIMARY KEY, committed_at timestamptz NOT NULL)"

FILL = """
INSERT INTO {table}
SELECT g, (g * 7919) %% 100000, g %% 5, 1 + g %% 20, 0, ((g * 37) %% 1000000) / 100.0 + 0.01,
       'order ' || g || ': ' || repeat(md5(g::text), 3),
       timestamptz '2026-01-01 00:00:00+00' + g * interval '1 second',
       jsonb_build_object('channel', (ARRAY['web', 'app', 'store'])[1 + g %% 3], 'priority', g %% 4,
                          'tags', jsonb_build_array('bench', g %% 10))
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g"""


def create_tables(conn: psycopg.Connection, schema: str) -> None:
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    conn.execute(sql.SQL(ORDERS_DDL).format(table=sql.Identifier(schema, ORDERS)))
    conn.execute(sql.SQL(PROBE_DDL).format(table=sql.Identifier(schema, PROBE)))


def fill_orders(conn: psycopg.Connection, schema: str, rows: int, chunk: int = 100_000) -> None:
    """Insert ids 1..rows (before the connector exists: they reach Kafka through its initial snapshot)."""
    table = sql.Identifier(schema, ORDERS)
    for first in range(1, rows + 1, chunk):
        conn.execute(sql.SQL(FILL).format(table=table), {"first": first, "last": min(rows, first + chunk - 1)})
    conn.execute(sql.SQL("ANALYZE {}").format(table))


def update_burst(conninfo: str, schema: str, rows: int, per_transaction: int, revision: int) -> float:
    """Set `revision` on ids 1..rows, `per_transaction` rows per committed transaction; returns seconds."""
    started = time.monotonic()
    statement = sql.SQL(
        "UPDATE {} SET revision = %(revision)s, quantity = quantity + 1 WHERE id BETWEEN %(first)s AND %(last)s"
    ).format(sql.Identifier(schema, ORDERS))
    with psycopg.connect(conninfo) as conn:
        for first in range(1, rows + 1, per_transaction):
            last = min(rows, first + per_transaction - 1)
            conn.execute(statement, {"revision": revision, "first": first, "last": last})
            conn.commit()
    return time.monotonic() - started


class BackgroundLoad(threading.Thread):
    """`rate` row updates per second on random existing orders, as ten small transactions a second, until
    stopped. Falls behind rather than bursting when PostgreSQL is slower than the rate."""

    TICK_S = 0.1

    def __init__(self, conninfo: str, schema: str, rows: int, rate: int, seed: int = 0) -> None:
        super().__init__(name="bench-load", daemon=True)
        self.conninfo = conninfo
        self.rows = rows
        self.rate = rate
        self.random = random.Random(seed)
        self.statement = sql.SQL("UPDATE {} SET quantity = quantity + 1 WHERE id = ANY(%s)").format(
            sql.Identifier(schema, ORDERS)
        )
        self.changes = 0
        self.seconds = 0.0
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        owed = 0.0
        try:
            with psycopg.connect(self.conninfo, autocommit=True) as conn:
                next_tick = time.monotonic()
                while not self._stop_event.is_set():
                    owed += self.rate * self.TICK_S
                    count = int(owed)
                    owed -= count
                    if count:
                        ids = self.random.sample(range(1, self.rows + 1), min(count, self.rows))
                        conn.execute(self.statement, (ids,))
                        self.changes += len(ids)
                    next_tick += self.TICK_S
                    delay = next_tick - time.monotonic()
                    if delay > 0:
                        self._stop_event.wait(delay)
                    else:
                        next_tick = time.monotonic()  # behind: do not burst to catch up
        except BaseException as exc:  # reported by the scenario
            self.error = exc
        finally:
            self.seconds = time.monotonic() - started

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)

    @property
    def achieved_rate(self) -> float:
        return self.changes / self.seconds if self.seconds else 0.0


class Prober:
    """Inserts probe rows whose `committed_at` is PostgreSQL's clock at the insert (autocommit: the commit
    follows within the same round trip). Returns (id, commit time as epoch seconds)."""

    def __init__(self, conninfo: str, schema: str) -> None:
        self.conn = psycopg.connect(conninfo, autocommit=True)
        self.statement = sql.SQL(
            "INSERT INTO {} (id, committed_at) VALUES (%s, clock_timestamp()) RETURNING committed_at"
        )
        self.statement = self.statement.format(sql.Identifier(schema, PROBE))
        self.next_id = 1

    def probe(self) -> tuple[int, float]:
        probe_id = self.next_id
        self.next_id += 1
        row = self.conn.execute(self.statement, (probe_id,)).fetchone()
        committed: datetime = row[0]
        return probe_id, committed.timestamp()

    def close(self) -> None:
        self.conn.close()

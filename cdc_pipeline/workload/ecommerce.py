"""An e-commerce OLTP schema (customers, products, orders, order_items) and a random workload of
inserts, updates (including primary-key changes) and deletes against it."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
from psycopg import sql

TABLES = ("customers", "products", "orders", "order_items")

SCHEMA_DDL = """
CREATE TABLE IF NOT EXISTS {schema}.customers (
    id bigint PRIMARY KEY,
    email text NOT NULL,
    full_name text NOT NULL,
    country char(2),
    loyalty_points integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS {schema}.products (
    id bigint PRIMARY KEY,
    sku text NOT NULL,
    name text NOT NULL,
    price numeric(12, 2) NOT NULL,
    tags text[] NOT NULL DEFAULT '{{}}',
    attributes jsonb,
    active boolean NOT NULL DEFAULT true,
    updated_at timestamp(6)
);
CREATE TABLE IF NOT EXISTS {schema}.orders (
    id bigint PRIMARY KEY,
    customer_id bigint NOT NULL,
    status text NOT NULL,
    total numeric(14, 2) NOT NULL,
    note text,
    created_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS {schema}.order_items (
    order_id bigint NOT NULL,
    line_no integer NOT NULL,
    product_id bigint NOT NULL,
    quantity integer NOT NULL,
    unit_price numeric(12, 2) NOT NULL,
    PRIMARY KEY (order_id, line_no)
);
"""

NAMES = ["Ada", "Grace", "Linus", "Ken", "Barbara", "Edsger", "Zoë", "José", "Søren", "Ünal", "李", "Ольга"]
COUNTRIES = ["DE", "FR", "US", "JP", "BR", None]
STATUSES = ["new", "paid", "shipped", "delivered", "cancelled"]


def create_schema(conn: psycopg.Connection, schema: str) -> None:
    """Create the schema and its four tables (idempotent)."""
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    conn.execute(sql.SQL(SCHEMA_DDL).format(schema=sql.Identifier(schema)))


@dataclass
class Workload:
    """Random changes with a seed; keeps its own view of live keys so every change hits a real row."""

    schema: str
    seed: int = 0
    rng: random.Random = field(init=False)
    next_id: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLES, 1))
    live: dict[str, list] = field(default_factory=lambda: {t: [] for t in TABLES})

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def resume(self, conn: psycopg.Connection) -> None:
        """Continue from the rows already in the tables (new keys after the largest existing ones)."""
        for table in TABLES:
            if table == "order_items":
                query = sql.SQL("SELECT order_id, line_no FROM {}").format(self._t(table))
                self.live[table] = [tuple(row) for row in conn.execute(query)]
                self.next_id[table] = max((key[1] for key in self.live[table]), default=0) + 1
            else:
                query = sql.SQL("SELECT id FROM {}").format(self._t(table))
                self.live[table] = [row[0] for row in conn.execute(query)]
                self.next_id[table] = max(self.live[table], default=0) + 1

    def _t(self, table: str) -> sql.Composed:
        return sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(table))

    def _new_id(self, table: str) -> int:
        value = self.next_id[table]
        self.next_id[table] += 1
        return value

    def _ts(self) -> datetime:
        return datetime(2024, 1, 1, tzinfo=UTC) + timedelta(microseconds=self.rng.randrange(10**14))

    def insert(self, conn: psycopg.Connection, table: str) -> None:
        rng = self.rng
        if table == "customers":
            key = self._new_id(table)
            name = f"{rng.choice(NAMES)} {rng.choice(NAMES)}"
            conn.execute(
                sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s)").format(self._t(table)),
                (key, f"user{key}@example.com", name, rng.choice(COUNTRIES), rng.randrange(10_000), self._ts()),
            )
        elif table == "products":
            key = self._new_id(table)
            attributes = json.dumps({"color": rng.choice(["red", "blue", "grün"]), "dims": [rng.random(), 2]})
            conn.execute(
                sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s, %s, %s)").format(self._t(table)),
                (
                    key, f"SKU-{key}", f"Product {key}", Decimal(rng.randrange(1, 10**8)) / 100,
                    rng.sample(["new", "sale", "eco", "b2b"], rng.randrange(0, 3)),
                    attributes if rng.random() < 0.8 else None, rng.random() < 0.9,
                    self._ts().replace(tzinfo=None) if rng.random() < 0.7 else None,
                ),
            )  # fmt: skip
        elif table == "orders":
            key = self._new_id(table)
            conn.execute(
                sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s)").format(self._t(table)),
                (
                    key, rng.randrange(1, 1000), rng.choice(STATUSES), Decimal(rng.randrange(0, 10**10)) / 100,
                    rng.choice([None, "gift", "leave at door ✓"]), self._ts(),
                ),
            )  # fmt: skip
        else:
            key = (rng.randrange(1, 10**6), self._new_id(table))
            conn.execute(
                sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s)").format(self._t(table)),
                (*key, rng.randrange(1, 1000), rng.randrange(1, 20), Decimal(rng.randrange(1, 10**6)) / 100),
            )
        self.live[table].append(key)

    def _where(self, table: str) -> sql.Composed:
        if table == "order_items":
            return sql.SQL("order_id = %s AND line_no = %s")
        return sql.SQL("id = %s")

    def _params(self, key: object) -> tuple:
        return tuple(key) if isinstance(key, tuple) else (key,)

    def update(self, conn: psycopg.Connection, table: str) -> None:
        if not self.live[table]:
            return self.insert(conn, table)
        rng = self.rng
        index = rng.randrange(len(self.live[table]))
        key = self.live[table][index]
        if rng.random() < 0.1:  # a primary-key change: Debezium emits delete(old key) + create(new key)
            if table == "order_items":
                new_key: object = (key[0], self._new_id(table))
                assignment = sql.SQL("line_no = %s")
                params: tuple = (new_key[1], *self._params(key))
            else:
                new_key = self._new_id(table)
                assignment = sql.SQL("id = %s")
                params = (new_key, *self._params(key))
            self.live[table][index] = new_key
        else:
            assignment, value = {
                "customers": (sql.SQL("loyalty_points = %s"), rng.randrange(10_000)),
                "products": (sql.SQL("price = %s"), Decimal(rng.randrange(1, 10**8)) / 100),
                "orders": (sql.SQL("status = %s"), rng.choice(STATUSES)),
                "order_items": (sql.SQL("quantity = %s"), rng.randrange(1, 50)),
            }[table]
            params = (value, *self._params(key))
        conn.execute(
            sql.SQL("UPDATE {} SET {} WHERE {}").format(self._t(table), assignment, self._where(table)), params
        )
        return None

    def delete(self, conn: psycopg.Connection, table: str) -> None:
        if not self.live[table]:
            return
        key = self.live[table].pop(self.rng.randrange(len(self.live[table])))
        conn.execute(sql.SQL("DELETE FROM {} WHERE {}").format(self._t(table), self._where(table)), self._params(key))

    def run(self, conn: psycopg.Connection, changes: int, *, per_transaction: int = 5) -> None:
        """Apply `changes` random changes: ~50% inserts, 35% updates, 15% deletes, in small transactions."""
        done = 0
        while done < changes:
            with conn.transaction():
                for _ in range(min(per_transaction, changes - done)):
                    table = self.rng.choice(TABLES)
                    roll = self.rng.random()
                    if roll < 0.5:
                        self.insert(conn, table)
                    elif roll < 0.85:
                        self.update(conn, table)
                    else:
                        self.delete(conn, table)
                    done += 1

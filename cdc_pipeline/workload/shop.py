"""A shop that behaves like one, for the demo: a generated history (customers, products, orders through
their lifecycle, order items, payments) and a live activity of the same shape at a target rate.

Money is exact: prices are `numeric(12, 2)` Decimals, an order's `total` is the sum of its lines'
`quantity * unit_price`, and a payment is for its order's total exactly. Those invariants hold after every
transaction, so a replica can be checked against them as well as against the source."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
from psycopg import sql

from cdc_pipeline.workload.ecommerce import COUNTRIES, NAMES, create_schema

SHOP_TABLES = ("customers", "products", "orders", "order_items", "payments")
PAYMENTS_DDL = """
CREATE TABLE IF NOT EXISTS {schema}.payments (
    id bigint PRIMARY KEY,
    order_id bigint NOT NULL,
    amount numeric(14, 2) NOT NULL,
    currency char(3) NOT NULL DEFAULT 'EUR',
    method text NOT NULL,
    status text NOT NULL,
    created_at timestamptz NOT NULL
);
"""
METHODS = ["card", "card", "card", "paypal", "sepa", "invoice"]
WORDS = ["Desk", "Lamp", "Chair", "Mug", "Kettle", "Backpack", "Notebook", "Headphones", "Plant", "Rug", "Shelf"]
ADJECTIVES = ["Oak", "Steel", "Linen", "Bamboo", "Walnut", "Recycled", "Compact", "Deluxe", "Nordic", "Ceramic"]
TAGS = ["new", "sale", "eco", "b2b", "bestseller"]
CENT = Decimal("0.01")


def create_shop_schema(conn: psycopg.Connection, schema: str) -> None:
    """The e-commerce tables of `workload.ecommerce` plus `payments` (idempotent)."""
    create_schema(conn, schema)
    conn.execute(sql.SQL(PAYMENTS_DDL).format(schema=sql.Identifier(schema)))


def _t(schema: str, table: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))


@dataclass
class ShopState:
    """What the activity needs to know to make only changes a real shop would make."""

    next_id: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SHOP_TABLES, 1))
    customers: list[int] = field(default_factory=list)
    prices: dict[int, Decimal] = field(default_factory=dict)  # active products' prices
    # orders by status: id -> (customer_id, total)
    orders: dict[str, dict[int, tuple[int, Decimal]]] = field(
        default_factory=lambda: {s: {} for s in ("new", "paid", "shipped")}
    )
    payments: dict[int, int] = field(default_factory=dict)  # order id -> payment id (captured)
    lines: dict[int, list[tuple[int, int, Decimal]]] = field(default_factory=dict)  # new order -> lines

    def take(self, table: str) -> int:
        value = self.next_id[table]
        self.next_id[table] += 1
        return value

    @classmethod
    def load(cls, conn: psycopg.Connection, schema: str) -> ShopState:
        """The state of the shop's tables as they are (to continue a previous run)."""
        state = cls()
        for table in ("customers", "products", "orders", "payments"):
            row = conn.execute(sql.SQL("SELECT coalesce(max(id), 0) FROM {}").format(_t(schema, table))).fetchone()
            state.next_id[table] = row[0] + 1
        state.customers = [r[0] for r in conn.execute(sql.SQL("SELECT id FROM {}").format(_t(schema, "customers")))]
        state.prices = dict(
            conn.execute(sql.SQL("SELECT id, price FROM {} WHERE active").format(_t(schema, "products"))).fetchall()
        )
        query = sql.SQL("SELECT id, customer_id, total, status FROM {} WHERE status IN ('new', 'paid', 'shipped')")
        for order_id, customer_id, total, status in conn.execute(query.format(_t(schema, "orders"))):
            state.orders[status][order_id] = (customer_id, total)
        query = sql.SQL("SELECT order_id, id FROM {} WHERE status = 'captured'")
        state.payments = dict(conn.execute(query.format(_t(schema, "payments"))).fetchall())
        query = sql.SQL(
            "SELECT i.order_id, i.line_no, i.quantity, i.unit_price FROM {} i JOIN {} o ON o.id = i.order_id "
            "WHERE o.status = 'new' ORDER BY i.order_id, i.line_no"
        )
        for order_id, line_no, quantity, price in conn.execute(
            query.format(_t(schema, "order_items"), _t(schema, "orders"))
        ):
            state.lines.setdefault(order_id, []).append((line_no, quantity, price))
        return state


class Shop:
    """Writes the shop's history and its live activity; counts every row it changes."""

    def __init__(self, schema: str, seed: int = 0, state: ShopState | None = None) -> None:
        self.schema = schema
        self.rng = random.Random(seed)
        self.state = state or ShopState()
        self.changes = 0  # rows inserted, updated or deleted
        self.history_now = datetime.now(UTC).replace(microsecond=0)

    # --- the rows ---------------------------------------------------------------------------------
    def _exec(self, conn: psycopg.Connection, statement: str, table: str, params: tuple) -> None:
        conn.execute(sql.SQL(statement).format(_t(self.schema, table)), params)
        self.changes += 1

    def add_customer(self, conn: psycopg.Connection, at: datetime) -> int:
        rng, key = self.rng, self.state.take("customers")
        name = f"{rng.choice(NAMES)} {rng.choice(NAMES)}"
        self._exec(
            conn, "INSERT INTO {} VALUES (%s, %s, %s, %s, 0, %s)", "customers",
            (key, f"customer{key}@example.com", name, rng.choice(COUNTRIES), at),
        )  # fmt: skip
        self.state.customers.append(key)
        return key

    def add_product(self, conn: psycopg.Connection, at: datetime) -> int:
        rng, key = self.rng, self.state.take("products")
        price = Decimal(rng.randrange(199, 49_999)) / 100
        name = f"{rng.choice(ADJECTIVES)} {rng.choice(WORDS)}"
        attributes = (
            f'{{"color": "{rng.choice(["black", "white", "grün", "oak"])}", "weight_g": {rng.randrange(50, 9000)}}}'
        )
        self._exec(
            conn, "INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s, true, %s)", "products",
            (key, f"SKU-{key:06d}", name, price, rng.sample(TAGS, rng.randrange(0, 3)), attributes,
             at.replace(tzinfo=None)),
        )  # fmt: skip
        self.state.prices[key] = price
        return key

    def place_order(self, conn: psycopg.Connection, at: datetime) -> int:
        """A new order with 1-4 lines; its total is the lines' sum."""
        rng, state = self.rng, self.state
        order_id = state.take("orders")
        customer = rng.choice(state.customers)
        products = rng.sample(sorted(state.prices), min(len(state.prices), rng.choice([1, 1, 2, 2, 3, 4])))
        lines = [(n, rng.choice([1, 1, 1, 2, 3]), state.prices[p], p) for n, p in enumerate(products, start=1)]
        total = sum((q * price for _, q, price, _ in lines), Decimal("0.00"))
        note = rng.choice([None, None, None, "gift", "leave at door ✓", "call before delivery"])
        self._exec(
            conn, "INSERT INTO {} VALUES (%s, %s, 'new', %s, %s, %s)", "orders", (order_id, customer, total, note, at)
        )
        for line_no, quantity, price, product in lines:
            self._exec(
                conn, "INSERT INTO {} VALUES (%s, %s, %s, %s, %s)", "order_items",
                (order_id, line_no, product, quantity, price),
            )  # fmt: skip
        state.orders["new"][order_id] = (customer, total)
        state.lines[order_id] = [(n, q, price) for n, q, price, _ in lines]
        return order_id

    def _set_status(self, conn: psycopg.Connection, order_id: int, old: str, new: str) -> tuple[int, Decimal]:
        self._exec(conn, "UPDATE {} SET status = %s WHERE id = %s", "orders", (new, order_id))
        value = self.state.orders[old].pop(order_id)
        if new in self.state.orders:
            self.state.orders[new][order_id] = value
        if old == "new":
            self.state.lines.pop(order_id, None)
        return value

    def pay(self, conn: psycopg.Connection, order_id: int, at: datetime) -> None:
        _, total = self._set_status(conn, order_id, "new", "paid")
        payment = self.state.take("payments")
        self._exec(
            conn, "INSERT INTO {} VALUES (%s, %s, %s, 'EUR', %s, 'captured', %s)", "payments",
            (payment, order_id, total, self.rng.choice(METHODS), at),
        )  # fmt: skip
        self.state.payments[order_id] = payment

    def ship(self, conn: psycopg.Connection, order_id: int) -> None:
        self._set_status(conn, order_id, "paid", "shipped")

    def deliver(self, conn: psycopg.Connection, order_id: int) -> None:
        customer, total = self._set_status(conn, order_id, "shipped", "delivered")
        self.state.payments.pop(order_id, None)
        self._exec(  # one loyalty point per full euro
            conn, "UPDATE {} SET loyalty_points = loyalty_points + %s WHERE id = %s", "customers",
            (int(total), customer),
        )  # fmt: skip

    def cancel(self, conn: psycopg.Connection, order_id: int, status: str) -> None:
        self._set_status(conn, order_id, status, "cancelled")
        payment = self.state.payments.pop(order_id, None)
        if payment is not None:
            self._exec(conn, "UPDATE {} SET status = 'refunded' WHERE id = %s", "payments", (payment,))

    def edit_cart(self, conn: psycopg.Connection, order_id: int) -> None:
        """Change a line's quantity, or remove a line, of a new order; its total follows."""
        lines = self.state.lines[order_id]
        index = self.rng.randrange(len(lines))
        line_no, quantity, price = lines[index]
        if len(lines) > 1 and self.rng.random() < 0.4:
            self._exec(conn, "DELETE FROM {} WHERE order_id = %s AND line_no = %s", "order_items", (order_id, line_no))
            lines.pop(index)
        else:
            quantity = quantity % 5 + 1
            self._exec(
                conn, "UPDATE {} SET quantity = %s WHERE order_id = %s AND line_no = %s", "order_items",
                (quantity, order_id, line_no),
            )  # fmt: skip
            lines[index] = (line_no, quantity, price)
        total = sum((q * p for _, q, p in lines), Decimal("0.00"))
        self._exec(conn, "UPDATE {} SET total = %s WHERE id = %s", "orders", (total, order_id))
        customer, _ = self.state.orders["new"][order_id]
        self.state.orders["new"][order_id] = (customer, total)

    def abandon(self, conn: psycopg.Connection, order_id: int) -> None:
        """An abandoned cart is deleted with its lines."""
        for line_no, _, _ in self.state.lines.pop(order_id):
            self._exec(conn, "DELETE FROM {} WHERE order_id = %s AND line_no = %s", "order_items", (order_id, line_no))
        self._exec(conn, "DELETE FROM {} WHERE id = %s", "orders", (order_id,))
        del self.state.orders["new"][order_id]

    def reprice(self, conn: psycopg.Connection, at: datetime) -> None:
        product = self.rng.choice(sorted(self.state.prices))
        price = (self.state.prices[product] * Decimal(self.rng.choice(["0.9", "0.95", "1.05", "1.1"]))).quantize(CENT)
        price = max(price, Decimal("0.99"))
        self._exec(
            conn, "UPDATE {} SET price = %s, updated_at = %s WHERE id = %s", "products",
            (price, at.replace(tzinfo=None), product),
        )  # fmt: skip
        self.state.prices[product] = price

    # --- history and activity ---------------------------------------------------------------------
    def history(
        self,
        conn: psycopg.Connection,
        *,
        customers: int,
        products: int,
        orders: int,
        start_index: int = 0,
        total_orders: int | None = None,
        now: datetime | None = None,
    ) -> int:
        """A past over the last 180 days: `customers` and `products`, then orders number `start_index` to
        `start_index + orders` of `total_orders` (in chunks, to show progress), spread over the period: old
        ones delivered (or cancelled), recent ones still new, paid or shipped. Returns the rows written."""
        before = self.changes
        total_orders = total_orders or orders
        now = now or self.history_now
        start = now - timedelta(days=180)
        with conn.transaction():
            for _ in range(products):
                self.add_product(conn, start + timedelta(seconds=self.rng.randrange(86_400)))
            for i in range(customers):
                self.add_customer(conn, start + (now - start) * i / max(customers, 1))
        for i in range(start_index, start_index + orders):
            at = start + (now - start) * (i + self.rng.random()) / max(total_orders, 1)
            age_days = (now - at).days
            with conn.transaction():
                order_id = self.place_order(conn, at)
                if self.rng.random() < 0.05:
                    self.cancel(conn, order_id, "new")
                    continue
                if age_days < 1 and self.rng.random() < 0.5:
                    continue  # still new
                self.pay(conn, order_id, at + timedelta(minutes=self.rng.randrange(1, 60)))
                if age_days < 2 and self.rng.random() < 0.5:
                    continue  # paid, not shipped yet
                if self.rng.random() < 0.02:
                    self.cancel(conn, order_id, "paid")
                    continue
                self.ship(conn, order_id)
                if age_days < 5 and self.rng.random() < 0.6:
                    continue  # on its way
                self.deliver(conn, order_id)
        return self.changes - before

    def step(self, conn: psycopg.Connection) -> None:
        """One thing that happens in the shop, in one transaction."""
        rng, state, now = self.rng, self.state, datetime.now(UTC)
        roll = rng.random()
        with conn.transaction():
            if not state.customers or not state.prices or roll < 0.04:
                self.add_customer(conn, now)
                if not state.prices:
                    self.add_product(conn, now)
            elif roll < 0.06:
                self.add_product(conn, now)
            elif roll < 0.10:
                self.reprice(conn, now)
            elif roll < 0.40 or not any(state.orders.values()):
                self.place_order(conn, now)
            elif roll < 0.50 and state.orders["new"]:
                self.edit_cart(conn, rng.choice(sorted(state.orders["new"])))
            elif roll < 0.53 and state.orders["new"]:
                self.abandon(conn, rng.choice(sorted(state.orders["new"])))
            elif roll < 0.55 and state.orders["paid"]:
                self.cancel(conn, rng.choice(sorted(state.orders["paid"])), "paid")
            elif roll < 0.72 and state.orders["new"]:
                self.pay(conn, min(state.orders["new"]), now)
            elif roll < 0.86 and state.orders["paid"]:
                self.ship(conn, min(state.orders["paid"]))
            elif state.orders["shipped"]:
                self.deliver(conn, min(state.orders["shipped"]))
            else:
                self.place_order(conn, now)


class LiveActivity(threading.Thread):
    """The shop's activity at about `rate` changed rows per second until stopped; falls behind rather than
    bursting when PostgreSQL is slower. `changes` counts the rows written so far, `error` a failure."""

    TICK_S = 0.1

    def __init__(self, conninfo: str, shop: Shop, rate: float) -> None:
        super().__init__(name="demo-activity", daemon=True)
        self.conninfo = conninfo
        self.shop = shop
        self.rate = rate
        self.error: BaseException | None = None
        self._stop_event = threading.Event()
        self._start_changes = shop.changes

    @property
    def changes(self) -> int:
        return self.shop.changes - self._start_changes

    def run(self) -> None:
        started = time.monotonic()
        try:
            with psycopg.connect(self.conninfo, autocommit=True) as conn:
                while not self._stop_event.is_set():
                    target = (time.monotonic() - started) * self.rate
                    if self.changes < target:
                        self.shop.step(conn)
                    else:
                        self._stop_event.wait(self.TICK_S)
                    if target - self.changes > self.rate * 5:  # far behind: do not burst to catch up
                        started = time.monotonic() - self.changes / self.rate
        except BaseException as exc:  # reported by the demo
            self.error = exc

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)

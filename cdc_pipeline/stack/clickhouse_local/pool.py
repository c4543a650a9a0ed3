"""The chDB connections of one kind, each used by one request at a time."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from cdc_pipeline.stack.clickhouse_local.errors import ClickHouseError


@dataclass
class Connection:
    """One chDB connection and the settings and current database applied to it."""

    conn: Any
    applied: dict[str, str] = field(default_factory=dict)
    database: str = "default"


class ConnectionPool:
    """The chDB connections of one kind (read-write, or read-only for GET), each used by one request at a
    time. chDB runs the queries of different connections in parallel (its engine releases the GIL), so a
    request waits for another only when ``limit`` connections of its kind are busy. Connections are opened
    on demand (another connection to the running engine costs about 0.1 ms) and kept until ``close``."""

    def __init__(self, open_connection: Callable[[], Connection], limit: int) -> None:
        self._open = open_connection
        self._limit = limit
        self._idle: list[Connection] = []
        self._busy = 0
        self._closed = False
        self._changed = threading.Condition()

    def add(self, connection: Connection) -> None:
        """Hand an already open connection to the pool."""
        with self._changed:
            self._idle.append(connection)
            self._changed.notify_all()

    @contextmanager
    def acquire(self) -> Iterator[Connection]:
        """A connection for the block, used by nothing else meanwhile."""
        with self._changed:
            while not self._closed and not self._idle and self._busy >= self._limit:
                self._changed.wait()
            if self._closed:
                raise ClickHouseError(236, "ABORTED", "Server is shutting down")
            connection = self._idle.pop() if self._idle else None
            self._busy += 1
        try:
            if connection is None:
                connection = self._open()
            yield connection
        finally:
            with self._changed:
                self._busy -= 1
                if connection is not None:
                    self._idle.append(connection)
                self._changed.notify_all()

    def close(self) -> None:
        """Refuse new requests, wait for the running ones, then close every connection."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            while self._busy:
                self._changed.wait()
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.conn.close()

"""The chDB engine of the process, with ClickHouse's HTTP-session semantics layered on top."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdc_pipeline.stack.clickhouse_local.errors import ClickHouseError
from cdc_pipeline.stack.clickhouse_local.lockdown import (
    LOCAL_TABLE_FUNCTIONS,
    REFUSED_FUNCTIONS,
    check_setting_name,
    write_engine_config,
)
from cdc_pipeline.stack.clickhouse_local.pool import Connection, ConnectionPool
from cdc_pipeline.stack.clickhouse_local.sql import quote_identifier, quote_literal, set_assignments

logger = logging.getLogger(__name__)

DEFAULT_SESSION_TIMEOUT_SECONDS = 60
# Requests of each kind (read-write POST, read-only GET) that run at once; more wait for a connection.
_MAX_CONNECTIONS_PER_KIND = 16
_SETTING_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class _Session:
    """What a ClickHouse HTTP session keeps between requests: SET values (as SQL literals), USE."""

    settings: dict[str, str] = field(default_factory=dict)
    database: str | None = None
    expires_at: float = 0.0
    in_use: bool = False


@dataclass(frozen=True)
class RequestContext:
    """Per-request execution state taken from the HTTP request."""

    database: str | None = None
    settings: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    session_id: str | None = None
    session_timeout: float = DEFAULT_SESSION_TIMEOUT_SECONDS
    close_session: bool = False


@dataclass(frozen=True)
class QueryOutcome:
    """A finished statement: its output bytes and ClickHouse-style summary counters."""

    body: bytes
    summary: dict[str, str]


class ChdbEngine:
    """The chDB engine of the process, with HTTP-session semantics layered on top.

    ClickHouse gives every HTTP request fresh settings and database (or those of its session),
    whereas chDB keeps ``SET``/``USE`` state on the connection. The engine tracks the state it
    has applied to each connection and diffs it against what each request needs, so requests never
    see each other's settings and repeated identical settings cost nothing.

    Requests run concurrently, each on a chDB connection of its own taken from one of two pools that
    share the data: read-write connections for POST requests, and connections fixed at ``readonly = 2``
    for GET requests. As on a ClickHouse server, a session runs one request at a time: a request of a
    session that is busy with another one fails with ``SESSION_IS_LOCKED``.
    """

    def __init__(self, data_dir: str, timezone: str = "UTC", max_connections: int = _MAX_CONNECTIONS_PER_KIND) -> None:
        """Open (or create) the chDB data in ``data_dir``.

        ``timezone`` becomes the server time zone; it is set as the process's TZ, which only
        takes effect if chDB has not been imported yet (the actual zone is read back).
        ``max_connections`` bounds the requests of each kind (read-write, read-only) that run at once;
        more wait for a connection.
        """
        data_path = os.path.abspath(data_dir)
        if "?" in data_path or "&" in data_path:
            raise ValueError(f"The chDB data directory path must not contain '?' or '&': {data_path}")
        os.makedirs(data_path, exist_ok=True)
        # ClickHouse takes its default time zone from TZ when the engine starts.
        os.environ["TZ"] = timezone
        time.tzset()
        import chdb  # noqa: PLC0415 - deferred so the TZ above applies to the engine

        self._sessions_lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._config_dir = Path(tempfile.mkdtemp(prefix="cdc-chdb-config-"))
        url = f"file:{data_path}?config-file={write_engine_config(self._config_dir)}"

        def open_read_write() -> Connection:
            return Connection(chdb.connect(url))

        def open_readonly() -> Connection:
            connection = Connection(chdb.connect(url))
            try:
                # Like ClickHouse's GET: no writes, no DDL, settings may change but readonly may not.
                self._run(connection, b"SET readonly = 2", "TabSeparated", {})
            except BaseException:
                connection.conn.close()
                raise
            return connection

        self._pools = {
            False: ConnectionPool(open_read_write, max_connections),
            True: ConnectionPool(open_readonly, max_connections),
        }
        try:
            # The first connection starts the engine, which stops when the last one is closed.
            self._pools[False].add(open_read_write())
            self._pools[True].add(open_readonly())
            with self._pools[False].acquire() as connection:
                row = self._run(connection, b"SELECT version(), timezone()", "TabSeparated", {})
                names = self._run(connection, b"SELECT name FROM system.table_functions", "TSV", {})
        except BaseException:
            self.close()
            raise
        self.version, self.timezone = row.bytes().decode().rstrip("\n").split("\t")
        available = {name.lower() for name in names.bytes().decode().split()}
        self.refused_functions = frozenset((available - LOCAL_TABLE_FUNCTIONS) | REFUSED_FUNCTIONS)

    def query(self, ctx: RequestContext, sql: bytes, fmt: str, keyword: str, *, readonly: bool = False) -> QueryOutcome:
        """Run one SQL statement, returning its output in ``fmt`` unless it names a FORMAT."""
        assignments = set_assignments(sql.decode(errors="replace")) if keyword == "SET" else {}
        if "readonly" in assignments:
            raise ClickHouseError(48, "NOT_IMPLEMENTED", "SET readonly would lock this endpoint's shared chDB session")
        with self._session(ctx) as session, self._pools[readonly].acquire() as connection:
            self._prepare(connection, ctx, session)
            started = time.monotonic()
            result = self._run(connection, sql, fmt, ctx.params)
            elapsed = time.monotonic() - started
            if keyword == "USE":
                current = self._run(connection, b"SELECT currentDatabase()", "TabSeparated", {})
                connection.database = current.bytes().decode().rstrip("\n")
                if session is not None:
                    session.database = connection.database
            elif assignments:
                # Without a session the next request resets these, as ClickHouse forgets them.
                connection.applied.update(assignments)
                if session is not None:
                    session.settings.update(assignments)
            body = result.bytes()
        return QueryOutcome(
            body,
            {
                "read_rows": str(result.rows_read()),
                "read_bytes": str(result.bytes_read()),
                "written_rows": str(result.rows_written()),
                "written_bytes": str(result.bytes_written()),
                "total_rows_to_read": "0",
                "result_bytes": str(len(body)),
                "elapsed_ns": str(int(elapsed * 1e9)),
            },
        )

    def insert(self, ctx: RequestContext, statement: str, fmt: str, data: Iterable[bytes]) -> QueryOutcome:
        """Stream ``data`` (encoded in ``fmt``) into ``statement`` (an INSERT without FORMAT)."""
        with self._session(ctx) as session, self._pools[False].acquire() as connection:
            self._prepare(connection, ctx, session)
            started = time.monotonic()
            try:
                # Leaving the block without finish() cancels the insert: nothing is committed.
                with connection.conn.send_insert(statement, fmt) as inserter:
                    for chunk in data:
                        inserter.append(chunk)
                    written = inserter.finish()
            except Exception as exc:
                raise ClickHouseError.from_engine(exc) from exc
            elapsed = time.monotonic() - started
        return QueryOutcome(
            b"",
            {
                "read_rows": str(written.rows_written),
                "read_bytes": str(written.bytes_written),
                "written_rows": str(written.rows_written),
                "written_bytes": str(written.bytes_written),
                "total_rows_to_read": "0",
                "result_bytes": "0",
                "elapsed_ns": str(int(elapsed * 1e9)),
            },
        )

    def close(self) -> None:
        """Refuse new requests (ABORTED), wait for the running ones, and close the chDB connections."""
        for pool in self._pools.values():
            pool.close()
        shutil.rmtree(self._config_dir, ignore_errors=True)

    def _run(self, connection: Connection, sql: bytes, fmt: str, params: Mapping[str, str]) -> Any:
        try:
            return connection.conn.query(sql, fmt, params=dict(params))
        except Exception as exc:
            error = ClickHouseError.from_engine(exc)
            if error.name == "ACCESS_DENIED" and "READ ON FILE" in str(error):
                # clickhouse-local looks an unknown table of `default` up as a file, which the missing
                # grant refuses: to a client, as on a real server, it is an unknown table.
                raise ClickHouseError(
                    60, "UNKNOWN_TABLE", "Unknown table expression identifier (files are not tables here)"
                ) from exc
            raise error from exc

    def _prepare(self, connection: Connection, ctx: RequestContext, session: _Session | None) -> None:
        """Bring the connection's settings and current database to what ``ctx`` (and its session) asks for."""
        desired = dict(session.settings) if session is not None else {}
        for name, value in ctx.settings.items():
            if not _SETTING_NAME_RE.fullmatch(name):
                raise ClickHouseError(115, "UNKNOWN_SETTING", f"Unknown setting '{name}'")
            check_setting_name(name)
            desired[name] = quote_literal(value)
        for name in [name for name in connection.applied if name not in desired]:
            del connection.applied[name]
            try:
                self._run(connection, f"SET {name} = DEFAULT".encode(), "TabSeparated", {})
            except ClickHouseError as exc:
                logger.warning("Could not reset setting %s: %s", name, exc)
        for name, literal in desired.items():
            if connection.applied.get(name) != literal:
                self._run(connection, f"SET {name} = {literal}".encode(), "TabSeparated", {})
                connection.applied[name] = literal
        database = ctx.database or (session.database if session else None) or "default"
        if database != connection.database:
            self._run(connection, f"USE {quote_identifier(database)}".encode(), "TabSeparated", {})
            connection.database = database

    @contextmanager
    def _session(self, ctx: RequestContext) -> Iterator[_Session | None]:
        """The request's session (None without ``session_id``), held by this request for the block."""
        if ctx.session_id is None:
            yield None
            return
        with self._sessions_lock:
            now = time.monotonic()
            for session_id in [sid for sid, s in self._sessions.items() if s.expires_at < now and not s.in_use]:
                del self._sessions[session_id]
            session = self._sessions.setdefault(ctx.session_id, _Session())
            if session.in_use:
                raise ClickHouseError(
                    373, "SESSION_IS_LOCKED", f"Session {ctx.session_id} is locked by a concurrent client"
                )
            session.in_use = True
            session.expires_at = now + ctx.session_timeout
        try:
            yield session
        finally:
            with self._sessions_lock:
                session.in_use = False
                session.expires_at = time.monotonic() + ctx.session_timeout
                if ctx.close_session:
                    self._sessions.pop(ctx.session_id, None)

"""The threading HTTP server and ``serve``: the endpoint's lifetime, from binding to a clean stop."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from http.server import ThreadingHTTPServer
from typing import Any

from cdc_pipeline.stack.clickhouse_local.auth import Credentials
from cdc_pipeline.stack.clickhouse_local.engine import ChdbEngine
from cdc_pipeline.stack.clickhouse_local.handler import Handler

logger = logging.getLogger(__name__)


class ClickHouseLocalServer(ThreadingHTTPServer):
    """A threading HTTP server exposing a ``ChdbEngine`` through ClickHouse's HTTP protocol."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], engine: ChdbEngine, credentials: Credentials) -> None:
        """Bind ``address`` (port 0 picks a free port) and serve ``engine``."""
        super().__init__(address, Handler)
        self.engine = engine
        self.credentials = credentials
        self.display_name = socket.gethostname()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log connection-level failures (e.g. a client hanging up) instead of printing them."""
        logger.warning("Connection from %s failed", client_address[0], exc_info=True)


def serve(
    host: str,
    port: int,
    data_dir: str,
    user: str = "default",
    password: str | None = None,
    timezone: str = "UTC",
) -> None:
    """Serve ClickHouse's HTTP interface on ``host:port`` from the chDB data in ``data_dir``.

    Blocks until SIGTERM or SIGINT (handled when called from the main thread), then stops
    accepting requests and closes the chDB connection cleanly. Every request but ``/ping`` needs
    ``user`` and ``password``; a missing password is a ValueError.
    """
    if not password:
        raise ValueError("a password is required: the endpoint never serves requests without authentication")
    engine = ChdbEngine(data_dir, timezone)
    try:
        server = ClickHouseLocalServer((host, port), engine, Credentials(user, password or None))
    except BaseException:
        engine.close()
        raise

    def stop(signum: int, _frame: object) -> None:
        logger.info("Received %s, shutting down", signal.Signals(signum).name)
        # shutdown() waits for serve_forever(), which runs on this (the main) thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, stop)
    bound_host, bound_port = server.server_address[:2]
    logger.info(
        "ClickHouse %s (chDB) listening on http://%s:%d, data in %s, auth %s",
        engine.version,
        bound_host,
        bound_port,
        os.path.abspath(data_dir),
        "on",
    )
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        engine.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        logger.info("Stopped")

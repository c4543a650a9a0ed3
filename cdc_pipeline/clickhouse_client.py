"""The one way the product opens a ClickHouse connection (clickhouse-connect over HTTP)."""

from __future__ import annotations

from urllib.parse import urlsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client


def connect_clickhouse(
    url: str,
    user: str = "default",
    password: str | None = None,
    database: str | None = None,
    **kwargs: object,
) -> Client:
    """A clickhouse-connect client for `url` (http[s]://host:port)."""
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    return clickhouse_connect.get_client(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or (8443 if secure else 8123),
        secure=secure,
        username=user,
        password=password or "",
        database=database or None,
        **kwargs,
    )


def command_int(client: Client, query: str, parameters: dict[str, object] | None = None) -> int:
    """The integer a one-value command answers (`EXISTS TABLE`, `SELECT count()`)."""
    value = client.command(query, parameters=parameters)
    if isinstance(value, int | str):
        return int(value)
    raise TypeError(f"expected one value from {query!r}, got {type(value).__name__}")

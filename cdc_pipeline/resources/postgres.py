from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from dagster import ConfigurableResource
from psycopg.conninfo import make_conninfo
from pydantic import Field

from cdc_pipeline.probes import Health, postgres_health


class PostgresResource(ConfigurableResource):
    """The PostgreSQL source database (psycopg 3)."""

    dsn: str = Field(description="libpq connection string without the password (CDC_POSTGRES_DSN).")
    password: str | None = Field(default=None, description="Password (CDC_POSTGRES_PASSWORD).")

    def conninfo(self) -> str:
        return make_conninfo(self.dsn, password=self.password) if self.password else self.dsn

    @contextmanager
    def connect(self, *, autocommit: bool = False) -> Iterator[psycopg.Connection]:
        with psycopg.connect(self.conninfo(), autocommit=autocommit) as conn:
            yield conn

    def health(self) -> Health:
        return postgres_health(self.conninfo())

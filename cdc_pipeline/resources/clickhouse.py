from __future__ import annotations

from clickhouse_connect.driver.client import Client
from dagster import ConfigurableResource
from pydantic import Field

from cdc_pipeline.clickhouse_client import connect_clickhouse
from cdc_pipeline.probes import Health, clickhouse_health


class ClickHouseResource(ConfigurableResource):
    """The ClickHouse sink, reached over HTTP with clickhouse-connect."""

    url: str = Field(description="http(s)://host:port of ClickHouse's HTTP interface (CDC_CLICKHOUSE_URL).")
    user: str = "default"
    password: str | None = Field(default=None, description="Password (CDC_CLICKHOUSE_PASSWORD).")
    database: str = Field(default="cdc", description="Database of the replica tables (CDC_CLICKHOUSE_DATABASE).")

    def client(self, **kwargs: object) -> Client:
        return connect_clickhouse(self.url, self.user, self.password, self.database, **kwargs)

    def health(self) -> Health:
        return clickhouse_health(self.url, self.user, self.password)

"""Where each snapshot starts in each topic, recorded by the stream so that changes can be ordered
against it later (see `batch.anchor_positions`).

A snapshot's rows carry its LSN; the first transaction a connector streams after starting carries no
previous commit position, only its change LSN, which can be older than the snapshot it follows. The
stream records every snapshot it applies as (topic, partition, first offset, LSN) in
`<database>._cdc_snapshot_points` (a few rows per snapshot), and reads them back only for a batch
that holds such a change, so a replay of any range finds the snapshots before it too.
"""

from __future__ import annotations

from collections.abc import Iterable

from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client

from cdc_pipeline.streaming.batch import SnapshotPoints

SNAPSHOT_POINTS_TABLE = "_cdc_snapshot_points"


def snapshot_points_sql(database: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {quote_identifier(database)}.{SNAPSHOT_POINTS_TABLE} "
        "(topic String, partition Int32, first_offset Int64, lsn UInt64) "
        "ENGINE = ReplacingMergeTree ORDER BY (topic, partition, lsn, first_offset)"
    )


class SnapshotPointLog:
    """Records and reads the snapshot points of one replica database (idempotent: a replayed batch
    records the same points again, which the table merges)."""

    def __init__(self, client: Client, database: str) -> None:
        self.client = client
        self.database = database
        self._table = f"{quote_identifier(database)}.{SNAPSHOT_POINTS_TABLE}"
        self._created = False
        self._recorded: set[tuple[str, int, int]] = set()  # (topic, partition, lsn) recorded by this process

    def _ensure(self) -> None:
        if not self._created:
            self.client.command(snapshot_points_sql(self.database))
            self._created = True

    def record(self, points: Iterable[tuple[str, int, int, int]]) -> None:
        """Record (topic, partition, first_offset, lsn) points, once per (topic, partition, lsn) per process."""
        new = [point for point in points if (point[0], point[1], point[3]) not in self._recorded]
        if not new:
            return
        self._ensure()
        self.client.insert(
            self._table, [list(point) for point in new], column_names=["topic", "partition", "first_offset", "lsn"]
        )
        self._recorded.update((topic, partition, lsn) for topic, partition, _, lsn in new)

    def read(self, topics: Iterable[str]) -> SnapshotPoints:
        """(topic, partition) -> [(first offset, lsn)] of every recorded snapshot of these topics."""
        wanted = sorted(set(topics))
        if not wanted:
            return {}
        self._ensure()
        rows = self.client.query(
            f"SELECT topic, partition, min(first_offset), lsn FROM {self._table} "
            "WHERE has({topics:Array(String)}, topic) GROUP BY topic, partition, lsn",
            parameters={"topics": wanted},
        ).result_rows
        points: SnapshotPoints = {}
        for topic, partition, first_offset, lsn in rows:
            points.setdefault((str(topic), int(partition)), []).append((int(first_offset), int(lsn)))
        return points

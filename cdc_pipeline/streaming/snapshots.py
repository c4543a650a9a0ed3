"""Where each snapshot starts in each topic, recorded by the stream so that changes can be ordered
against it later (see `batch.anchor_positions`).

A snapshot's rows carry its LSN; the first transaction a connector streams after starting carries no
previous commit position, only its change LSN, which can be older than the snapshot it follows. The
stream records every snapshot it applies as (topic, partition, first offset, LSN) in
`<database>._cdc_snapshot_points` (a few rows per snapshot), and reads them back only for a batch
that holds such a change, so a replay of any range finds the snapshots before it too.

It also records where each table's snapshot completes (its last row, `last_in_data_collection` or `last`)
in `<database>._cdc_snapshot_ends`. A snapshot that never completed was interrupted (Kafka Connect killed
mid-snapshot): Debezium then takes a new snapshot, at a later LSN, and streams only what follows it. A row
the first snapshot wrote and the source deleted before the second one is in neither the second snapshot
nor the stream, so when the next snapshot of the table completes, the stream marks deleted every replica
row older than it (see `ChangeApplier`). The same holds after an initial snapshot (the connector started
without offsets: killed before it flushed them) that follows a complete one.
"""

from __future__ import annotations

from collections.abc import Iterable

from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client

from cdc_pipeline.streaming.batch import SnapshotPoints

SNAPSHOT_POINTS_TABLE = "_cdc_snapshot_points"
SNAPSHOT_ENDS_TABLE = "_cdc_snapshot_ends"


def snapshot_points_sql(database: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {quote_identifier(database)}.{SNAPSHOT_POINTS_TABLE} "
        "(topic String, partition Int32, first_offset Int64, lsn UInt64) "
        "ENGINE = ReplacingMergeTree ORDER BY (topic, partition, lsn, first_offset)"
    )


def snapshot_ends_sql(database: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {quote_identifier(database)}.{SNAPSHOT_ENDS_TABLE} "
        "(topic String, partition Int32, lsn UInt64, last_offset Int64) "
        "ENGINE = ReplacingMergeTree ORDER BY (topic, partition, lsn)"
    )


class SnapshotPointLog:
    """Records and reads the snapshot points of one replica database (idempotent: a replayed batch
    records the same points again, which the table merges)."""

    def __init__(self, client: Client, database: str) -> None:
        self.client = client
        self.database = database
        self._table = f"{quote_identifier(database)}.{SNAPSHOT_POINTS_TABLE}"
        self._ends = f"{quote_identifier(database)}.{SNAPSHOT_ENDS_TABLE}"
        self._created = False
        self._recorded: set[tuple[str, int, int]] = set()  # (topic, partition, lsn) recorded by this process
        self._recorded_ends: set[tuple[str, int, int]] = set()

    def _ensure(self) -> None:
        if self._created:
            return
        had_ends = self.client.query(
            "SELECT count() FROM system.tables WHERE database = {db:String} AND name = {t:String}",
            parameters={"db": self.database, "t": SNAPSHOT_ENDS_TABLE},
        ).result_rows[0][0]
        self.client.command(snapshot_points_sql(self.database))
        self.client.command(snapshot_ends_sql(self.database))
        if not had_ends:
            # A replica from before ends were recorded: its snapshots count as complete (none is taken for
            # interrupted, so nothing is removed on their account).
            self.client.command(
                f"INSERT INTO {self._ends} (topic, partition, lsn, last_offset) "
                f"SELECT topic, partition, lsn, -1 FROM {self._table}"
            )
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

    def record_ends(self, ends: Iterable[tuple[str, int, int, int]]) -> None:
        """Record (topic, partition, last offset, lsn) of table snapshots that completed."""
        new = [end for end in ends if (end[0], end[1], end[3]) not in self._recorded_ends]
        if not new:
            return
        self._ensure()
        self.client.insert(
            self._ends,
            [[topic, partition, lsn, offset] for topic, partition, offset, lsn in new],
            column_names=["topic", "partition", "lsn", "last_offset"],
        )
        self._recorded_ends.update((topic, partition, lsn) for topic, partition, _, lsn in new)

    def history(self, topic: str, partition: int) -> tuple[list[tuple[int, int]], set[int]]:
        """Every snapshot of a topic partition: [(first offset, lsn)] and the LSNs of those that completed."""
        self._ensure()
        params = {"topic": topic, "partition": partition}
        starts = self.client.query(
            f"SELECT min(first_offset), lsn FROM {self._table} "
            "WHERE topic = {topic:String} AND partition = {partition:Int32} GROUP BY lsn",
            parameters=params,
        ).result_rows
        ends = self.client.query(
            f"SELECT DISTINCT lsn FROM {self._ends} WHERE topic = {{topic:String}} AND partition = {{partition:Int32}}",
            parameters=params,
        ).result_rows
        return [(int(offset), int(lsn)) for offset, lsn in starts], {int(row[0]) for row in ends}

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

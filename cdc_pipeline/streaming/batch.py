"""One micro-batch's decoded changes on the driver, as an Arrow table: which records are dead letters,
where each topic was last truncated, the last change per primary key, the schemas it uses, and the
history of a row. Pure pyarrow (vectorized: no Python loop over the batch's rows but for the changes
that are applied), so it is tested without Spark.

The table has the columns of `envelope.decode_envelope` (DECODED_COLUMNS, and ANCHOR_COLUMNS for
`snapshot_points`, `unanchored_topics` and `anchor_positions`, which run before `DecodedBatch.of`): Spark
decodes the batch in one pass and ships these few columns with `DataFrame.toArrow()`; the raw key and
value bytes stay in Kafka and are read again only for dead letters.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROW_OPS = ("c", "r", "u", "d")
TRUNCATE = "t"

DECODED_COLUMNS = (
    "topic", "partition", "offset", "op", "commit_lsn", "change_lsn", "key_json", "after_json", "before_json",
    "value_schema_id", "key_schema_id", "source_ts_ms", "error",
)  # fmt: skip
# Where each snapshot starts and ends, and which changes have no previous commit position (see envelope.py).
ANCHOR_COLUMNS = ("snapshot_lsn", "unanchored", "snapshot_end", "snapshot_initial")

# (topic, partition) -> [(first offset of a snapshot's rows, its LSN)] (see streaming/snapshots.py).
SnapshotPoints = dict[tuple[str, int], list[tuple[int, int]]]


class Change(NamedTuple):
    """One decoded Kafka record (a row change, a truncate, or a record that cannot be applied)."""

    topic: str
    partition: int
    offset: int
    op: str | None
    commit_lsn: int | None
    change_lsn: int | None
    key_json: str | None
    after_json: str | None
    before_json: str | None
    value_schema_id: int | None
    key_schema_id: int | None
    source_ts_ms: int | None
    error: str | None


class SchemaUse(NamedTuple):
    """A distinct (value schema, key schema) of a topic's row changes in the batch, and the first record
    (by partition and offset) that carries it: where its schema texts are read."""

    topic: str
    value_schema_id: int
    key_schema_id: int
    partition: int
    offset: int


def changes(table: pa.Table) -> list[Change]:
    """The table's rows as Change tuples (column by column: no per-row dict)."""
    if table.num_rows == 0:
        return []
    columns = [table.column(name).to_pylist() for name in DECODED_COLUMNS]
    return [Change(*values) for values in zip(*columns, strict=True)]


@dataclass
class DecodedBatch:
    """The decoded batch (`records`: how many, tombstones left out), split once: `errors` (records to
    dead-letter with `error` as the reason), `truncates` (per topic, the position of its last truncate),
    `schema_uses` (of every valid row change), `rows` (valid row changes that no later truncate of the
    batch wipes out, sorted by topic and key, newest first) and `latest` (the first change of each key
    in `rows`: the last one by source position)."""

    records: int
    errors: list[Change]
    truncates: dict[str, tuple[int, int]]
    schema_uses: list[SchemaUse]
    rows: pa.Table
    latest: pa.Table

    @classmethod
    def of(cls, table: pa.Table) -> DecodedBatch:
        table = table.select(list(DECODED_COLUMNS))
        error = table.column("error")
        op = table.column("op")
        errors = changes(table.filter(pc.is_valid(error)))
        valid = table.filter(pc.and_(pc.is_null(error), pc.is_valid(op)))
        truncates: dict[str, tuple[int, int]] = {}
        cut = valid.filter(pc.equal(valid.column("op"), TRUNCATE))
        for topic, commit, change in zip(
            cut.column("topic").to_pylist(),
            cut.column("commit_lsn").to_pylist(),
            cut.column("change_lsn").to_pylist(),
            strict=True,
        ):
            if topic not in truncates or (commit, change) > truncates[topic]:
                truncates[topic] = (commit, change)
        rows = valid.filter(pc.is_in(valid.column("op"), pa.array(ROW_OPS)))
        uses = _schema_uses(rows)
        for topic, (commit, change) in truncates.items():
            # Changes at or before the topic's last truncate are wiped out by it: (c, ch) > (tc, tch).
            other = pc.not_equal(rows.column("topic"), topic)
            later = pc.or_(
                pc.greater(rows.column("commit_lsn"), commit),
                pc.and_(pc.equal(rows.column("commit_lsn"), commit), pc.greater(rows.column("change_lsn"), change)),
            )
            rows = rows.filter(pc.or_(other, later))
        order = pc.sort_indices(
            rows,
            sort_keys=[
                ("topic", "ascending"),
                ("key_json", "ascending"),
                ("commit_lsn", "descending"),
                ("change_lsn", "descending"),
                ("partition", "descending"),
                ("offset", "descending"),
            ],
        )
        rows = rows.take(order)
        return cls(table.num_rows, errors, truncates, uses, rows, rows.filter(_group_starts(rows)))

    def latest_by_topic(self) -> dict[str, list[Change]]:
        found: dict[str, list[Change]] = {}
        for change in changes(self.latest):
            found.setdefault(change.topic, []).append(change)
        return found

    def latest_tables(self) -> dict[str, pa.Table]:
        """`latest` by topic, as Arrow tables (the columnar path converts them; see streaming/columnar.py)."""
        topics = self.latest.column("topic")
        return {topic: self.latest.filter(pc.equal(topics, topic)) for topic in pc.unique(topics).to_pylist()}

    def history(self, topic: str, key_jsons: Collection[str]) -> dict[str, list[Change]]:
        """Every change of these rows in this batch (after its last truncate), newest first."""
        if not key_jsons:
            return {}
        rows = self.rows
        mask = pc.and_(
            pc.equal(rows.column("topic"), topic), pc.is_in(rows.column("key_json"), pa.array(sorted(key_jsons)))
        )
        found: dict[str, list[Change]] = {}
        for change in changes(rows.filter(mask)):
            found.setdefault(change.key_json, []).append(change)  # type: ignore[arg-type]
        return found


def _valid(table: pa.Table) -> pa.Table:
    return table.filter(pc.and_(pc.is_null(table.column("error")), pc.is_valid(table.column("op"))))


def snapshot_points(table: pa.Table) -> list[tuple[str, int, int, int]]:
    """(topic, partition, first offset, LSN) of each snapshot whose rows are in the batch (valid rows only)."""
    rows = _valid(table)
    rows = rows.filter(pc.is_valid(rows.column("snapshot_lsn")))
    if rows.num_rows == 0:
        return []
    grouped = rows.group_by(["topic", "partition", "snapshot_lsn"], use_threads=False).aggregate([("offset", "min")])
    return sorted(
        zip(
            *(grouped.column(name).to_pylist() for name in ("topic", "partition", "offset_min", "snapshot_lsn")),
            strict=True,
        )
    )


def snapshot_ends(table: pa.Table) -> list[tuple[str, int, int, int]]:
    """(topic, partition, offset, LSN) of each table snapshot that completes in the batch: its last row
    (valid rows only)."""
    return [end[:4] for end in _snapshot_end_rows(table)]


def initial_snapshot_ends(table: pa.Table) -> set[tuple[str, int, int]]:
    """(topic, partition, LSN) of the table snapshots completing in the batch that the connector took when it
    started without offsets (Debezium's initial snapshot: its rows carry no previous commit position)."""
    return {(topic, partition, lsn) for topic, partition, _, lsn, initial in _snapshot_end_rows(table) if initial}


def _snapshot_end_rows(table: pa.Table) -> list[tuple[str, int, int, int, bool]]:
    if "snapshot_end" not in table.column_names:
        return []
    rows = _valid(table)
    rows = rows.filter(pc.fill_null(rows.column("snapshot_end"), False))
    initial = (
        pc.fill_null(rows.column("snapshot_initial"), False)
        if "snapshot_initial" in rows.column_names
        else pa.array([False] * rows.num_rows)
    )
    columns = [rows.column(name).to_pylist() for name in ("topic", "partition", "offset", "snapshot_lsn")]
    return sorted(zip(*columns, initial.to_pylist(), strict=True))


def interrupted_before(
    starts: list[tuple[int, int]], ends: set[int], first_offset: int, *, initial: bool = False
) -> int | None:
    """The LSN of the snapshot that precedes the one starting at `first_offset` in a topic partition, when
    the rows between them may hold deletes no record carries: that snapshot never completed (no end
    recorded for its LSN), or the new one is `initial` (the connector started without offsets, so Debezium
    streams only what follows the new snapshot); else None. `starts`: (first offset, LSN) of every snapshot
    of the partition; `ends`: the LSNs of those that completed. A blocking snapshot after a complete one
    gives None: it may carry a filter, and streaming went on around it."""
    before = [(offset, lsn) for offset, lsn in starts if offset < first_offset]
    if not before:
        return None
    _, lsn = max(before)
    return lsn if initial or lsn not in ends else None


def unanchored_topics(table: pa.Table) -> list[str]:
    """The topics of the batch's valid changes that have no previous commit position."""
    rows = _valid(table)
    rows = rows.filter(pc.fill_null(rows.column("unanchored"), False))
    return sorted(set(rows.column("topic").to_pylist()))


def anchor_positions(table: pa.Table, points: SnapshotPoints) -> pa.Table:
    """Raise each unanchored valid change's commit_lsn to the newest snapshot LSN recorded before it in its
    topic partition (points whose first offset is below the change's offset); other rows as they are."""
    if table.num_rows == 0 or not points:
        return table
    topic = table.column("topic").to_pylist()
    partition = table.column("partition").to_numpy(zero_copy_only=False)
    offset = table.column("offset").to_numpy(zero_copy_only=False)
    commit = table.column("commit_lsn")
    candidates = pc.and_(
        pc.and_(pc.fill_null(table.column("unanchored"), False), pc.is_null(table.column("error"))),
        pc.is_valid(commit),
    ).to_numpy(zero_copy_only=False)
    if not candidates.any():
        return table
    floor = np.full(table.num_rows, -1, dtype=np.int64)
    topics = np.array(topic, dtype=object)
    for (point_topic, point_partition), found in sorted(points.items()):
        here = candidates & (topics == point_topic) & (partition == point_partition)
        if not here.any():
            continue
        ordered = sorted(found)
        starts = np.array([first for first, _ in ordered], dtype=np.int64)
        newest = np.maximum.accumulate(np.array([lsn for _, lsn in ordered], dtype=np.int64))
        before = np.searchsorted(starts, offset[here], side="left")  # points with first offset < offset
        floor[here] = np.where(before > 0, newest[np.maximum(before - 1, 0)], -1)
    raise_to = floor >= 0
    if not raise_to.any():
        return table
    values = pc.fill_null(commit, 0).to_numpy(zero_copy_only=False).astype(np.int64)  # exact: no float
    values = np.where(raise_to, np.maximum(values, floor), values)
    anchored = pa.array(values, type=pa.int64(), mask=pc.is_null(commit).to_numpy(zero_copy_only=False))
    return table.set_column(table.schema.get_field_index("commit_lsn"), "commit_lsn", anchored)


def _schema_uses(rows: pa.Table) -> list[SchemaUse]:
    """Each distinct (topic, value schema, key schema) of the row changes with its first record (lowest
    (partition, offset)), in order of first appearance per topic."""
    if rows.num_rows == 0:
        return []
    ordered = rows.sort_by([("partition", "ascending"), ("offset", "ascending")])
    grouped = ordered.group_by(["topic", "value_schema_id", "key_schema_id"], use_threads=False).aggregate(
        [("partition", "first"), ("offset", "first")]
    )
    uses = [
        SchemaUse(topic, vid, kid, partition, offset)
        for topic, vid, kid, partition, offset in zip(
            *(grouped.column(name).to_pylist() for name in
              ("topic", "value_schema_id", "key_schema_id", "partition_first", "offset_first")),
            strict=True,
        )
    ]  # fmt: skip
    return sorted(uses, key=lambda u: (u.topic, u.partition, u.offset))


def _group_starts(rows: pa.Table) -> pa.Array:
    """True for each row whose (topic, key_json) differs from the row before (rows sorted by them)."""
    n = rows.num_rows
    if n == 0:
        return pa.array([], pa.bool_())
    topic, key = rows.column("topic"), rows.column("key_json")
    same_topic = pc.equal(topic.slice(1), topic.slice(0, n - 1))
    same_key = pc.equal(key.slice(1), key.slice(0, n - 1))
    same = pc.fill_null(pc.and_(same_topic, same_key), False)
    return pa.concat_arrays([pa.array([True]), pc.invert(same).combine_chunks()])


def positions(records: Iterable[Any]) -> list[tuple[str, int, int]]:
    """(topic, partition, offset) of each record, without repeats, in order."""
    return list(dict.fromkeys((r.topic, r.partition, r.offset) for r in records))

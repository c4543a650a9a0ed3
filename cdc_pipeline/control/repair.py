"""Repairing a replica after `reconcile` found differences: the missing and different keys are re-read
from the source by an incremental snapshot filtered on their keys (or of the whole table when they are
too many), and extra rows (in the replica, not in the source) are marked deleted, since a snapshot of
the source cannot remove them. Dagster-free: the reconcile job (defs/jobs/reconcile_job.py) wires it."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.abc import AdaptContext

from cdc_pipeline.config import TableConfig
from cdc_pipeline.control.reconcile import Differences, normalize
from cdc_pipeline.control.replicas import Replica
from cdc_pipeline.control.source import primary_key

# The signal table's `data` column is varchar(2048) in Debezium's documented DDL: a longer key filter
# falls back to a snapshot of the whole table.
MAX_SIGNAL_FILTER_CHARS = 1800
EXISTING_KEYS_BATCH = 500  # keys per query when asking the source which keys it has


def key_filter(conn: AdaptContext | None, key: list[str], values: list[tuple[Any, ...]]) -> str:
    """`(k1, k2) IN ((v1, v2), ...)`: a SQL condition selecting the rows with these key values."""
    columns = sql.SQL(", ").join(sql.Identifier(k) for k in key)
    tuples = sql.SQL(", ").join(
        sql.SQL("({})").format(sql.SQL(", ").join(sql.Literal(v) for v in row)) for row in values
    )
    return sql.SQL("({}) IN ({})").format(columns, tuples).as_string(conn)


def existing_keys(
    conn: psycopg.Connection[Any], table: TableConfig, key: list[str], keys: list[tuple[Any, ...]]
) -> set[tuple[Any, ...]]:
    """Which of `keys` the source table has, normalized like the keys of a `Differences`."""
    found: set[tuple[Any, ...]] = set()
    for start in range(0, len(keys), EXISTING_KEYS_BATCH):
        query = sql.SQL("SELECT {} FROM {} WHERE ").format(
            sql.SQL(", ").join(sql.Identifier(k) for k in key), sql.Identifier(table.schema_name, table.table_name)
        ) + sql.SQL(key_filter(conn, key, keys[start : start + EXISTING_KEYS_BATCH]))
        found |= {tuple(normalize(v) for v in row) for row in conn.execute(query)}  # as the diff has keys
    return found


@dataclass
class RepairPlan:
    """What repairs a replica: the keys to backfill with the snapshot's filter (None: the whole table),
    and the extra rows to mark deleted with the live versions they had when read."""

    key: list[str]
    backfill_keys: list[tuple[Any, ...]] = field(default_factory=list)
    condition: str | None = None
    extra: dict[tuple[Any, ...], tuple[tuple[Any, ...], int]] = field(default_factory=dict)


def plan_repair(
    conn: psycopg.Connection[Any], table: TableConfig, diff: Differences, replica: Replica, max_filter_keys: int
) -> RepairPlan:
    key = primary_key(conn, table)
    keys = diff.keys_to_backfill()
    condition = key_filter(conn, key, keys) if 0 < len(keys) <= max_filter_keys else None
    if condition and len(condition) > MAX_SIGNAL_FILTER_CHARS:
        condition = None
    # The stale rows' versions are read before the source is asked whether the keys exist: a key the
    # source gains meanwhile arrives through the stream with a higher version than the marker's.
    stale = replica.live_versions(key, diff.extra) if diff.extra else {}
    existing = existing_keys(conn, table, key, list(stale))
    extra = {k: found for k, found in stale.items() if k not in existing}
    return RepairPlan(key, keys, condition, extra)


def repair(
    connect: Callable[[], AbstractContextManager[psycopg.Connection[Any]]],
    table: TableConfig,
    diff: Differences,
    replica: Replica,
    max_filter_keys: int,
    backfill: Callable[[str | None], dict[str, Any]],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Mark the extra rows deleted, then `backfill(condition)` the missing and different keys; the
    summary of what was done. `connect` opens a source connection (autocommit)."""
    with connect() as conn:
        plan = plan_repair(conn, table, diff, replica, max_filter_keys)
    result: dict[str, Any] = {}
    if plan.extra:
        replica.mark_deleted(plan.key, plan.extra)
        result["extra_marked_deleted"] = len(plan.extra)
    if plan.backfill_keys:
        log(
            f"backfilling {len(plan.backfill_keys)} rows of {table.name}"
            + ("" if plan.condition else " (whole table: too many keys)")
        )
        result.update(backfill(plan.condition))
    return result

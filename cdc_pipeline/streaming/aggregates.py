"""Windowed aggregations (`aggregates:` in pipeline.yaml) over the current state of the replicas.

Semantics: an aggregate is a function of the rows that are live in the replica now. A window's
result is recomputed from the replica (`FINAL`, deleted rows excluded) with one SQL statement
whenever a change touches it, so an update or delete of a row corrects every window the row was in
and every window it is in now. Results go to a `ReplacingMergeTree(_version, _is_deleted)` table
ordered by (window_start, group...): one live row per (window, group), written with a version from
ClickHouse's clock, so re-running a batch, a replay or a restart writes the same values again and
never double counts. A recompute first writes a tombstone for every live row of the touched windows
and then the fresh rows with a higher version, in the same statement: a group whose rows all went
away disappears from `FINAL`.

Hooks the batch writer calls (`ChangeApplier`, streaming/apply.py), per replica table and batch:
    before_truncate(table)        before a truncate is applied: every window of the table's aggregates
    before_write(table, keys)     before the rows are written: `keys` are the replica key values of the
                                  batch's changed rows; reads those rows' current event times (their
                                  windows before the change) and records the windows in the
                                  `_cdc_aggregate_pending` table (a write-ahead log: a crash between the
                                  replica write and the recompute leaves them pending, and the next
                                  writer recomputes them at its first batch; the rows' new windows are
                                  recomputed when Spark re-runs the batch it did not commit)
    after_write(table)            after the rows are written: reads the rows' new event times, recomputes
                                  every touched window, records late changes and progress, clears the log
Tables without aggregates cost nothing.

Watermark: per aggregate, the largest event time seen by the stream (persisted in
`_cdc_aggregate_progress`) minus `watermark_delay`, as of the start of the batch. A window whose end
is at or before it is closed. A change that touches a closed window (its old or new event time) is
late: the window is still corrected (the recompute is exact), and the change is recorded in
`_cdc_aggregate_late` with its lateness (watermark - window end), never dropped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from clickhouse_connect.driver.binding import format_query_value, quote_identifier
from clickhouse_connect.driver.client import Client

from cdc_pipeline.clickhouse_client import command_int
from cdc_pipeline.config import AggregateConfig, MeasureConfig, PipelineConfig, duration_us
from cdc_pipeline.contract import CLICKHOUSE_ENGINE, DELETED, IS_DELETED, LIVE, LIVE_ROWS, VERSION

log = logging.getLogger(__name__)

PENDING_TABLE = "_cdc_aggregate_pending"
PROGRESS_TABLE = "_cdc_aggregate_progress"
LATE_TABLE = "_cdc_aggregate_late"
_PENDING_META = (VERSION, IS_DELETED)  # the pending table's bookkeeping columns
# Keys and windows per statement: keeps every statement well under ClickHouse's max_query_size (256 KiB).
CHUNK = 2000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FUNCTIONS = {"count": "count", "sum": "sum", "avg": "avg", "min": "min", "max": "max", "approx_count_distinct": "uniq"}


class AggregateError(ValueError):
    """An aggregate cannot be computed as configured (e.g. a column the replica does not have)."""


# --- window math ---------------------------------------------------------------------------------------------


def to_micros(value: datetime | date) -> int:
    """Epoch microseconds of a replica value (naive datetimes are UTC, as the replicas store them)."""
    if isinstance(value, datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        delta = aware - _EPOCH
    else:
        delta = datetime(value.year, value.month, value.day, tzinfo=UTC) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


def window_starts(event_us: int, size_us: int, slide_us: int) -> list[int]:
    """Starts (epoch µs) of the windows holding an event at `event_us`: every multiple of `slide_us` in
    (event - size, event], newest first. Tumbling windows are slide == size (one window)."""
    last = (event_us // slide_us) * slide_us  # floor, also before 1970
    return [last - k * slide_us for k in range(size_us // slide_us)]


def is_closed(window_start_us: int, size_us: int, watermark_us: int | None) -> bool:
    """A window is closed once its end is at or before the watermark."""
    return watermark_us is not None and window_start_us + size_us <= watermark_us


# --- SQL -----------------------------------------------------------------------------------------------------


def _q(name: str) -> str:
    return quote_identifier(name)


def event_micros_sql(column: str) -> str:
    return f"toUnixTimestamp64Micro(toDateTime64({_q(column)}, 6, 'UTC'))"


def measure_sql(measure: MeasureConfig) -> str:
    argument = _q(measure.column) if measure.column else ""
    return f"{_FUNCTIONS[measure.function]}({argument}) AS {_q(measure.name)}"


def results_sql(aggregate: AggregateConfig, replica: str, windows: Sequence[int] | None = None) -> str:
    """SELECT window_start, window_end, group..., measure... over the live rows of `replica` (qualified),
    for the windows starting at `windows` (epoch µs), or for every window when None."""
    size, slide = aggregate.window.size_us, aggregate.window.slide_us
    groups = [_q(g) for g in aggregate.group_by]
    conditions = [LIVE_ROWS, f"{_q(aggregate.event_time)} IS NOT NULL"]
    if aggregate.filter:
        conditions.append(f"({aggregate.filter})")
    wanted = ""
    if windows is not None:
        listed = ", ".join(str(int(w)) for w in sorted(set(windows)))
        low, high = min(windows), max(windows) + size
        conditions.append(f"{event_micros_sql(aggregate.event_time)} >= {low}")
        conditions.append(f"{event_micros_sql(aggregate.event_time)} < {high}")
        wanted = f"WHERE __cdc_ws IN ({listed})"
    shift = f" - arrayJoin(range(0, {size // slide})) * {slide}" if size != slide else ""
    return (
        f"SELECT fromUnixTimestamp64Micro(__cdc_ws, 'UTC') AS window_start, "
        f"fromUnixTimestamp64Micro(__cdc_ws + {size}, 'UTC') AS window_end"
        + "".join(f", {g}" for g in groups)
        + "".join(f", {measure_sql(m)}" for m in aggregate.measures)
        + f" FROM (SELECT *, (intDiv(__cdc_et, {slide}) - (modulo(__cdc_et, {slide}) < 0)) * {slide}{shift} AS __cdc_ws"
        + f" FROM (SELECT *, {event_micros_sql(aggregate.event_time)} AS __cdc_et FROM {replica} FINAL"
        + f" WHERE {' AND '.join(conditions)})) {wanted}"
        + " GROUP BY __cdc_ws"
        + "".join(f", {g}" for g in groups)
    )


def create_sql(aggregate: AggregateConfig, database: str, replica: str) -> str:
    order = ", ".join(["window_start", *(_q(g) for g in aggregate.group_by)])
    return (
        f"CREATE TABLE IF NOT EXISTS {_q(database)}.{_q(aggregate.sink_table)} "
        f"ENGINE = {CLICKHOUSE_ENGINE} ORDER BY ({order}) SETTINGS allow_nullable_key = 1 "
        f"EMPTY AS SELECT *, toUInt64(0) AS {VERSION}, toUInt8(0) AS {IS_DELETED} "
        f"FROM ({results_sql(aggregate, replica)})"
    )


def recompute_sql(aggregate: AggregateConfig, database: str, replica: str, windows: Sequence[int] | None) -> str:
    """One INSERT that makes the aggregate table's windows `windows` (None: all) equal to the replica:
    tombstones for their live rows at version 2v, the fresh rows at 2v + 1 (v: ClickHouse's clock in ns)."""
    table = f"{_q(database)}.{_q(aggregate.sink_table)}"
    where = LIVE_ROWS
    if windows is not None:
        where += (
            f" AND toUnixTimestamp64Micro(window_start) IN ({', '.join(str(int(w)) for w in sorted(set(windows)))})"
        )
    return (
        f"INSERT INTO {table} WITH toUInt64(toUnixTimestamp64Nano(now64(9))) * 2 AS __cdc_v "
        f"SELECT * EXCEPT ({VERSION}, {IS_DELETED}), __cdc_v, {DELETED} FROM {table} FINAL WHERE {where} "
        f"UNION ALL SELECT *, __cdc_v + 1, {LIVE} FROM ({results_sql(aggregate, replica, windows)})"
    )


def support_tables_sql(database: str) -> list[str]:
    db = _q(database)
    return [
        f"CREATE TABLE IF NOT EXISTS {db}.{PENDING_TABLE} (aggregate String, window_start Int64, {VERSION} UInt64, "
        f"{IS_DELETED} UInt8) ENGINE = {CLICKHOUSE_ENGINE} ORDER BY (aggregate, window_start)",
        f"CREATE TABLE IF NOT EXISTS {db}.{PROGRESS_TABLE} (aggregate String, recorded_at DateTime64(3, 'UTC'), "
        "max_event_time Nullable(DateTime64(6, 'UTC')), watermark Nullable(DateTime64(6, 'UTC')), changes Int64, "
        "windows Int64, late_changes Int64) ENGINE = MergeTree ORDER BY (aggregate, recorded_at) "
        "TTL toDateTime(recorded_at) + INTERVAL 30 DAY",
        f"CREATE TABLE IF NOT EXISTS {db}.{LATE_TABLE} (aggregate String, window_start DateTime64(6, 'UTC'), "
        "window_end DateTime64(6, 'UTC'), row_key String, row_version UInt128, position String, "
        "event_time DateTime64(6, 'UTC'), watermark DateTime64(6, 'UTC'), lateness_s Float64, "
        "recorded_at DateTime64(3, 'UTC')) ENGINE = ReplacingMergeTree "
        "ORDER BY (aggregate, window_start, row_key, row_version, position)",
    ]


def replica_columns(client: Client, database: str, table: str) -> dict[str, str]:
    rows = client.query(
        "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = {t:String}",
        parameters={"db": database, "t": table},
    ).result_rows
    return {r[0]: r[1] for r in rows}


def ensure_aggregate_table(client: Client, pipeline: PipelineConfig, database: str, aggregate: AggregateConfig) -> bool:
    """Create the aggregate's table from its replica's column types; False when the replica does not
    exist yet. AggregateError names the aggregate when a column it reads is not in the replica."""
    table = pipeline.table(aggregate.table)
    replica_name = pipeline.sink_table(table)
    columns = replica_columns(client, database, replica_name)
    if not columns:
        return False
    missing = [c for c in aggregate.columns() if c not in columns]
    if missing:
        raise AggregateError(
            f"aggregate {aggregate.name} (pipeline.yaml aggregates): column(s) {missing} are not in the replica "
            f"{database}.{replica_name} of {aggregate.table}, whose columns are {sorted(columns)}; fix the aggregate's "
            "event_time/group_by/measures and restart the stream"
        )
    replica = f"{_q(database)}.{_q(replica_name)}"
    try:
        client.command(create_sql(aggregate, database, replica))
    except Exception as exc:
        if getattr(exc, "code", None) in (43, 47, 62, 215):  # type, identifier, syntax, not-aggregated errors
            raise AggregateError(
                f"aggregate {aggregate.name} (pipeline.yaml aggregates): ClickHouse cannot compute it over "
                f"{database}.{replica_name}: {str(exc).splitlines()[0][:400]} (check its filter and measures)"
            ) from None
        raise
    return True


def recompute(
    client: Client,
    pipeline: PipelineConfig,
    database: str,
    aggregate: AggregateConfig,
    windows: Iterable[int] | None = None,
) -> int:
    """Make the aggregate table's windows (None: all) equal to the replica; returns how many windows."""
    if not ensure_aggregate_table(client, pipeline, database, aggregate):
        return 0
    replica = f"{_q(database)}.{_q(pipeline.sink_table(pipeline.table(aggregate.table)))}"
    if windows is None:
        client.command(recompute_sql(aggregate, database, replica, None))
        return -1
    ordered = sorted(set(windows))
    for i in range(0, len(ordered), CHUNK):
        client.command(recompute_sql(aggregate, database, replica, ordered[i : i + CHUNK]))
    return len(ordered)


# --- the stream's hooks --------------------------------------------------------------------------------------


@dataclass
class _Touched:
    keys: list[tuple[Any, ...]] = field(default_factory=list)
    old: dict[str, set[int]] = field(default_factory=dict)  # aggregate -> windows the rows were in before
    late: list[list[Any]] = field(default_factory=list)


class StreamAggregates:
    """Keeps the pipeline's aggregate tables equal to their replicas, batch by batch (see module doc).

    `retrying(action, what)` runs a ClickHouse action with the batch writer's retry policy."""

    def __init__(
        self,
        pipeline: PipelineConfig,
        database: str,
        client: Client,
        retrying: Callable[[Callable[[], Any], str], Any] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.database = database
        self.client = client
        self.retrying = retrying or (lambda action, what: action())
        self.by_table: dict[str, list[AggregateConfig]] = {}
        for aggregate in pipeline.aggregates:
            replica = pipeline.sink_table(pipeline.table(aggregate.table))
            self.by_table.setdefault(replica, []).append(aggregate)
        self._touched: dict[str, _Touched] = {}
        self._ready = False
        self._watermarks: dict[str, int | None] = {}  # aggregate -> max event time seen (µs)
        self._version = 0

    def covers(self, table: Any) -> bool:
        """Whether any aggregate reads `table` (its writes then need the rows' keys: see before_write)."""
        return bool(self._aggregates(table))

    def _aggregates(self, table: Any) -> list[AggregateConfig]:
        return self.by_table.get(table.name, []) if table.database == self.database else []

    def _next_version(self) -> int:
        self._version = max(time.time_ns(), self._version + 1)
        return self._version

    def _db(self, name: str) -> str:
        return f"{_q(self.database)}.{name}"

    # Once per writer: support tables, the watermarks, and windows a crashed writer left pending.
    def _start(self) -> None:
        if self._ready:
            return
        for statement in support_tables_sql(self.database):
            self.client.command(statement)
        rows = self.client.query(
            f"SELECT aggregate, toUnixTimestamp64Micro(max(max_event_time)) FROM {self._db(PROGRESS_TABLE)} "
            "GROUP BY aggregate"
        ).result_rows
        self._watermarks = {name: micros for name, micros in rows}
        for aggregate in self.pipeline.aggregates:
            # A new aggregate (or one whose table was dropped to change its definition) over an existing
            # replica: every window is computed once from the replica; the stream keeps it current from then on.
            exists = command_int(self.client, f"EXISTS TABLE {self._db(_q(aggregate.sink_table))}")
            if not exists and recompute(self.client, self.pipeline, self.database, aggregate):
                log.info("aggregate %s: built from the replica of %s", aggregate.name, aggregate.table)
        pending = self.client.query(
            f"SELECT aggregate, window_start FROM {self._db(PENDING_TABLE)} FINAL WHERE {LIVE_ROWS}"
        ).result_rows
        by_name = {a.name: a for a in self.pipeline.aggregates}
        windows: dict[str, set[int]] = {}
        for name, start in pending:
            windows.setdefault(name, set()).add(int(start))
        for name, starts in windows.items():
            if name in by_name:
                log.warning("aggregate %s: recomputing %s window(s) a previous writer left pending", name, len(starts))
                recompute(self.client, self.pipeline, self.database, by_name[name], starts)
            self._clear_pending(name, starts)
        self._ready = True

    def _recover(self) -> None:
        """At the writer's first batch (of any table): recompute what a crashed writer left pending."""
        if self.by_table and not self._ready:
            self.retrying(self._start, "recovering the aggregates' pending windows")

    def _clear_pending(self, name: str, windows: Iterable[int]) -> None:
        version = self._next_version()
        rows = [[name, w, version, DELETED] for w in windows]
        if rows:
            self.client.insert(
                self._db(PENDING_TABLE), rows, column_names=["aggregate", "window_start", *_PENDING_META]
            )

    def _watermark(self, aggregate: AggregateConfig) -> int | None:
        seen = self._watermarks.get(aggregate.name)
        return None if seen is None else seen - duration_us(aggregate.watermark_delay)

    def _rows(
        self, table: Any, keys: Sequence[tuple[Any, ...]], aggregates: list[AggregateConfig]
    ) -> list[tuple[Any, ...]]:
        """(key, version, {event_time column: µs}) of the live replica rows with these keys."""
        columns = list(dict.fromkeys(a.event_time for a in aggregates))
        key_columns = list(table.key_columns)
        key_expr = f"({', '.join(_q(k) for k in key_columns)})" if len(key_columns) > 1 else _q(key_columns[0])
        selected = ", ".join([*(_q(k) for k in key_columns), VERSION, *(event_micros_sql(c) for c in columns)])
        found: list[tuple[Any, ...]] = []
        for i in range(0, len(keys), CHUNK):
            wanted = ", ".join(
                str(format_query_value(tuple(k) if len(key_columns) > 1 else k[0])) for k in keys[i : i + CHUNK]
            )
            result = self.client.query(
                f"SELECT {selected} FROM {table.qualified} FINAL WHERE {key_expr} IN ({wanted}) AND {LIVE_ROWS}",
                query_tz="UTC",
            )
            width = len(key_columns)
            for row in result.result_rows:
                found.append((row[:width], row[width], dict(zip(columns, row[width + 1 :], strict=True))))
        return found

    def _late(
        self, aggregate: AggregateConfig, rows: list[tuple[Any, ...]], position: str, now: datetime
    ) -> tuple[set[int], list[list[Any]]]:
        """The windows of `rows` for `aggregate`, and a late record per (row, closed window)."""
        watermark = self._watermark(aggregate)
        size, slide = aggregate.window.size_us, aggregate.window.slide_us
        windows: set[int] = set()
        late: list[list[Any]] = []
        for key, row_version, times in rows:
            event = times.get(aggregate.event_time)
            if event is None:
                continue
            for start in window_starts(int(event), size, slide):
                windows.add(start)
                if watermark is not None and is_closed(start, size, watermark):
                    late.append(
                        [
                            aggregate.name, from_micros(start), from_micros(start + size),
                            json.dumps([_plain(v) for v in key], default=str), int(row_version), position,
                            from_micros(int(event)), from_micros(watermark), (watermark - start - size) / 1e6, now,
                        ]
                    )  # fmt: skip
        return windows, late

    def before_truncate(self, table: Any) -> None:
        """Before a truncate of `table`'s replica: every window of its aggregates is touched."""
        self._recover()
        aggregates = self._aggregates(table)
        if not aggregates:
            return
        self.retrying(lambda: self._before_truncate(table, aggregates), f"aggregates of {table.qualified}")

    def _before_truncate(self, table: Any, aggregates: list[AggregateConfig]) -> None:
        self._start()
        touched = self._touched.setdefault(table.qualified, _Touched())
        for aggregate in aggregates:
            if not ensure_aggregate_table(self.client, self.pipeline, self.database, aggregate):
                continue
            rows = self.client.query(
                f"SELECT DISTINCT toUnixTimestamp64Micro(window_start) FROM {self._db(_q(aggregate.sink_table))} "
                f"FINAL WHERE {LIVE_ROWS}"
            ).result_rows
            touched.old.setdefault(aggregate.name, set()).update(int(r[0]) for r in rows)
        self._log_pending(touched)

    def before_write(self, table: Any, keys: Sequence[Sequence[Any]]) -> None:
        """Before the batch's rows of `table` are written: remember their keys and the windows they are in now."""
        self._recover()
        aggregates = self._aggregates(table)
        if not aggregates or not keys:
            return
        self.retrying(
            lambda: self._before_write(table, [tuple(k) for k in keys], aggregates), f"aggregates of {table.qualified}"
        )

    def _before_write(self, table: Any, keys: list[tuple[Any, ...]], aggregates: list[AggregateConfig]) -> None:
        self._start()
        touched = self._touched.setdefault(table.qualified, _Touched())
        touched.keys = list(dict.fromkeys([*touched.keys, *keys]))
        rows = self._rows(table, keys, aggregates)
        now = datetime.now(UTC)
        for aggregate in aggregates:
            windows, late = self._late(aggregate, rows, "before", now)
            touched.old.setdefault(aggregate.name, set()).update(windows)
            touched.late += late
        self._log_pending(touched)

    def _log_pending(self, touched: _Touched) -> None:
        version = self._next_version()
        rows = [[name, w, version, LIVE] for name, windows in touched.old.items() for w in windows]
        for i in range(0, len(rows), 50_000):
            self.client.insert(
                self._db(PENDING_TABLE),
                rows[i : i + 50_000],
                column_names=["aggregate", "window_start", *_PENDING_META],
            )

    def after_write(self, table: Any) -> None:
        """After the batch's rows of `table` are written: recompute every window they were or are in."""
        touched = self._touched.get(table.qualified)
        if touched is None:
            return
        self.retrying(lambda: self._after_write(table, touched), f"aggregates of {table.qualified}")
        self._touched.pop(table.qualified, None)

    def _after_write(self, table: Any, touched: _Touched) -> None:
        aggregates = self._aggregates(table)
        rows = self._rows(table, touched.keys, aggregates) if touched.keys else []
        now = datetime.now(UTC)
        late = list(touched.late)
        progress: list[list[Any]] = []
        for aggregate in aggregates:
            windows, new_late = self._late(aggregate, rows, "after", now)
            late += new_late
            windows |= touched.old.get(aggregate.name, set())
            if not windows:
                continue
            recompute(self.client, self.pipeline, self.database, aggregate, windows)
            seen = [t[aggregate.event_time] for _, _, t in rows if t.get(aggregate.event_time) is not None]
            if seen and (self._watermarks.get(aggregate.name) is None or max(seen) > self._watermarks[aggregate.name]):
                self._watermarks[aggregate.name] = int(max(seen))
            newest = self._watermarks.get(aggregate.name)
            watermark = self._watermark(aggregate)
            progress.append(
                [
                    aggregate.name, now, None if newest is None else from_micros(newest),
                    None if watermark is None else from_micros(watermark), len(touched.keys), len(windows),
                    sum(1 for r in late if r[0] == aggregate.name),
                ]
            )  # fmt: skip
        if late:
            self.client.insert(
                self._db(LATE_TABLE),
                late,
                column_names=[
                    "aggregate", "window_start", "window_end", "row_key", "row_version", "position", "event_time",
                    "watermark", "lateness_s", "recorded_at",
                ],
            )  # fmt: skip
        if progress:
            self.client.insert(
                self._db(PROGRESS_TABLE),
                progress,
                column_names=[
                    "aggregate",
                    "recorded_at",
                    "max_event_time",
                    "watermark",
                    "changes",
                    "windows",
                    "late_changes",
                ],
            )
        for name, windows in touched.old.items():
            self._clear_pending(name, windows)


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


# --- verification (the asset check, the tests) ---------------------------------------------------------------


@dataclass
class Comparison:
    """An aggregate table against a recomputation from its replica."""

    aggregate: str
    compared_rows: int = 0
    watermark: datetime | None = None
    missing: list[str] = field(default_factory=list)  # in the recomputation, not in the table
    extra: list[str] = field(default_factory=list)  # in the table, not in the recomputation
    different: list[str] = field(default_factory=list)
    replica_exists: bool = True

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.different)

    def summary(self) -> str:
        if self.ok:
            return f"{self.compared_rows} (window, group) rows equal a recomputation from the replica"
        return (
            f"{len(self.missing)} missing, {len(self.extra)} extra, {len(self.different)} different of "
            f"{self.compared_rows} (window, group) rows; e.g. "
            + "; ".join([*self.missing[:3], *self.extra[:3], *self.different[:3]])
        )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return a is b
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)), abs(float(b)))
    return a == b


def watermark_of(client: Client, database: str, aggregate: AggregateConfig) -> datetime | None:
    """The aggregate's watermark as the stream last recorded it (None before its first change)."""
    if not command_int(client, f"EXISTS TABLE {_q(database)}.{PROGRESS_TABLE}"):
        return None
    micros = client.query(
        f"SELECT toUnixTimestamp64Micro(max(max_event_time)) FROM {_q(database)}.{PROGRESS_TABLE} "
        "WHERE aggregate = {a:String}",
        parameters={"a": aggregate.name},
    ).result_rows[0][0]
    return None if micros is None else from_micros(int(micros) - duration_us(aggregate.watermark_delay))


def compare(
    client: Client, pipeline: PipelineConfig, database: str, aggregate: AggregateConfig, closed_only: bool = True
) -> Comparison:
    """Recompute the aggregate from the replica with SQL and compare it with its table, (window, group) by
    (window, group): the closed windows only (end at or before the watermark), or every window."""
    result = Comparison(aggregate.name)
    replica_name = pipeline.sink_table(pipeline.table(aggregate.table))
    if not replica_columns(client, database, replica_name):
        result.replica_exists = False
        return result
    ensure_aggregate_table(client, pipeline, database, aggregate)
    replica = f"{_q(database)}.{_q(replica_name)}"
    names = ["window_start", "window_end", *aggregate.group_by, *(m.name for m in aggregate.measures)]
    where = ""
    if closed_only:
        result.watermark = watermark_of(client, database, aggregate)
        if result.watermark is None:
            return result
        where = f"WHERE window_end <= toDateTime64('{result.watermark.strftime('%Y-%m-%d %H:%M:%S.%f')}', 6, 'UTC')"
    selected = ", ".join(_q(n) for n in names)
    fresh = client.query(f"SELECT {selected} FROM ({results_sql(aggregate, replica)}) {where}", query_tz="UTC")
    stored = client.query(
        f"SELECT {selected} FROM {_q(database)}.{_q(aggregate.sink_table)} FINAL "
        + (f"{where} AND {LIVE_ROWS}" if where else f"WHERE {LIVE_ROWS}"),
        query_tz="UTC",
    )
    width = 2 + len(aggregate.group_by)

    def keyed(rows: Sequence[Sequence[Any]]) -> dict[tuple[Any, ...], tuple[Any, ...]]:
        return {tuple(row[:width]): tuple(row[width:]) for row in rows}

    expected, actual = keyed(fresh.result_rows), keyed(stored.result_rows)
    result.compared_rows = len(expected.keys() | actual.keys())
    for key in sorted(expected.keys() - actual.keys(), key=str):
        result.missing.append(f"missing {key}")
    for key in sorted(actual.keys() - expected.keys(), key=str):
        result.extra.append(f"extra {key}")
    for key in sorted(expected.keys() & actual.keys(), key=str):
        if not all(_same(a, b) for a, b in zip(expected[key], actual[key], strict=True)):
            result.different.append(f"{key}: table {actual[key]} != replica {expected[key]}")
    return result

"""The PostgreSQL side of the control plane: pre-flight checks before the connector is provisioned,
table observations, and Debezium signals (incremental snapshots for backfills)."""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from cdc_pipeline.config import PipelineConfig, TableConfig, display_name
from cdc_pipeline.connector import CASE_SENSITIVE, regex_literal
from cdc_pipeline.control.rules import SlotObservation


def _row(cursor: psycopg.Cursor[tuple[Any, ...]]) -> tuple[Any, ...]:
    """The row a query always returns (SHOW, an aggregate, a function call)."""
    row = cursor.fetchone()
    if row is None:
        raise RuntimeError("the query returned no row")
    return row


def _first(row: tuple[Any, ...] | None) -> Any:
    if row is None:
        raise RuntimeError("the query returned no row")
    return row[0]


@dataclass(frozen=True)
class SourceCheck:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        fix = "" if self.ok else f" (fix: {self.fix})"
        return f"{'ok' if self.ok else 'FAILED'} {self.name}: {self.detail}{fix}"


@dataclass(frozen=True)
class _Index:
    name: str
    columns: list[str]  # empty when the index has an expression column
    primary: bool
    unique: bool  # unique, valid, not partial, no expression: it proves its columns identify a row
    replica_identity: bool


def _table_facts(conn: psycopg.Connection, table: TableConfig) -> tuple[str, dict[str, bool], list[_Index]] | None:
    """(relreplident, {column: NOT NULL}, indexes) of `table`, or None if it does not exist."""
    row = conn.execute(
        "SELECT c.oid, c.relreplident FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
        (table.schema_name, table.table_name),
    ).fetchone()
    if row is None:
        return None
    oid, identity = row
    columns: dict[str, bool] = dict(
        conn.execute(
            "SELECT attname, attnotnull FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped",
            (oid,),
        ).fetchall()
    )
    indexes = [
        _Index(name, [] if has_expression else list(cols), primary, unique and not has_expression, replident)
        for name, cols, has_expression, primary, unique, replident in conn.execute(
            "SELECT x.relname, ARRAY(SELECT a.attname FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, n) "
            "  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.n), "
            "0 = ANY(i.indkey::int2[]), i.indisprimary, "
            "i.indisunique AND i.indisvalid AND i.indpred IS NULL, i.indisreplident "
            "FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid WHERE i.indrelid = %s ORDER BY x.relname",
            (oid,),
        ).fetchall()
    ]
    return identity, columns, indexes


def _key_checks(conn: psycopg.Connection, pipeline: PipelineConfig, table: TableConfig) -> list[SourceCheck]:
    """Whether `table` can be replicated exactly under its key (the `primary_key` override, else its
    primary key): the key exists, identifies a row, and PostgreSQL's old-row image of an UPDATE or
    DELETE (its replica identity) carries every key column, so that Debezium keys a delete, and an
    update that changes the key, by the row's old key."""
    name = sql.Identifier(table.schema_name, table.table_name).as_string(conn)
    facts = _table_facts(conn, table)
    if facts is None:
        return [
            SourceCheck(f"table {table.name}", False, "does not exist", f"create {name} or drop it from pipeline.yaml")
        ]
    identity, columns, indexes = facts
    index = pipeline.tables.index(table)
    primary = next((i.columns for i in indexes if i.primary), [])
    key = list(table.primary_key or primary)
    listed = ", ".join(sql.Identifier(c).as_string(conn) for c in key)
    if not key:
        return [
            SourceCheck(
                f"primary key {table.name}", False, "the table has no primary key: its changes would have no key",
                f"ALTER TABLE {name} ADD PRIMARY KEY (<columns>); or set tables[{index}].primary_key in pipeline.yaml "
                f"to columns that identify a row, CREATE UNIQUE INDEX on them and run ALTER TABLE {name} REPLICA "
                "IDENTITY FULL",
            )
        ]  # fmt: skip
    missing = [c for c in key if c not in columns]
    if missing:
        return [
            SourceCheck(
                f"primary key {table.name}", False, f"key column(s) {missing} do not exist",
                f"fix tables[{index}].primary_key in pipeline.yaml",
            )
        ]  # fmt: skip
    checks = []
    # A key identifies a row when a unique index over some of its columns, all NOT NULL, exists.
    unique = any(
        i.unique and i.columns and set(i.columns) <= set(key) and all(columns[c] for c in i.columns) for i in indexes
    )
    checks.append(
        SourceCheck(
            f"unique key {table.name}", unique,
            f"key ({', '.join(key)}) is {'' if unique else 'not '}backed by a unique index over NOT NULL columns",
            f"CREATE UNIQUE INDEX ON {name} ({listed}) and ALTER TABLE {name} ALTER COLUMN ... SET NOT NULL for "
            "nullable key columns: rows sharing a key value would collapse into one replica row",
        )
    )  # fmt: skip
    image = {
        "d": primary,
        "f": list(columns),
        "i": next((i.columns for i in indexes if i.replica_identity), []),
        "n": [],
    }.get(identity, [])
    kind = {"d": "DEFAULT", "f": "FULL", "i": "USING INDEX", "n": "NOTHING"}.get(identity, identity)
    lacking = [c for c in key if c not in image]
    if not lacking:
        detail = f"REPLICA IDENTITY {kind}: the old row of an update or delete carries the key ({', '.join(key)})"
    elif identity == "d" and not primary:
        detail = f"REPLICA IDENTITY {kind} without a primary key: updates and deletes carry no old row at all"
    else:
        detail = (
            f"REPLICA IDENTITY {kind}: the old row of an update or delete lacks key column(s) {lacking}, so a delete, "
            "or an update of these columns, would leave the old row live in the replica"
        )
    matching = next((i.name for i in indexes if i.unique and set(i.columns) == set(key)), None)
    by_index = (
        f"ALTER TABLE {name} REPLICA IDENTITY USING INDEX {sql.Identifier(matching).as_string(conn)}"
        if matching and all(columns[c] for c in key)
        else None
    )
    fix = f"ALTER TABLE {name} REPLICA IDENTITY FULL" + (f" (or {by_index})" if by_index else "")
    checks.append(SourceCheck(f"replica identity {table.name}", not lacking, detail, fix))
    return checks


def tables_lacking_identity(conn: psycopg.Connection, pipeline: PipelineConfig) -> list[TableConfig]:
    """Captured tables whose key is fine but whose replica identity does not carry it: exactly those
    that `REPLICA IDENTITY FULL` makes replicable."""
    lacking = []
    for table in pipeline.tables:
        failed = [check.name for check in _key_checks(conn, pipeline, table) if not check.ok]
        if failed == [f"replica identity {table.name}"]:
            lacking.append(table)
    return lacking


def set_full_identity(conn: psycopg.Connection, pipeline: PipelineConfig) -> list[str]:
    """With `source.set_replica_identity`, give every table that needs it REPLICA IDENTITY FULL;
    returns what was done. A role that does not own a table gets an error naming the statement."""
    if not pipeline.source.set_replica_identity:
        return []
    done = []
    for table in tables_lacking_identity(conn, pipeline):
        statement = sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(
            sql.Identifier(table.schema_name, table.table_name)
        )
        try:
            conn.execute(statement)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise PermissionError(
                f"source.set_replica_identity: {conn.info.user} may not alter {table.name} "
                f"({exc.diag.message_primary}): run {statement.as_string(conn)} as the table's owner"
            ) from None
        done.append(f"set REPLICA IDENTITY FULL on {table.name} (its key {table.primary_key} was not in the old row)")
    return done


def check_source(conn: psycopg.Connection, pipeline: PipelineConfig) -> list[SourceCheck]:
    """Everything the connector needs from PostgreSQL, each with the fix when it is missing."""
    checks: list[SourceCheck] = []
    wal_level = _first(conn.execute("SHOW wal_level").fetchone())
    checks.append(
        SourceCheck(
            "wal_level", wal_level == "logical", f"wal_level = {wal_level}",
            "set wal_level = logical in postgresql.conf and restart PostgreSQL",
        )
    )  # fmt: skip
    role = _row(
        conn.execute("SELECT rolreplication OR rolsuper, current_user FROM pg_roles WHERE rolname = current_user")
    )
    checks.append(
        SourceCheck(
            "replication privilege", bool(role[0]), f"role {role[1]} {'has' if role[0] else 'lacks'} REPLICATION",
            f"ALTER ROLE {role[1]} REPLICATION",
        )
    )  # fmt: skip
    slots = _first(conn.execute("SHOW max_replication_slots").fetchone())
    slot = conn.execute(
        "SELECT plugin, active, database, wal_status FROM pg_replication_slots WHERE slot_name = %s",
        (pipeline.slot_name,),
    ).fetchone()
    if slot is None:
        used = _first(conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone())
        free = int(slots) - used
        checks.append(
            SourceCheck(
                "replication slot", free > 0, f"{pipeline.slot_name} will be created ({free} of {slots} slots free)",
                "raise max_replication_slots or drop an unused slot",
            )
        )  # fmt: skip
    else:
        plugin, active, database, wal_status = slot
        good = plugin == "pgoutput" and wal_status != "lost" and database == conn.info.dbname
        checks.append(
            SourceCheck(
                "replication slot", good,
                f"{pipeline.slot_name}: plugin {plugin}, database {database}, {'active' if active else 'inactive'}, "
                f"WAL {wal_status}",
                f"drop the slot (SELECT pg_drop_replication_slot('{pipeline.slot_name}')) and re-provision: "
                "a lost slot or another plugin cannot be resumed; the initial snapshot runs again",
            )
        )  # fmt: skip
    publication = conn.execute(
        "SELECT pubinsert AND pubupdate AND pubdelete AND pubtruncate FROM pg_publication WHERE pubname = %s",
        (pipeline.publication_name,),
    ).fetchone()
    if publication is None:
        detail, ok = f"{pipeline.publication_name} will be created by the connector (filtered)", True
    else:
        detail, ok = f"{pipeline.publication_name} exists, publishes every operation: {publication[0]}", publication[0]
    checks.append(
        SourceCheck(
            "publication", ok, detail,
            f"ALTER PUBLICATION {pipeline.publication_name} SET (publish = 'insert, update, delete, truncate')",
        )
    )  # fmt: skip
    for table in pipeline.tables:
        checks += _key_checks(conn, pipeline, table)
    helpers = (("signal table", pipeline.signal_table_parts), ("heartbeat table", pipeline.heartbeat_table_parts))
    for label, parts in helpers:
        if parts is None:
            continue
        exists = conn.execute("SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = %s", parts).fetchone()
        checks.append(
            SourceCheck(
                label, exists is not None, f"{display_name(*parts)} {'exists' if exists else 'is missing'}",
                "run the provision job (it creates the table) or create it as in the README",
            )
        )  # fmt: skip
    return checks


def table_stats(conn: psycopg.Connection, table: TableConfig) -> dict[str, Any]:
    """Cheap observations of a source table: the planner's live-row estimate, write counters, size."""
    row = conn.execute(
        "SELECT n_live_tup, n_tup_ins, n_tup_upd, n_tup_del, pg_total_relation_size(relid) "
        "FROM pg_stat_user_tables WHERE schemaname = %s AND relname = %s",
        (table.schema_name, table.table_name),
    ).fetchone()
    if row is None:
        return {"exists": False}
    return {
        "exists": True, "estimated_rows": row[0], "inserted": row[1], "updated": row[2], "deleted": row[3],
        "total_bytes": row[4],
    }  # fmt: skip


def wal_position(conn: psycopg.Connection, pipeline: PipelineConfig) -> dict[str, Any]:
    """The server's current WAL position, and how far the pipeline's slot trails it."""
    current = _first(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone())
    slot = conn.execute(
        "SELECT confirmed_flush_lsn::text, pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint "
        "FROM pg_replication_slots WHERE slot_name = %s",
        (pipeline.slot_name,),
    ).fetchone()
    return {
        "current_wal_lsn": current,
        "slot_confirmed_flush_lsn": slot[0] if slot else None,
        "slot_retained_wal_bytes": slot[1] if slot else None,
    }


def slot_observation(conn: psycopg.Connection, pipeline: PipelineConfig) -> SlotObservation:
    """The pipeline's replication slot as the retention rule sees it (`exists` False: no such slot)."""
    row = conn.execute(
        "SELECT active, confirmed_flush_lsn::text, "
        "pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint "
        "FROM pg_replication_slots WHERE slot_name = %s",
        (pipeline.slot_name,),
    ).fetchone()
    if row is None:
        return SlotObservation(pipeline.slot_name, exists=False)
    return SlotObservation(
        pipeline.slot_name, exists=True, active=bool(row[0]), confirmed_flush_lsn=row[1], retained_bytes=row[2]
    )


def exact_count(conn: psycopg.Connection, table: TableConfig, condition: str | None = None) -> int:
    query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table.schema_name, table.table_name))
    if condition:
        # An operator-supplied filter, like Debezium's own; checked by sqlcheck.validate_condition first.
        # A prepared statement (extended protocol) can never run a second statement.
        query += sql.SQL(" WHERE ({})").format(sql.SQL(condition))
    return int(_first(conn.execute(query, prepare=True).fetchone()))


def source_columns(conn: psycopg.Connection, table: TableConfig) -> list[str]:
    """The table's captured columns (after the pipeline's column filter), in table order."""
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
        "ORDER BY ordinal_position",
        (table.schema_name, table.table_name),
    ).fetchall()
    return [r[0] for r in rows if table.columns is None or table.columns.captures(r[0])]


def primary_key(conn: psycopg.Connection, table: TableConfig) -> list[str]:
    """The replica key of `table`: the configured override, else the source table's primary key."""
    if table.primary_key:
        return list(table.primary_key)
    rows = conn.execute(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        "WHERE i.indrelid = %s::regclass AND i.indisprimary ORDER BY array_position(i.indkey, a.attnum)",
        (sql.Identifier(table.schema_name, table.table_name).as_string(conn),),
    ).fetchall()
    return [r[0] for r in rows]


_NEEDS_DEBEZIUM_QUOTES = re.compile(r"[.\s\"'`]")
_REGEX_META = re.compile(r"[\\\[\](){}*+?|^$]")


class UnsupportedSnapshotName(ValueError):
    """Debezium's execute-snapshot signal cannot name this table."""


def snapshot_collection(table: TableConfig) -> tuple[str, str]:
    """How an execute-snapshot signal names `table`: the `data-collections` entry and the regex of its
    `additional-conditions`. Debezium matches each entry as a (case-sensitive) regex against its
    `schema.table` identifiers and parses what matched with its identifier parser; an entry matching
    nothing is parsed as it is. So a plain name is an exact regex, and a name with a dot, a space or a
    quote (which the parser would split or unquote) is given in double quotes, which match no identifier."""
    schema, name = table.schema_name, table.table_name
    if not (_NEEDS_DEBEZIUM_QUOTES.search(schema) or _NEEDS_DEBEZIUM_QUOTES.search(name)):
        exact = CASE_SENSITIVE + regex_literal(schema) + r"\." + regex_literal(name)
        return exact, exact
    if _REGEX_META.search(schema + name) or "''" in schema + name or "``" in schema + name:
        raise UnsupportedSnapshotName(
            f"Debezium's snapshot signal cannot name {table.name}: a name with a dot, a space or a quote is "
            "given in double quotes, which Debezium also compiles as a regex, so it cannot contain any of "
            "\\ [ ] ( ) { } * + ? | ^ $ (nor '' or ``); rename the table to backfill it"
        )
    quoted = ".".join('"' + part.replace('"', '""') + '"' for part in (schema, name))
    return quoted, CASE_SENSITIVE + regex_literal(quoted)


class SignalLock:
    """A PostgreSQL session advisory lock per pipeline around inserting a snapshot signal (released
    when its connection ends, also if the process dies). Debezium reports two signals it takes in at
    once under the newest id only, so whoever follows its own signal (the backfill job) holds the lock
    until Debezium acknowledged it; the stream's schema-change re-snapshots take it for a moment."""

    def __init__(self, conn: psycopg.Connection, pipeline: str) -> None:
        self.conn, self.key, self.held = conn, f"cdc-pipeline backfill {pipeline}", False

    def try_acquire(self) -> bool:
        query = "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))"
        self.held = bool(_first(self.conn.execute(query, (self.key,)).fetchone()))
        return self.held

    def wait(self, timeout: float, on_wait: Any = None, note_every: float = 30.0) -> bool:
        """Try for up to `timeout` seconds; `on_wait()` is called every `note_every` s while waiting."""
        deadline = time.monotonic() + timeout
        next_note = 0.0
        while not self.try_acquire():
            if time.monotonic() > deadline:
                return False
            if on_wait is not None and time.monotonic() > next_note:
                on_wait()
                next_note = time.monotonic() + note_every
            time.sleep(1)
        return True

    def release(self) -> None:
        if self.held:
            self.conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (self.key,))
            self.held = False


def request_incremental_snapshot(
    conn: psycopg.Connection,
    pipeline: PipelineConfig,
    table: TableConfig,
    condition: str | None = None,
    id_prefix: str = "backfill",
) -> str:
    """Ask Debezium for an incremental snapshot of `table` (optionally only rows matching the SQL
    `condition`) by inserting an `execute-snapshot` row into the signal table; returns the signal id
    (`<id_prefix>-<uuid>`). The snapshot runs in chunks interleaved with streaming, so nothing stops."""
    collection, pattern = snapshot_collection(table)
    data: dict[str, Any] = {"data-collections": [collection], "type": "incremental"}
    if condition:
        data["additional-conditions"] = [{"data-collection": pattern, "filter": condition}]
    signal_id = f"{id_prefix}-{uuid.uuid4()}"
    conn.execute(
        sql.SQL("INSERT INTO {} (id, type, data) VALUES (%s, 'execute-snapshot', %s)").format(
            sql.Identifier(*pipeline.signal_table_parts)
        ),
        (signal_id, json.dumps(data)),
    )
    return signal_id

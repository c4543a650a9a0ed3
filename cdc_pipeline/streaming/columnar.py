"""The column-wise conversion of a batch's row changes: the after images of one schema are parsed as one
newline-delimited JSON document by Arrow, with that schema's types, and each column is checked and
converted with Arrow compute. No Python runs per row but the one expression that builds each `_version`
(a UInt128) and what `to_pylist` does in C.

It gives exactly what the row path (`ChangeApplier._convert`, `types.value_converter`) gives, or leaves
the row to it: a row is converted here only when nothing about it needs a decision the row path makes.
Rows that go to the row path (and then apply, clamp or dead-letter exactly as before):
- any row of a schema with a column that has no column-wise conversion (arrays, bytea, time, temporal
  columns stored as text, and uuid unless ClickHouse is the only sink), a column name JSON would escape,
  or no key schema;
- every row of a schema group whose after or key images Arrow cannot parse with the schema's types (a
  string where a number belongs, an integer out of range, a fraction in an integer, an unknown or repeated
  field, invalid JSON);
- a row whose image lacks one of the schema's fields, holds NULL in a NOT NULL column, holds Debezium's
  unavailable-value placeholder (an unchanged TOASTed value), a decimal not in plain notation, a timestamp
  not in Debezium's ISO 8601 form, a uuid not in PostgreSQL's text form, or a date or timestamp outside
  ClickHouse's range (the column's out-of-range policy decides it).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from cdc_pipeline.streaming.envelope import version
from cdc_pipeline.streaming.types import _MAX_DAYS, _MAX_MICROS, _MIN_DAYS, _MIN_MICROS, ColumnSpec

# Debezium's `unavailable.value.placeholder` (its default): an unchanged TOASTed value.
UNAVAILABLE = "__debezium_unavailable_value"

# The JSON type Arrow parses each kind as (see types.COLUMNAR_KINDS).
_JSON_TYPES: dict[str, pa.DataType] = {
    "int16": pa.int16(), "int32": pa.int32(), "int64": pa.int64(), "bool": pa.bool_(), "float64": pa.float64(),
    "string": pa.string(), "numeric_text": pa.string(), "decimal": pa.string(), "zoned": pa.string(),
    "date": pa.int64(), "micros": pa.int64(), "millis": pa.int64(), "uuid": pa.string(),
}  # fmt: skip
# Kinds whose JSON values are strings: where the TOAST placeholder can be.
_TEXT_KINDS = frozenset({"string", "numeric_text", "decimal", "zoned", "uuid"})
# BigDecimal.toPlainString, as Debezium writes decimal.handling.mode=string.
_PLAIN_DECIMAL = r"^-?[0-9]+(\.[0-9]+)?$"
# Debezium's ZonedTimestamp: ISO 8601 with at most microseconds and a zone (Z or an offset).
_ZONED = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
# io.debezium.data.Uuid: PostgreSQL's text form (uuid.UUID also takes braces, a urn: prefix or no hyphens).
_UUID_TEXT = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
_MIN_MILLIS = -(-_MIN_MICROS // 1000)
_MAX_MILLIS = _MAX_MICROS // 1000
_TS_LIMIT_MS = 253_402_300_800_000  # apply._ts: a source timestamp outside [0, this) is the epoch
_UTC_MICROS = pa.timestamp("us", tz="UTC")
_PLAIN_NAME = re.compile(r'^[^"\\\x00-\x1f]+$')


class NotColumnar(Exception):
    """The rows cannot be converted column-wise as a whole: the row path converts them."""


@dataclass
class Block:
    """Rows of one (value schema, key schema) converted column-wise: `columns` hold the values of
    `names` and then of the META_COLUMNS (_version, _is_deleted, _source_ts), as the row path gives them;
    `rows` are the decoded changes (to redo them on the row path if ClickHouse refuses a value)."""

    value_schema_id: int
    names: tuple[str, ...]
    columns: list[list[Any]]
    rows: pa.Table
    latest_source_ts_ms: int | None

    def __len__(self) -> int:
        return self.rows.num_rows

    def values(self) -> list[tuple[Any, ...]]:
        return list(zip(*self.columns, strict=True))


def supports(specs: dict[str, ColumnSpec]) -> bool:
    """Whether a schema's columns all have a column-wise conversion (and plain names)."""
    return bool(specs) and all(spec.columnar is not None and _PLAIN_NAME.match(name) for name, spec in specs.items())


def convert(
    rows: pa.Table, value_specs: dict[str, ColumnSpec], key_specs: dict[str, ColumnSpec], *, native: bool = False
) -> tuple[Block | None, pa.Table]:
    """Convert `rows` (decoded row changes with ops c, r or u, of one value schema and one key schema,
    both `supports`-ed) column-wise: (the block, or None, and the rows left for the row path).

    With `native`, values take the form clickhouse-connect writes as it is: dates and timestamps are
    integers in the ClickHouse column's own unit (days since 1970, microseconds, and milliseconds for
    _source_ts) and UUIDs their text, the same bytes it writes for the row path's date, datetime and
    uuid.UUID objects, without making them. Without it (a sink that is not ClickHouse alone), they are
    date and aware UTC datetime objects, and a schema with a uuid column is left to the row path."""
    if not native and any(spec.columnar == "uuid" for spec in (*value_specs.values(), *key_specs.values())):
        return None, rows
    if rows.num_rows == 0:
        return None, rows
    try:
        after = _parse(rows.column("after_json"), value_specs)
        key = _parse(rows.column("key_json"), key_specs)
    except NotColumnar:
        return None, rows
    ops = rows.column("op")
    update = pc.equal(ops, "u")
    try:
        bad = pc.or_(
            _row_path(rows.column("after_json"), after, value_specs, update),
            _row_path(rows.column("key_json"), key, key_specs, None),
        )
    except NotColumnar:
        return None, rows
    if pc.all(bad).as_py():
        return None, rows
    good = pc.invert(bad)
    taken = rows.filter(good)
    after = after.filter(good)
    try:
        columns = [_values(after.column(name), spec, native) for name, spec in value_specs.items()]
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OverflowError, ValueError):
        return None, rows
    commit = taken.column("commit_lsn").to_pylist()
    change = taken.column("change_lsn").to_pylist()
    ts = taken.column("source_ts_ms").cast(pa.int64())
    in_range = pc.fill_null(pc.and_(pc.greater_equal(ts, 0), pc.less(ts, _TS_LIMIT_MS)), False)
    source_ts = pc.if_else(in_range, ts, 0)
    if not native:
        source_ts = source_ts.cast(pa.timestamp("ms", tz="UTC"))
    # BatchStats.saw_source_ts: a source timestamp counts when it is in (0, _TS_LIMIT_MS).
    latest = pc.max(pc.if_else(pc.and_(in_range, pc.greater(ts, 0)), ts, None)).as_py()
    columns += [
        [version(c, h) for c, h in zip(commit, change, strict=True)],
        [0] * taken.num_rows,
        source_ts.to_pylist(),
    ]
    block = Block(
        value_schema_id=rows.column("value_schema_id")[0].as_py(),
        names=tuple(value_specs),
        columns=columns,
        rows=taken,
        latest_source_ts_ms=latest,
    )
    return block, rows.filter(bad)


def _parse(texts: pa.ChunkedArray, specs: dict[str, ColumnSpec]) -> pa.Table:
    """Each JSON object of `texts` as a row with the specs' columns, typed; NotColumnar when Arrow cannot
    read every one of them with those types (the row path decides each row then)."""
    schema = pa.schema([(name, _JSON_TYPES[spec.columnar]) for name, spec in specs.items()])  # type: ignore[index]
    if texts.null_count:
        raise NotColumnar("an image is null")
    # One document, one line per image: each image must be one line that is not blank (an image Spark took
    # from a JSON string can hold any text: a newline would split it, an empty one would vanish). Then a
    # line with more than one object changes the row count, checked below, and one with none fails.
    if not pc.all(pc.starts_with(texts, "{")).as_py() or pc.any(pc.match_substring_regex(texts, "[\n\r]")).as_py():
        raise NotColumnar("an image is not one line holding an object")
    joined = pc.binary_join_element_wise(texts, "", "\n")
    document = b"".join(_text_bytes(chunk) for chunk in joined.chunks)
    try:
        table = pa_json.read_json(
            io.BytesIO(document),
            read_options=pa_json.ReadOptions(use_threads=False, block_size=max(1 << 20, len(document) + 1)),
            parse_options=pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error"),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise NotColumnar(str(exc)) from None
    if table.num_rows != len(texts):
        raise NotColumnar("the images are not one JSON object each")
    return table.combine_chunks()


def _text_bytes(chunk: pa.Array) -> bytes | memoryview:
    """The concatenated bytes of a string array without nulls (its data buffer between its offsets)."""
    if len(chunk) == 0:
        return b""
    width = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
    offsets = np.frombuffer(chunk.buffers()[1], dtype=width)
    return memoryview(chunk.buffers()[2])[int(offsets[chunk.offset]) : int(offsets[chunk.offset + len(chunk)])]


def _row_path(
    texts: pa.ChunkedArray, parsed: pa.Table, specs: dict[str, ColumnSpec], update: pa.ChunkedArray | None
) -> pa.Array:
    """Per row: whether the row path must decide it (see the module docstring)."""
    bad = pa.array(np.zeros(parsed.num_rows, dtype=bool))
    for name, spec in specs.items():
        column = parsed.column(name)
        # Arrow reads a missing field as null: the field's key must be in the text. Inside a JSON string a
        # quote is escaped, so `"name":` with a plain name (see supports) is only ever that field's key.
        checks = [pc.invert(pc.match_substring(texts, f'"{name}":'))]
        if not spec.optional:
            checks.append(pc.is_null(column))
        kind = spec.columnar
        if update is not None and kind in _TEXT_KINDS:
            checks.append(pc.and_(update, pc.equal(column, UNAVAILABLE)))
        if kind == "decimal":
            checks.append(pc.invert(pc.match_substring_regex(column, _PLAIN_DECIMAL)))
        elif kind == "zoned":
            usable = pc.fill_null(pc.match_substring_regex(column, _ZONED), False)
            # Outside ClickHouse's range once in UTC (read only where the form is Debezium's).
            try:
                micros = pc.cast(
                    pc.cast(pc.if_else(usable, column, pa.scalar(None, pa.string())), _UTC_MICROS), pa.int64()
                )
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise NotColumnar(f"column {name!r}: a timestamp Arrow cannot read") from None
            checks += [pc.invert(usable), _outside(micros, _MIN_MICROS, _MAX_MICROS)]
        elif kind == "uuid":
            checks.append(pc.invert(pc.match_substring_regex(column, _UUID_TEXT)))
        elif kind == "date":
            checks.append(_outside(column, _MIN_DAYS, _MAX_DAYS))
        elif kind == "micros":
            checks.append(_outside(column, _MIN_MICROS, _MAX_MICROS))
        elif kind == "millis":
            checks.append(_outside(column, _MIN_MILLIS, _MAX_MILLIS))
        for check in checks:
            # A null check result is a null value, which the optional column may hold: not a reason.
            bad = pc.or_(bad, pc.fill_null(check, False))
    return bad


def _outside(column: Any, low: int, high: int) -> pa.Array:
    return pc.or_(pc.less(column, low), pc.greater(column, high))


def _values(column: pa.ChunkedArray, spec: ColumnSpec, native: bool) -> list[Any]:
    """The column's values as the row path's converter gives them, or in clickhouse-connect's own form
    (`native`, see convert); the rows were checked by _row_path first."""
    kind = spec.columnar
    if kind == "numeric_text":
        return pc.if_else(pc.equal(column, "NAN"), "NaN", column).to_pylist()
    if kind == "decimal":
        precision, scale = _decimal(spec.clickhouse_type)
        target = pa.decimal128(precision, scale) if precision <= 38 else pa.decimal256(precision, scale)
        return pc.cast(column, target).to_pylist()
    if kind == "date":
        days = column.cast(pa.int32())
        return days.to_pylist() if native else days.cast(pa.date32()).to_pylist()
    if kind in ("micros", "millis", "zoned"):
        if kind == "zoned":
            micros = pc.cast(pc.cast(column, _UTC_MICROS), pa.int64())
        else:
            micros = column if kind == "micros" else pc.multiply(column, 1000)
        return micros.to_pylist() if native else micros.cast(_UTC_MICROS).to_pylist()
    return column.to_pylist()


def _decimal(clickhouse_type: str) -> tuple[int, int]:
    found = re.search(r"Decimal\((\d+), (\d+)\)", clickhouse_type)
    if found is None:
        raise ValueError(f"not a Decimal type: {clickhouse_type}")
    return int(found.group(1)), int(found.group(2))

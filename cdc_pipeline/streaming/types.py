"""PostgreSQL -> ClickHouse column types and values, read from the Connect schema that every Debezium
JSON message carries (JsonConverter with schemas.enable=true), so the sink never asks PostgreSQL.

Expects the connector settings decimal.handling.mode=string, time.precision.mode=adaptive_time_microseconds,
interval.handling.mode=string, binary.handling.mode=bytes, hstore.handling.mode=json and
column.propagate.source.type=.* (the source type, length and scale arrive as field parameters).

Pure Python on purpose: it runs on the Spark driver and executors without Spark or Dagster imports.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

__all__ = [
    "OUT_OF_RANGE_POLICIES",
    "ColumnSpec",
    "OutOfRange",
    "UnsupportedTypeError",
    "ValueConversionError",
    "clickhouse_type",
    "columns_from_schema",
    "value_converter",
]

Converter = Callable[[Any], Any]
# What happens to a date/timestamp outside ClickHouse's range (e.g. the sentinels 0001-01-01, 9999-12-31,
# 'infinity'): "clamp" stores the nearest representable value (1900-01-01 / 2299-12-31 ...) and reports it,
# "text" stores the column as ISO 8601 text (exact), "dlq" dead-letters the whole row.
OutOfRange = Literal["clamp", "text", "dlq"]
OUT_OF_RANGE_POLICIES: tuple[str, ...] = ("clamp", "text", "dlq")
# Called with (column, value) whenever a value was clamped; the stream counts and logs them.
ClampHook = Callable[[str, Any], None]

SOURCE_TYPE = "__debezium.source.column.type"
SOURCE_LENGTH = "__debezium.source.column.length"
SOURCE_SCALE = "__debezium.source.column.scale"

# ClickHouse Decimal holds at most 76 digits; wider or unconstrained numerics stay exact as text.
MAX_DECIMAL_PRECISION = 76
# Date32 and DateTime64 both cover 1900-01-01 .. 2299-12-31 (inclusive).
MIN_DATE = date(1900, 1, 1)
MAX_DATE = date(2299, 12, 31)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MIN_DAYS = (MIN_DATE - _EPOCH.date()).days
_MAX_DAYS = (MAX_DATE - _EPOCH.date()).days
_MIN_MICROS = _MIN_DAYS * 86_400_000_000
_MAX_MICROS = (_MAX_DAYS + 1) * 86_400_000_000 - 1

_DATE = "io.debezium.time.Date"
_MICRO_TIME = "io.debezium.time.MicroTime"
_TIMESTAMP = "io.debezium.time.Timestamp"
_MICRO_TIMESTAMP = "io.debezium.time.MicroTimestamp"
_ZONED_TIMESTAMP = "io.debezium.time.ZonedTimestamp"
_ZONED_TIME = "io.debezium.time.ZonedTime"
_INTERVAL = "io.debezium.time.Interval"
_UUID = "io.debezium.data.Uuid"
_JSON = "io.debezium.data.Json"
_ENUM = "io.debezium.data.Enum"

# Logical types that other connector settings produce, with the setting that yields a supported one.
_MISCONFIGURED = {
    "org.apache.kafka.connect.data.Decimal": "set decimal.handling.mode=string",
    "io.debezium.data.VariableScaleDecimal": "set decimal.handling.mode=string",
    "io.debezium.time.MicroDuration": "set interval.handling.mode=string",
    "io.debezium.time.Time": "set time.precision.mode=adaptive_time_microseconds",
    "io.debezium.time.NanoTime": "set time.precision.mode=adaptive_time_microseconds",
    "io.debezium.time.NanoTimestamp": "set time.precision.mode=adaptive_time_microseconds",
    "org.apache.kafka.connect.data.Date": "set time.precision.mode=adaptive_time_microseconds",
    "org.apache.kafka.connect.data.Time": "set time.precision.mode=adaptive_time_microseconds",
    "org.apache.kafka.connect.data.Timestamp": "set time.precision.mode=adaptive_time_microseconds",
}

_PLAIN_TYPES = {"int16": "Int16", "int32": "Int32", "int64": "Int64", "float": "Float32", "double": "Float64"}


class UnsupportedTypeError(TypeError):
    """A column's Connect schema has no exact ClickHouse mapping here."""


class ValueConversionError(ValueError):
    """A value cannot be stored exactly in its ClickHouse column; route the record to the dead-letter topic."""


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    clickhouse_type: str
    convert: Converter
    optional: bool
    # bytea (or bytea[]): the converted values are bytes; every other String column holds str.
    binary: bool = False
    # The Connect field's `default` as Debezium sent it (JSON form, before conversion); has_default tells
    # an absent default from a null one. Schema evolution uses it (see streaming/evolution.py).
    default: Any = None
    has_default: bool = False
    # The PostgreSQL type, length and scale from column.propagate.source.type (None when absent).
    source_type: str | None = None
    source_length: str | None = None
    source_scale: str | None = None
    # How streaming/columnar.py converts the column's values column-wise (see COLUMNAR_KINDS), or None
    # when only `convert` can (arrays, bytea, time, temporal text): the row then takes the row path.
    columnar: str | None = None


def _column(field: dict[str, Any]) -> str:
    return field.get("field", "?")


def _source_type(field: dict[str, Any]) -> str:
    return (field.get("parameters") or {}).get(SOURCE_TYPE, "?")


def _unsupported(field: dict[str, Any], what: str, todo: str) -> UnsupportedTypeError:
    return UnsupportedTypeError(
        f"column {_column(field)!r} (PostgreSQL type {_source_type(field)}, Connect type {field.get('type')}"
        f"{', logical type ' + field['name'] if field.get('name') else ''}): {what}. To fix: {todo}."
    )


def _decimal_type(field: dict[str, Any]) -> tuple[int, int] | None:
    """(precision, scale) of the ClickHouse Decimal for a NUMERIC column, or None when it must stay text."""
    params = field.get("parameters") or {}
    try:
        precision, scale = int(params[SOURCE_LENGTH]), int(params[SOURCE_SCALE])
    except (KeyError, ValueError):
        return None  # unconstrained numeric in snapshot events: length "0" and no scale
    # Unconstrained numeric in streaming events: length 131089 and scale 0, caught by the 76-digit limit.
    if precision <= 0:
        return None
    # PostgreSQL 15 allows scale < 0 or scale > precision; keep every integer and fraction digit.
    ch_scale = max(scale, 0)
    ch_precision = max(precision - scale, 0) + ch_scale
    return (ch_precision, ch_scale) if ch_precision <= MAX_DECIMAL_PRECISION else None


def _element_field(field: dict[str, Any]) -> dict[str, Any]:
    # Array items carry no parameters; the array column's own (e.g. _NUMERIC, 10, 2) describe its elements.
    params = dict(field.get("parameters") or {})
    params[SOURCE_TYPE] = params.get(SOURCE_TYPE, "?").removeprefix("_")
    return {**field["items"], "field": _column(field), "parameters": params}


_TEMPORAL = {"io.debezium.time.Date", "io.debezium.time.Timestamp", "io.debezium.time.MicroTimestamp",
             "io.debezium.time.ZonedTimestamp"}  # fmt: skip


def _base_type(field: dict[str, Any], out_of_range: OutOfRange = "dlq") -> str:
    """The ClickHouse type of a non-array field, without Nullable."""
    name, kind = field.get("name"), field.get("type")
    if out_of_range == "text" and name in _TEMPORAL:
        return "String"
    if name in _MISCONFIGURED:
        raise _unsupported(field, "the connector is configured for a different representation", _MISCONFIGURED[name])
    if name is None:
        if kind in _PLAIN_TYPES:
            return _PLAIN_TYPES[kind]
        if kind == "boolean":
            return "Bool"
        if kind == "bytes":
            return "String"
        if kind == "string":
            if _source_type(field) == "NUMERIC":
                decimal = _decimal_type(field)
                return f"Decimal({decimal[0]}, {decimal[1]})" if decimal else "String"
            return "String"
    by_name = {
        _DATE: ("int32", "Date32"),
        _MICRO_TIME: ("int64", "Time64(6)"),
        _TIMESTAMP: ("int64", "DateTime64(6)"),
        _MICRO_TIMESTAMP: ("int64", "DateTime64(6)"),
        _ZONED_TIMESTAMP: ("string", "DateTime64(6, 'UTC')"),
        _ZONED_TIME: ("string", "String"),
        _INTERVAL: ("string", "String"),
        _UUID: ("string", "UUID"),
        _JSON: ("string", "String"),
        _ENUM: ("string", "LowCardinality(String)"),
    }
    if name in by_name and by_name[name][0] == kind:
        return by_name[name][1]
    raise _unsupported(
        field,
        "no ClickHouse mapping is defined for this schema",
        "add one in cdc_pipeline/streaming/types.py, or leave the column out with the connector's column.exclude.list",
    )


def clickhouse_type(field: dict[str, Any], out_of_range: OutOfRange = "dlq") -> str:
    """The ClickHouse column type for a Connect field schema of a Debezium `after` struct.

    Optional scalars become Nullable(T) (LowCardinality(Nullable(String)) for enums). Arrays become
    Array(T), with Nullable(T) elements when the items are optional; ClickHouse has no Nullable(Array),
    so a NULL array is stored as an empty array. Raises UnsupportedTypeError for anything without an
    exact mapping.
    """
    if field.get("type") == "array":
        return f"Array({clickhouse_type(_element_field(field), out_of_range)})"
    base = _base_type(field, out_of_range)
    if not field.get("optional"):
        return base
    if base.startswith("LowCardinality("):
        return f"LowCardinality(Nullable({base.removeprefix('LowCardinality(')})"
    return f"Nullable({base})"


def _fail(field: dict[str, Any], value: Any, why: str) -> ValueConversionError:
    return ValueConversionError(f"column {_column(field)!r} ({_source_type(field)}): value {value!r} {why}")


# Debezium's encodings of PostgreSQL's 'infinity' / '-infinity', measured with Debezium 3.7: a MicroTimestamp
# is Long.MAX/MIN; a Timestamp (millis) PostgreSQL's own DT_NOEND/DT_NOBEGIN in ms; a Date differs between
# the snapshot (JDBC) and streaming (pgoutput), and neither is a real day count.
_LONG_MAX, _LONG_MIN = 2**63 - 1, -(2**63)
_MILLIS_INFINITY = {9_223_372_036_825_200_000: _LONG_MAX, -9_223_372_036_832_400_000: _LONG_MIN}
_DATE_INFINITY = {-622_191_234: "infinity", 2_146_033_979: "infinity", -625_821_272: "-infinity",
                  -2_147_472_691: "-infinity"}  # fmt: skip


def _civil(days: int) -> str:
    """Days since 1970-01-01 as PostgreSQL prints a date (proleptic Gregorian, 'BC' before year 1), for
    any day count (Howard Hinnant's days_from_civil inverse; Python's date stops at year 9999)."""
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (1 if month <= 2 else 0)
    return f"{year:04d}-{month:02d}-{day:02d}" if year > 0 else f"{1 - year:04d}-{month:02d}-{day:02d} BC"


def _integer(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueConversionError(f"value {value!r} is not a JSON integer")
    return value


def _beyond_python(text: str) -> bool | None:
    """For ISO text Python cannot parse: True when it lies before year 1 ('-infinity', BC), False when
    after 9999 ('infinity', '+10000-...'), None when it is not a timestamp at all."""
    lowered = text.strip().lower()
    if lowered in ("infinity", "+infinity") or re.match(r"^\+?\d{5,}-", lowered):
        return False
    if lowered == "-infinity" or lowered.endswith(" bc") or re.match(r"^-\d{4,}-", lowered):
        return True
    return None


def _to_utc_or_none(parsed: datetime) -> datetime | None:
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        return None


def _scalar_converter(
    field: dict[str, Any], ch_type: str, out_of_range: OutOfRange = "dlq", on_clamp: ClampHook | None = None
) -> Converter:
    name = field.get("name")
    clamp = out_of_range == "clamp"

    def clamped(value: Any, result: Any) -> Any:
        if on_clamp is not None:
            on_clamp(_column(field), value)
        return result

    def to_decimal(value: str) -> Decimal:
        try:
            result = Decimal(value)
        except InvalidOperation:
            raise _fail(field, value, "is not a number") from None
        if not result.is_finite():
            raise _fail(field, value, f"cannot be stored in {ch_type}; only unconstrained numeric keeps NaN")
        return result

    def to_date(days: int) -> date:
        days = _integer(days)
        if not _MIN_DAYS <= days <= _MAX_DAYS:
            if clamp:
                low = _DATE_INFINITY[days] == "-infinity" if days in _DATE_INFINITY else days < _MIN_DAYS
                return clamped(days, MIN_DATE if low else MAX_DATE)
            raise _fail(field, days, f"(days since 1970-01-01) is outside Date32's {MIN_DATE}..{MAX_DATE}")
        return _EPOCH.date() + timedelta(days=days)

    def to_datetime(micros: int) -> datetime:
        if not _MIN_MICROS <= micros <= _MAX_MICROS:
            if clamp:
                bound = _MIN_MICROS if micros < _MIN_MICROS else _MAX_MICROS
                return clamped(micros, _EPOCH + timedelta(microseconds=bound))
            raise _fail(field, micros, f"(epoch microseconds) is outside DateTime64's {MIN_DATE}..{MAX_DATE}")
        # Aware UTC datetimes: clickhouse-connect turns naive ones into epochs with the client's local zone.
        return _EPOCH + timedelta(microseconds=micros)

    def to_zoned(text: str) -> datetime:
        if not isinstance(text, str):
            raise _fail(field, text, "is not a JSON string")
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            if clamp and (low := _beyond_python(text)) is not None:
                return clamped(text, _EPOCH + timedelta(microseconds=_MIN_MICROS if low else _MAX_MICROS))
            raise _fail(field, text, "is not an ISO 8601 timestamp Python can hold") from None
        if parsed.tzinfo is None:
            raise _fail(field, text, "has no time zone offset")
        utc = parsed.astimezone(UTC) if MIN_DATE.year < parsed.year < MAX_DATE.year else _to_utc_or_none(parsed)
        if utc is None or not MIN_DATE <= utc.date() <= MAX_DATE:
            if clamp:
                low = parsed.year <= MIN_DATE.year
                return clamped(text, _EPOCH + timedelta(microseconds=_MIN_MICROS if low else _MAX_MICROS))
            raise _fail(field, text, f"is outside DateTime64's {MIN_DATE}..{MAX_DATE}")
        return utc

    def date_text(days: int) -> str:
        days = _integer(days)
        return _DATE_INFINITY.get(days) or _civil(days)

    def datetime_text(micros: int) -> str:
        micros = _integer(micros)
        if micros in (_LONG_MAX, _LONG_MIN):
            return "infinity" if micros == _LONG_MAX else "-infinity"
        days, of_day = divmod(micros, 86_400_000_000)
        seconds, fraction = divmod(of_day, 1_000_000)
        clock = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        date_part, _, era = _civil(days).partition(" ")
        return f"{date_part}T{clock}{f'.{fraction:06d}' if fraction else ''}{' ' + era if era else ''}"

    if out_of_range == "text" and name in _TEMPORAL:
        if name == _DATE:
            return date_text
        if name == _TIMESTAMP:
            return lambda millis: datetime_text(_MILLIS_INFINITY.get(_integer(millis)) or millis * 1000)
        if name == _MICRO_TIMESTAMP:
            return datetime_text
        return _checked(field)  # ZonedTimestamp: Debezium's own ISO 8601 text ('infinity' included)

    def to_bytes(text: str) -> bytes:
        try:
            return base64.b64decode(text, validate=True)
        except binascii.Error:
            raise _fail(field, text, "is not base64") from None

    def to_uuid(text: str) -> uuid.UUID:
        try:
            return uuid.UUID(text)
        except ValueError:
            raise _fail(field, text, "is not a UUID") from None

    if name == _DATE:
        return to_date
    if name == _MICRO_TIME:
        return lambda micros: timedelta(microseconds=_integer(micros))
    if name == _TIMESTAMP:
        return lambda millis: to_datetime(_MILLIS_INFINITY.get(_integer(millis)) or millis * 1000)
    if name == _MICRO_TIMESTAMP:
        return lambda micros: to_datetime(_integer(micros))
    if name == _ZONED_TIMESTAMP:
        return to_zoned
    if name == _UUID:
        return to_uuid
    if ch_type.startswith("Decimal("):
        return to_decimal
    if _source_type(field) == "NUMERIC":
        # Debezium spells numeric NaN "NAN"; store PostgreSQL's own text.
        return lambda text: "NaN" if text == "NAN" else text
    if field.get("type") in ("float", "double"):
        # NaN and ±Infinity arrive as the JSON strings "NaN", "Infinity", "-Infinity".
        return float
    if field.get("type") == "bytes":
        return to_bytes
    return _checked(field)


# JSON types each Connect primitive may arrive as; anything else is a malformed record, not a value.
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "int8": (int,), "int16": (int,), "int32": (int,), "int64": (int,), "boolean": (bool,), "string": (str,),
}  # fmt: skip
_INT_BITS = {"int8": 8, "int16": 16, "int32": 32, "int64": 64}


def _checked(field: dict[str, Any]) -> Converter:
    """Pass the value through after checking it is what the schema promises (so a bad record fails
    here, alone, instead of failing the whole columnar insert)."""
    connect_type = field.get("type", "")
    expected = _JSON_TYPES.get(connect_type)
    bits = _INT_BITS.get(connect_type)

    def check(value: Any) -> Any:
        if expected is not None and (
            not isinstance(value, expected) or (bool not in expected and isinstance(value, bool))
        ):
            raise _fail(field, value, f"is not a JSON {connect_type}")
        if bits is not None and not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
            raise _fail(field, value, f"does not fit {connect_type}")
        return value

    return check


def value_converter(
    field: dict[str, Any], out_of_range: OutOfRange = "dlq", on_clamp: ClampHook | None = None
) -> Callable[[Any], Any]:
    """A function from the field's JSON value to what clickhouse-connect inserts into `clickhouse_type(field)`.

    NULL gives None (an empty list for arrays). Decimal columns get Decimal, DateTime64 columns aware UTC
    datetimes, Date32 date, Time64 timedelta, UUID uuid.UUID, bytea bytes; JSON, interval, timetz and
    wide numerics keep Debezium's text. Raises ValueConversionError for values the column cannot hold
    exactly (NaN in a Decimal column; dates outside 1900-01-01..2299-12-31 under the "dlq" policy):
    dead-letter the record. `out_of_range` chooses what happens to dates and timestamps outside
    ClickHouse's range (see OutOfRange); `on_clamp` hears of every clamped value.
    """
    if field.get("type") == "array":
        element = value_converter(_element_field(field), out_of_range, on_clamp)

        def array(values: Any) -> list[Any]:
            if values is None:
                return []
            if not isinstance(values, list):
                raise _fail(field, values, "is not a JSON array")
            return [element(v) for v in values]

        return array
    convert = _scalar_converter(field, _base_type(field, out_of_range), out_of_range, on_clamp)
    if field.get("optional"):
        return lambda value: None if value is None else convert(value)

    def required(value: Any) -> Any:
        if value is None:
            raise _fail(field, value, "is null but the column is NOT NULL")
        return convert(value)

    return required


# Column-wise conversions (streaming/columnar.py), each giving exactly what `value_converter` gives:
# int16/int32/int64/bool/float64 (JSON numbers and booleans), string (any text column), numeric_text
# (unconstrained NUMERIC text), decimal (Decimal(p, s)), date (Date), micros (MicroTimestamp), millis
# (Timestamp), zoned (ZonedTimestamp), uuid (Uuid, for ClickHouse alone).
COLUMNAR_KINDS = ("int16", "int32", "int64", "bool", "float64", "string", "numeric_text", "decimal", "date",
                  "micros", "millis", "zoned", "uuid")  # fmt: skip


def columnar_kind(field: dict[str, Any], out_of_range: OutOfRange = "dlq") -> str | None:
    """The column-wise conversion of a field (one of COLUMNAR_KINDS), or None when it has none."""
    if field.get("type") == "array":
        return None
    name, kind = field.get("name"), field.get("type")
    if name in _TEMPORAL and out_of_range == "text":
        return None
    temporal = {_DATE: "date", _MICRO_TIMESTAMP: "micros", _TIMESTAMP: "millis", _ZONED_TIMESTAMP: "zoned"}
    if name is not None:
        # Json, Enum, Interval and ZonedTime columns pass their text through like any other string.
        if name == _UUID:
            return "uuid"
        return temporal.get(name) or ("string" if name in (_JSON, _ENUM, _INTERVAL, _ZONED_TIME) else None)
    if kind in ("int16", "int32", "int64"):
        return kind
    if kind == "boolean":
        return "bool"
    if kind in ("float", "double"):
        return "float64"
    if kind == "string":
        if _source_type(field) == "NUMERIC":
            return "decimal" if _decimal_type(field) else "numeric_text"
        return "string"
    return None


def _is_binary(field: dict[str, Any]) -> bool:
    item = field.get("items") if field.get("type") == "array" else field
    return isinstance(item, dict) and item.get("type") == "bytes"


def columns_from_schema(
    value_schema: dict[str, Any],
    out_of_range: OutOfRange | Callable[[str], OutOfRange] = "dlq",
    on_clamp: ClampHook | None = None,
) -> list[ColumnSpec]:
    """The replica columns of a Debezium envelope schema (the `schema` of a message value): one per
    field of its `after` struct, in order. `out_of_range` is one policy for every column, or a
    function from the column name to its policy. Raises UnsupportedTypeError for anything that is
    not a well-formed envelope schema with mappable columns."""
    if not isinstance(value_schema, dict) or not isinstance(value_schema.get("fields"), list):
        raise UnsupportedTypeError("the record's schema is not a Connect struct schema with a list of fields")
    after = next((f for f in value_schema["fields"] if isinstance(f, dict) and f.get("field") == "after"), None)
    if after is None or after.get("type") != "struct" or not isinstance(after.get("fields"), list):
        raise UnsupportedTypeError(
            f"schema {value_schema.get('name', '?')!r} is not a Debezium envelope with an `after` struct; "
            "enable schemas on the value converter (value.converter.schemas.enable=true)"
        )
    policy = out_of_range if callable(out_of_range) else (lambda _name: out_of_range)
    specs: list[ColumnSpec] = []
    for field in after["fields"]:
        if not isinstance(field, dict) or not isinstance(field.get("field"), str) or not field["field"]:
            raise UnsupportedTypeError(f"the record's schema has a malformed field: {str(field)[:200]}")
        if any(spec.name == field["field"] for spec in specs):
            raise UnsupportedTypeError(f"the record's schema names column {field['field']!r} twice")
        try:
            column_policy = policy(field["field"])
            specs.append(
                ColumnSpec(
                    name=field["field"],
                    clickhouse_type=clickhouse_type(field, column_policy),
                    convert=value_converter(field, column_policy, on_clamp),
                    optional=bool(field.get("optional")),
                    binary=_is_binary(field),
                    default=field.get("default"),
                    has_default="default" in field,
                    source_type=(field.get("parameters") or {}).get(SOURCE_TYPE),
                    source_length=(field.get("parameters") or {}).get(SOURCE_LENGTH),
                    source_scale=(field.get("parameters") or {}).get(SOURCE_SCALE),
                    columnar=columnar_kind(field, column_policy),
                )
            )
        except UnsupportedTypeError:
            raise
        except Exception as exc:  # a mutated schema (wrong JSON types inside it) is not a mappable schema
            raise UnsupportedTypeError(f"column {field['field']!r}: malformed schema ({exc!r})") from None
    return specs

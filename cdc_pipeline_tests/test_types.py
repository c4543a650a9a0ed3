"""The PostgreSQL -> ClickHouse type mapping and value conversion, from Debezium 3.7 messages captured
from a real connector (cdc_pipeline_tests/data/debezium/, table `all_types`). Pure unit tests."""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from cdc_pipeline.streaming.types import (
    UnsupportedTypeError,
    ValueConversionError,
    clickhouse_type,
    columns_from_schema,
    value_converter,
)

DATA = Path(__file__).parent / "data" / "debezium"


def messages(name: str) -> list[dict[str, Any]]:
    return json.loads((DATA / f"{name}.json").read_text(encoding="utf-8"))


def after_fields(message: dict[str, Any]) -> dict[str, dict[str, Any]]:
    after = next(f for f in message["value"]["schema"]["fields"] if f["field"] == "after")
    return {f["field"]: f for f in after["fields"]}


def after_values(name: str) -> dict[int, dict[str, Any]]:
    return {m["value"]["payload"]["after"]["id"]: m["value"]["payload"]["after"] for m in messages(name)}


SNAPSHOT = messages("snapshot")
STREAM = messages("stream_edge_values")
ROWS = after_values("snapshot") | after_values("stream_edge_values")

EXPECTED_TYPES = {
    "id": "Int64",
    "n38": "Nullable(Decimal(38, 9))",
    "n50": "Nullable(Decimal(50, 10))",
    "n80": "Nullable(String)",
    "nfree": "Nullable(String)",
    "n10_2": "Nullable(Decimal(10, 2))",
    "n5_0": "Nullable(Decimal(5, 0))",
    "nreq": "Decimal(12, 3)",
    "i2": "Nullable(Int16)",
    "i4": "Nullable(Int32)",
    "i8": "Nullable(Int64)",
    "f4": "Nullable(Float32)",
    "f8": "Nullable(Float64)",
    "t": "Nullable(String)",
    "vc": "Nullable(String)",
    "ch": "Nullable(String)",
    "b": "Nullable(Bool)",
    "d": "Nullable(Date32)",
    "tm": "Nullable(Time64(6))",
    "tm3": "Nullable(Time64(6))",
    "ttz": "Nullable(String)",
    "ts": "Nullable(DateTime64(6))",
    "ts0": "Nullable(DateTime64(6))",
    "ts3": "Nullable(DateTime64(6))",
    "tstz": "Nullable(DateTime64(6, 'UTC'))",
    "tstz0": "Nullable(DateTime64(6, 'UTC'))",
    "iv": "Nullable(String)",
    "u": "Nullable(UUID)",
    "j": "Nullable(String)",
    "jb": "Nullable(String)",
    "ai": "Array(Nullable(Int32))",
    "atx": "Array(Nullable(String))",
    "an": "Array(Nullable(Decimal(10, 2)))",
    "e": "LowCardinality(Nullable(String))",
    "ea": "Array(LowCardinality(String))",
    "by": "Nullable(String)",
}


@pytest.mark.parametrize("message", [SNAPSHOT[0], STREAM[0]], ids=["snapshot-schema", "streaming-schema"])
def test_every_column_maps_to_its_clickhouse_type(message: dict[str, Any]) -> None:
    # Snapshot and streaming schemas differ for unconstrained numeric (length "0" vs "131089"): same mapping.
    specs = columns_from_schema(message["value"]["schema"])
    assert {s.name: s.clickhouse_type for s in specs} == EXPECTED_TYPES
    assert [s.name for s in specs] == list(EXPECTED_TYPES)
    assert {s.name for s in specs if not s.optional} == {"id", "nreq"}


def test_columns_from_schema_rejects_a_schemaless_value() -> None:
    with pytest.raises(UnsupportedTypeError, match="schemas.enable=true"):
        columns_from_schema({"type": "struct", "fields": [{"type": "int64", "field": "id"}]})


def convert_row(row_id: int) -> dict[str, Any]:
    specs = columns_from_schema(STREAM[0]["value"]["schema"])
    return {s.name: s.convert(ROWS[row_id][s.name]) for s in specs}


def test_typical_values_convert() -> None:
    assert convert_row(1) == {
        "id": 1,
        "n38": Decimal("12345.678900000"),
        "n50": Decimal("1234567890123456789012345678901234567890.0123456789"),
        "n80": "1.50000",
        "nfree": "3.14159265358979323846264338327950288419716939937510",
        "n10_2": Decimal("19.99"),
        "n5_0": Decimal("42"),
        "nreq": Decimal("1.500"),
        "i2": 7,
        "i4": 42,
        "i8": 9000000000,
        "f4": 1.5,
        "f8": 0.1,
        "t": "héllo wörld ✓ 😀",
        "vc": "日本語テキスト",
        "ch": "ab   ",  # Debezium pads char(n) as stored
        "b": True,
        "d": date(2024, 2, 29),
        "tm": timedelta(hours=12, minutes=34, seconds=56, microseconds=789012),
        "tm3": timedelta(hours=1, minutes=2, seconds=3, microseconds=456000),
        "ttz": "07:04:56.789Z",  # 12:34:56.789+05:30, normalised to UTC by Debezium
        "ts": datetime(1950, 6, 15, 12, 34, 56, 123456, tzinfo=UTC),
        "ts0": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        "ts3": datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
        "tstz": datetime(2024, 3, 10, 7, 30, 0, 123456, tzinfo=UTC),  # 02:30:00.123456 America/New_York
        "tstz0": datetime(2024, 6, 1, 6, 30, tzinfo=UTC),
        "iv": "P1Y2M3DT4H5M6.789S",
        "u": uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        "j": '{"a": {"b": [1, 2.50, 12345678901234567890.123456789]}, "u": "ünï 😀", "esc": "\\u00e9"}',
        "jb": '{"a": {"n": 12345678901234567890.123456789, "s": "ünï 😀"}, "z": 1, "arr": [true, null]}',
        "ai": [1, 2, 3],
        "atx": ["a", "b c", "ü 😀"],
        "an": [Decimal("1.10"), Decimal("2.25")],
        "e": "happy",
        "ea": ["sad", "happy"],
        "by": b"\x00\xff\x00\xfe\x80A",
    }


def test_largest_values_convert() -> None:
    row = convert_row(2)
    assert row["n38"] == Decimal("99999999999999999999999999999.999999999")
    assert row["n50"] == Decimal("9" * 40 + "." + "9" * 10)
    assert row["n80"] == "9" * 75 + ".99999"
    assert row["nfree"] == "1234567890123456789012345678901234567890"
    assert (row["i2"], row["i4"], row["i8"]) == (32767, 2147483647, 9223372036854775807)
    assert (row["f4"], row["f8"]) == (3.4028235e38, 1e308)
    assert (row["t"], row["vc"], row["ch"], row["b"]) == ("", "", "     ", False)
    assert row["d"] == date(2299, 12, 31)
    assert row["tm"] == timedelta(hours=23, minutes=59, seconds=59, microseconds=999999)
    assert row["ttz"] == "11:59:59.999999Z"  # 23:59:59.999999-12
    assert row["ts"] == datetime(2262, 4, 11, 23, 47, 16, 854775, tzinfo=UTC)
    assert row["ts0"] == datetime(2299, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert row["ts3"] == datetime(2299, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
    assert row["tstz"] == datetime(2299, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert row["tstz0"] == datetime(1900, 1, 1, tzinfo=UTC)
    assert row["iv"] == "P-1Y-2M-3DT-4H-5M-6.789S"
    assert row["u"] == uuid.UUID(int=2**128 - 1)
    assert (row["j"], row["jb"]) == ("[]", "{}")
    assert (row["ai"], row["atx"], row["an"], row["ea"], row["by"]) == ([], [], [], [], b"")
    assert row["e"] == "très 😀"


def test_smallest_values_convert() -> None:
    row = convert_row(4)
    assert row["n38"] == Decimal("-99999999999999999999999999999.999999999")
    assert row["n80"] == "-" + "9" * 75 + ".99999"
    assert row["nfree"] == "NaN"  # Debezium sends "NAN"; PostgreSQL's text is "NaN"
    assert (row["n10_2"], row["n5_0"], row["nreq"]) == (Decimal("-0.01"), Decimal("-99999"), Decimal("-0.001"))
    assert (row["i2"], row["i4"], row["i8"]) == (-32768, -2147483648, -9223372036854775808)
    assert math.copysign(1, row["f4"]) == math.copysign(1, row["f8"]) == -1.0 and row["f4"] == row["f8"] == 0
    assert row["t"] == 'tab\there\nnewline "quote" \\backslash'
    assert row["d"] == date(1900, 1, 1)
    assert row["tm"] == row["tm3"] == timedelta(0)
    assert row["ts"] == datetime(1900, 1, 1, tzinfo=UTC)
    assert row["ts0"] == datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert row["ts3"] == datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
    assert row["tstz"] == datetime(1970, 1, 1, 7, 59, 59, 999999, tzinfo=UTC)  # 1969-12-31 23:59:59.999999-08
    assert row["tstz0"] == datetime(1999, 12, 31, 18, 30, tzinfo=UTC)  # 2000-01-01 00:00 Asia/Kolkata
    assert row["iv"] == "P0Y0M1DT-1H0M0S"  # '1 day -01:00:00'
    assert row["j"] == '{"n": 1.000000000000000000001, "dup": 1, "dup": 2}'  # json keeps its text verbatim
    assert row["ai"] == [None, -2147483648, 2147483647]
    assert row["atx"] == ["", None, "with,comma", 'q"uote']
    assert row["an"] == [Decimal("-99999999.99"), None, Decimal("0.00")]
    # PostgreSQL holds {ok,NULL,"très 😀"}: Debezium sends null for an enum array with a NULL element.
    assert ROWS[4]["ea"] is None and row["ea"] == []
    assert row["by"] == bytes(range(256))


def test_float_specials_and_tiny_numbers_convert() -> None:
    assert (convert_row(5)["f4"], convert_row(5)["f8"]) == (math.inf, -math.inf)
    assert math.isnan(convert_row(6)["f4"]) and math.isnan(convert_row(6)["f8"])
    assert convert_row(5)["nfree"] == "-0.000000000000000000000000000000000000001"
    assert convert_row(6)["nfree"] == "0"


def test_nulls_convert_to_none_and_null_arrays_to_empty_arrays() -> None:
    row = convert_row(3)
    arrays = {"ai", "atx", "an", "ea"}
    assert {k: v for k, v in row.items() if k in arrays} == dict.fromkeys(arrays, [])
    assert {k for k, v in row.items() if v is not None} == {"id", "nreq", *arrays}


@pytest.mark.parametrize(
    ("column", "row_id", "message"),
    [
        ("d", 7, "value 2932896 (days since 1970-01-01) is outside Date32's 1900-01-01..2299-12-31"),
        ("d", 8, "value -25568 (days since 1970-01-01)"),
        ("ts", 7, "value 253402300799999999 (epoch microseconds) is outside DateTime64"),
        ("ts", 8, "value -2208988800000001 (epoch microseconds)"),
        ("ts0", 7, "value 253402300799000"),
        ("ts3", 8, "value -2208988800001"),
        ("tstz", 7, "value '9999-12-31T23:59:59.999999Z' is outside DateTime64"),
        ("tstz", 8, "value '1899-12-31T23:59:59.999999Z'"),
    ],
)
def test_values_outside_clickhouse_ranges_raise(column: str, row_id: int, message: str) -> None:
    field = after_fields(STREAM[0])[column]
    with pytest.raises(ValueConversionError, match=f"column '{column}'") as raised:
        value_converter(field)(ROWS[row_id][column])
    assert message in str(raised.value)


def test_far_but_valid_values_convert() -> None:
    fields = after_fields(STREAM[0])
    assert value_converter(fields["tm"])(ROWS[7]["tm"]) == timedelta(hours=24)  # time '24:00:00'
    assert value_converter(fields["f4"])(ROWS[7]["f4"]) == 1e38
    assert value_converter(fields["f8"])(ROWS[7]["f8"]) == 5e-324


def test_nan_never_reaches_a_decimal_column() -> None:
    field = after_fields(STREAM[0])["n38"]  # PostgreSQL accepts 'NaN' in numeric(38,9) too
    with pytest.raises(ValueConversionError, match=r"column 'n38' \(NUMERIC\): value 'NAN' cannot be stored"):
        value_converter(field)("NAN")


def numeric_field(length: str | None, scale: str | None) -> dict[str, Any]:
    params = {"__debezium.source.column.type": "NUMERIC"}
    params |= {"__debezium.source.column.length": length} if length is not None else {}
    params |= {"__debezium.source.column.scale": scale} if scale is not None else {}
    return {"type": "string", "optional": False, "field": "n", "parameters": params}


@pytest.mark.parametrize(
    ("length", "scale", "expected"),
    [
        ("76", "20", "Decimal(76, 20)"),
        ("77", "0", "String"),
        ("1000", "10", "String"),
        ("131089", "0", "String"),
        ("0", None, "String"),
        ("5", "-2", "Decimal(7, 0)"),  # PostgreSQL 15: numeric(5,-2) rounds to hundreds
        ("3", "5", "Decimal(5, 5)"),  # PostgreSQL 15: numeric(3,5) holds 0.00xxx
    ],
)
def test_numeric_precision_and_scale(length: str, scale: str | None, expected: str) -> None:
    assert clickhouse_type(numeric_field(length, scale)) == expected


@pytest.mark.parametrize(
    ("field", "hint"),
    [
        (
            {"type": "struct", "optional": True, "name": "io.debezium.data.geometry.Point", "fields": []},
            "column.exclude.list",
        ),
        (
            {"type": "bytes", "optional": True, "name": "org.apache.kafka.connect.data.Decimal"},
            "decimal.handling.mode=string",
        ),
        (
            {"type": "int64", "optional": True, "name": "io.debezium.time.MicroDuration"},
            "interval.handling.mode=string",
        ),
        ({"type": "map", "optional": True}, "add one in cdc_pipeline/streaming/types.py"),
    ],
)
def test_unknown_types_raise_with_what_to_do(field: dict[str, Any], hint: str) -> None:
    field = {**field, "field": "shape", "parameters": {"__debezium.source.column.type": "POINT"}}
    with pytest.raises(UnsupportedTypeError) as raised:
        clickhouse_type(field)
    text = str(raised.value)
    assert "column 'shape'" in text and "PostgreSQL type POINT" in text and hint in text
    with pytest.raises(UnsupportedTypeError):
        value_converter(field)


# Debezium 3.7's encodings of PostgreSQL's extremes, measured on the real stack (snapshot, then streaming).
DATE_FIELD = {"type": "int32", "optional": True, "name": "io.debezium.time.Date", "field": "d",
              "parameters": {"__debezium.source.column.type": "DATE"}}  # fmt: skip
MICROS_FIELD = {"type": "int64", "optional": True, "name": "io.debezium.time.MicroTimestamp", "field": "ts"}
MILLIS_FIELD = {"type": "int64", "optional": True, "name": "io.debezium.time.Timestamp", "field": "ts3"}
ZONED_FIELD = {"type": "string", "optional": True, "name": "io.debezium.time.ZonedTimestamp", "field": "tz"}


@pytest.mark.parametrize(
    ("field", "value", "clamped", "text"),
    [
        (DATE_FIELD, -622191234, date(2299, 12, 31), "infinity"),  # 'infinity', snapshot
        (DATE_FIELD, 2146033979, date(2299, 12, 31), "infinity"),  # 'infinity', streaming
        (DATE_FIELD, -625821272, date(1900, 1, 1), "-infinity"),  # '-infinity', snapshot
        (DATE_FIELD, -2147472691, date(1900, 1, 1), "-infinity"),  # '-infinity', streaming
        (DATE_FIELD, -719162, date(1900, 1, 1), "0001-01-01"),
        (DATE_FIELD, 2932896, date(2299, 12, 31), "9999-12-31"),
        (DATE_FIELD, 2145042905, date(2299, 12, 31), "5874897-12-31"),
        (DATE_FIELD, -2440550, date(1900, 1, 1), "4713-01-01 BC"),
        (DATE_FIELD, 19417, date(2023, 3, 1), "2023-03-01"),
        (MICROS_FIELD, 2**63 - 1, datetime(2299, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "infinity"),
        (MICROS_FIELD, -(2**63), datetime(1900, 1, 1, tzinfo=UTC), "-infinity"),
        (MICROS_FIELD, -62135596800000000, datetime(1900, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00"),
        (
            MICROS_FIELD,
            253402300799000000,
            datetime(2299, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
            "9999-12-31T23:59:59",
        ),  # fmt: skip
        (MILLIS_FIELD, 9223372036825200000, datetime(2299, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "infinity"),
        (MILLIS_FIELD, -9223372036832400000, datetime(1900, 1, 1, tzinfo=UTC), "-infinity"),
        (ZONED_FIELD, "infinity", datetime(2299, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "infinity"),
        (ZONED_FIELD, "-infinity", datetime(1900, 1, 1, tzinfo=UTC), "-infinity"),
        (
            ZONED_FIELD,
            "+294276-12-31T00:00:00.000000Z",
            datetime(2299, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
            "+294276-12-31T00:00:00.000000Z",
        ),  # fmt: skip
        (ZONED_FIELD, "-4712-01-01T00:00:00.000000Z", datetime(1900, 1, 1, tzinfo=UTC), "-4712-01-01T00:00:00.000000Z"),
        (ZONED_FIELD, "0001-01-01T00:00:00.000000Z", datetime(1900, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00.000000Z"),
    ],
)
def test_out_of_range_policies(field: dict[str, Any], value: Any, clamped: Any, text: str) -> None:
    heard: list[tuple[str, Any]] = []
    result = value_converter(field, "clamp", lambda column, v: heard.append((column, v)))(value)
    assert result == clamped
    in_range = clamped not in (date(1900, 1, 1), date(2299, 12, 31)) and not isinstance(clamped, datetime)
    assert [column for column, _ in heard] == ([] if in_range else [field["field"]])
    assert value_converter(field, "text")(value) == text
    assert clickhouse_type(field, "text") == "Nullable(String)"
    if not in_range:
        with pytest.raises(ValueConversionError):
            value_converter(field, "dlq")(value)


def test_split_identifiers_reads_clickhouse_formatted_keys() -> None:
    from cdc_pipeline.streaming.sink import split_identifiers

    assert split_identifiers("id") == ("id",)
    assert split_identifiers("Id, `a,b`, `x\\`y`") == ("Id", "a,b", "x`y")
    assert split_identifiers("toDate(ts), id") == ()
    assert split_identifiers("") == ()
    assert split_identifiers("(id)") == ("id",)
    assert split_identifiers("(`a b`, id)") == ("a b", "id")

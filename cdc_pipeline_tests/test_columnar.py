"""The column-wise conversion (streaming/columnar.py) against the row path it stands in for
(ChangeApplier._convert): every row it converts, the row path converts to the same values; every other
row is left to the row path. Pure pyarrow, no Spark and no ClickHouse."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc_pipeline.streaming import columnar
from cdc_pipeline.streaming.apply import ChangeApplier, RowError, _Schemas
from cdc_pipeline.streaming.batch import DECODED_COLUMNS, Change, changes
from cdc_pipeline.streaming.sink import ReplicaTable
from cdc_pipeline.streaming.types import ColumnSpec, columns_from_schema

TOPIC = "shop.public.orders"
VID, KID = 11, 22
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _field(name: str, kind: str, source: str, optional: bool, logical: str | None = None, **params: str) -> dict:
    field: dict[str, Any] = {
        "type": kind,
        "optional": optional,
        "field": name,
        "parameters": {"__debezium.source.column.type": source, **params},
    }
    if logical:
        field["name"] = logical
    return field


FIELDS = [
    _field("id", "int64", "INT8", False),
    _field("small", "int16", "INT2", True),
    _field("qty", "int32", "INT4", False),
    _field("flag", "boolean", "BOOL", True),
    _field("ratio", "double", "FLOAT8", True),
    _field("weight", "float", "FLOAT4", True),
    _field(
        "amount",
        "string",
        "NUMERIC",
        False,
        **{"__debezium.source.column.length": "12", "__debezium.source.column.scale": "2"},
    ),
    _field(
        "wide",
        "string",
        "NUMERIC",
        True,
        **{"__debezium.source.column.length": "50", "__debezium.source.column.scale": "10"},
    ),
    _field("free", "string", "NUMERIC", True),  # unconstrained numeric: text, "NAN" is "NaN"
    _field("note", "string", "TEXT", True),
    _field("doc", "string", "JSONB", True, "io.debezium.data.Json"),
    _field("mood", "string", "MOOD", True, "io.debezium.data.Enum"),
    _field("born", "int32", "DATE", True, "io.debezium.time.Date"),
    _field("seen", "int64", "TIMESTAMP", True, "io.debezium.time.MicroTimestamp"),
    _field("old", "int64", "TIMESTAMP", True, "io.debezium.time.Timestamp"),
    _field("at", "string", "TIMESTAMPTZ", False, "io.debezium.time.ZonedTimestamp"),
    _field("odd name é", "string", "TEXT", True),
]
KEY_FIELDS = [_field("id", "int64", "INT8", False)]
# A uuid column converts column-wise only for ClickHouse alone (`native`): clickhouse-connect takes its text.
UUID_FIELDS = [*FIELDS, _field("uid", "string", "UUID", True, "io.debezium.data.Uuid")]


def _schema(fields: list[dict]) -> dict:
    return {"type": "struct", "fields": [{"type": "struct", "fields": fields, "optional": True, "field": "after"}]}


def _specs(fields: list[dict], policy: str = "dlq") -> dict[str, ColumnSpec]:
    return {spec.name: spec for spec in columns_from_schema(_schema(fields), policy)}  # type: ignore[arg-type]


def _applier() -> ChangeApplier:
    applier = ChangeApplier.__new__(ChangeApplier)
    applier._clamp_context = (None, None)  # type: ignore[assignment]
    applier._on_clamp = lambda column, value: None  # type: ignore[method-assign]
    return applier


def _table(records: list[tuple[str, str, str]]) -> pa.Table:
    """Decoded rows from (op, key_json, after_json)."""
    rows = [
        Change(
            TOPIC, 0, offset, op, 1000 + offset, offset, key, after, None, VID, KID, 1_700_000_000_000 + offset, None
        )
        for offset, (op, key, after) in enumerate(records)
    ]
    return pa.table({name: [getattr(r, name) for r in rows] for name in DECODED_COLUMNS})


def _native(value: Any, spec_type: str) -> Any:
    """A value as clickhouse-connect writes it (see columnar.convert's `native`): dates and timestamps in
    the column's unit, a UUID (object or text) as its integer."""
    if isinstance(value, uuid.UUID):
        return value.int
    if isinstance(value, str) and "UUID" in spec_type:
        return int(value.replace("-", ""), 16)
    if isinstance(value, datetime):
        unit = timedelta(milliseconds=1) if spec_type.startswith("DateTime64(3") else timedelta(microseconds=1)
        return (value - EPOCH) // unit
    if isinstance(value, date):
        return (value - EPOCH.date()).days
    return value


def _compare(records: list[tuple[str, str, str]], value_specs: dict[str, ColumnSpec], *, native: bool) -> set[int]:
    """Convert column-wise and assert every converted row equals the row path's; the offsets converted."""
    table = _table(records)
    key_specs = _specs(KEY_FIELDS)
    block, left = columnar.convert(table, value_specs, key_specs, native=native)
    converted = set() if block is None else set(block.rows.column("offset").to_pylist())
    assert converted.isdisjoint(left.column("offset").to_pylist())
    assert len(converted) + left.num_rows == table.num_rows
    if block is None:
        return converted
    schemas = _Schemas(values={VID: value_specs}, keys={KID: key_specs})
    replica = ReplicaTable("db", "orders", ("id",))
    applier = _applier()
    types = [value_specs[n].clickhouse_type for n in block.names] + ["UInt128", "UInt8", "DateTime64(3, 'UTC')"]
    for change, values in zip(changes(block.rows), block.values(), strict=True):
        try:
            expected = applier._convert(change, replica, schemas)
        except RowError as exc:
            raise AssertionError(f"converted column-wise, but the row path dead-letters it: {exc}: {change}") from None
        assert not expected.missing, change
        row = dict(zip(expected.names, expected.values[: len(expected.names)], strict=True))
        want = [row[name] for name in block.names] + expected.values[len(expected.names) :]
        got = list(values)
        if native:
            want = [_native(v, t) for v, t in zip(want, types, strict=True)]
            got = [_native(v, t) for v, t in zip(got, types, strict=True)]
        assert got == want, change
        if not native:
            for got, exp in zip(values, want, strict=True):
                assert type(got) is type(exp), (got, exp, change)
    return converted


def _after(**overrides: Any) -> dict[str, Any]:
    after = {
        "id": 1, "small": -32768, "qty": 2_147_483_647, "flag": True, "ratio": 0.1, "weight": 1.5,
        "amount": "1234567890.12", "wide": "-12345678901234567890123456789012345678.0123456789", "free": "NAN",
        "note": 'quote " backslash \\ newline \n tab \t nul \u0000 "id": é 😀', "doc": '{"a": [1, 2]}',
        "mood": "ok", "born": -25567, "seen": 10_413_791_999_999_999, "old": -2_208_988_800_000,
        "at": "2026-01-01T00:00:05.5+05:30", "odd name é": "x",
    }  # fmt: skip
    after.update(overrides)
    return after


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _record(op: str = "r", key: Any = None, **overrides: Any) -> tuple[str, str, str]:
    after = _after(**overrides)
    return op, _dumps({"id": after["id"]} if key is None else key), _dumps(after)


@pytest.mark.parametrize("native", [False, True])
def test_ordinary_rows_are_converted_column_wise_exactly_as_the_row_path_does(native: bool) -> None:
    specs = _specs(FIELDS)
    assert columnar.supports(specs)
    records = [
        _record(id=1),
        _record("c", id=2, small=None, flag=None, ratio=None, wide=None, free="3.5", note=None, born=None, seen=None),
        _record("u", id=3, at="1900-01-01T00:00:00Z", born=120_529, amount="-0.01", weight=3, ratio=-0.0),
        _record("u", id=4, at="2299-12-31T23:59:59.999999Z", seen=-2_208_988_800_000_000, free="1e+5", doc="[]"),
    ]
    assert _compare(records, specs, native=native) == {0, 1, 2, 3}


def test_uuid_columns_are_converted_column_wise_for_clickhouse_alone() -> None:
    specs = _specs(UUID_FIELDS)
    assert columnar.supports(specs)
    records = [
        _record(id=1, uid="a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        _record(id=2, uid="A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A12"),
        _record(id=3, uid=None),
        _record(id=4, uid="{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}"),  # uuid.UUID reads it: the row path decides
        _record(id=5, uid="a0eebc999c0b4ef8bb6d6bb9bd380a11"),
        _record(id=6, uid="not a uuid"),
    ]
    assert _compare(records, specs, native=True) == {0, 1, 2}
    # The warehouse writes uuid.UUID objects: without `native` the row path converts such a schema.
    assert _compare(records, specs, native=False) == set()


def test_rows_the_row_path_must_decide_are_left_to_it() -> None:
    specs = _specs(FIELDS)
    records = [
        _record(id=1),
        _record("u", id=2, note="__debezium_unavailable_value"),  # an unchanged TOASTed value
        _record("r", id=3, note="__debezium_unavailable_value"),  # not an update: the text itself
        _record(id=4, qty=None),  # NULL in a NOT NULL column
        _record(id=5, born=-25568),  # 1899-12-31: out of range (the policy decides)
        _record(id=6, seen=10_413_792_000_000_000),  # 2300-01-01
        _record(id=7, at="2299-12-31T23:30:00-01:00"),  # in range as written, not in UTC
        _record(id=8, at="2026-01-01T00:00:05"),  # no zone
        _record(id=9, amount="1E+3"),  # not BigDecimal's plain notation
        _record(id=10, old=9_223_372_036_825_200_000),  # 'infinity' as Debezium sends a Timestamp
        ("r", _dumps({"id": 11}), _dumps({k: v for k, v in _after(id=11).items() if k != "note"})),  # field missing
        ("r", _dumps({}), _dumps(_after(id=12))),  # the key lacks its field
    ]
    assert _compare(records, specs, native=False) == {0, 2}


def test_a_value_arrow_cannot_read_with_the_schema_leaves_the_whole_group_to_the_row_path() -> None:
    specs = _specs(FIELDS)
    for bad in ({"qty": "5"}, {"qty": 1.0}, {"small": 40_000}, {"flag": 1}, {"note": 5}, {"ratio": "NaN"}):
        records = [_record(id=1), _record(id=2, **bad)]
        assert _compare(records, specs, native=False) == set(), bad
    extra = [_record(id=1), ("r", _dumps({"id": 2}), _dumps({**_after(id=2), "surprise": 1}))]
    assert _compare(extra, specs, native=False) == set()
    repeated = [_record(id=1), ("r", _dumps({"id": 2}), _dumps(_after(id=2))[:-1] + ',"qty":3}')]
    assert _compare(repeated, specs, native=False) == set()
    two = [_record(id=1), ("r", _dumps({"id": 2}), _dumps(_after(id=2)) + "\n" + _dumps(_after(id=3)))]
    assert _compare(two, specs, native=False) == set()
    not_object = [_record(id=1), ("r", _dumps({"id": 2}), "[1]")]
    assert _compare(not_object, specs, native=False) == set()
    # An image Spark took from a JSON string can hold any text: two objects on two lines beside an empty
    # image would have the right line count; each row must be one line.
    for first, second in (("\n", ""), ("\r", " ")):
        split = [
            ("r", _dumps({"id": 1}), _dumps(_after(id=1)) + first + _dumps(_after(id=2))),
            ("r", _dumps({"id": 2}), second),
        ]
        assert _compare(split, specs, native=False) == set()


def test_schemas_without_a_column_wise_conversion_are_not_supported() -> None:
    assert columnar.supports(_specs(FIELDS))
    for field in (
        _field("tags", "array", "_TEXT", True) | {"items": {"type": "string", "optional": True}},
        _field("raw", "bytes", "BYTEA", True),
        _field("t", "int64", "TIME", True, "io.debezium.time.MicroTime"),
        _field('say "hi"', "string", "TEXT", True),
        _field("back\\slash", "string", "TEXT", True),
    ):
        assert not columnar.supports(_specs([*FIELDS, field])), field
    # Dates stored as text (out-of-range policy "text") are converted by the row path.
    assert not columnar.supports(_specs(FIELDS, "text"))
    assert columnar.supports(_specs(FIELDS, "clamp"))


def test_out_of_range_values_under_the_clamp_policy_are_left_to_the_row_path() -> None:
    specs = _specs(FIELDS, "clamp")
    records = [_record(id=1), _record(id=2, born=-622_191_234), _record(id=3, at="0001-01-01T00:00:00Z")]
    assert _compare(records, specs, native=True) == {0}


# Per kind: values Debezium sends, and values it does not (wrong JSON types, out of range, malformed).
_VALID: dict[str, Any] = {
    "int": st.integers(-32768, 32767),
    "text": st.text(),
    "decimal": st.decimals(allow_nan=False, allow_infinity=False, places=2, min_value=-(10**9), max_value=10**9).map(
        str
    ),
    "days": st.integers(-25567, 120_529),
    "micros": st.integers(-2_208_988_800_000_000, 10_413_791_999_999_999),
    "zoned": st.datetimes(min_value=datetime(1900, 1, 2), max_value=datetime(2299, 12, 30), timezones=st.just(UTC)).map(
        lambda d: d.isoformat().replace("+00:00", "Z")
    ),
}
_NASTY: dict[str, Any] = {
    "int": st.one_of(st.integers(-(2**70), 2**70), st.booleans(), st.floats()),
    "text": st.one_of(st.just("__debezium_unavailable_value"), st.integers()),
    "decimal": st.sampled_from(
        ["NAN", "1E+3", "12345678901.12", "1.555", " 1.5", "-0", ".5", "__debezium_unavailable_value"]
    ),
    "days": st.one_of(st.integers(-(2**40), 2**40), st.sampled_from([-622_191_234, 2_146_033_979])),
    "micros": st.integers(-(2**63), 2**63 - 1),
    "zoned": st.one_of(
        st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)).map(
            lambda d: d.isoformat()
        ),
        st.sampled_from(["infinity", "2026-02-30T00:00:00Z", "2026-01-01T24:00:00Z", "2026-01-01T00:00:05.1234567Z"]),
    ),
}
_KIND_OF = {"small": "int", "qty": "int", "amount": "decimal", "note": "text", "born": "days", "seen": "micros",
            "old": "micros", "at": "zoned", "doc": "text"}  # fmt: skip


_VALID["uuid"] = st.uuids().map(str) | st.uuids().map(lambda u: str(u).upper())
_NASTY["uuid"] = st.uuids().map(lambda u: u.hex) | st.uuids().map(lambda u: "{" + str(u) + "}") | st.text()


@st.composite
def _records(draw: st.DrawFn, with_uuid: bool = False) -> list[tuple[str, str, str]]:
    records = []
    kinds = {**_KIND_OF, "uid": "uuid"} if with_uuid else _KIND_OF
    for i in range(draw(st.integers(1, 6))):
        overrides: dict[str, Any] = {"uid": str(uuid.UUID(int=i))} if with_uuid else {}
        for name, kind in kinds.items():
            roll = draw(st.integers(0, 19))
            if roll < 8:
                continue  # the default value
            overrides[name] = None if roll == 8 else draw(_NASTY[kind] if roll == 9 else _VALID[kind])
        records.append(_record(draw(st.sampled_from(["c", "r", "u"])), id=i, **overrides))
    return records


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_records(), st.booleans())
def test_whatever_the_values_a_row_converted_column_wise_equals_the_row_path(records: list, native: bool) -> None:
    _compare(records, _specs(FIELDS), native=native)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_records(with_uuid=True))
def test_whatever_the_uuids_a_row_converted_column_wise_equals_the_row_path(records: list) -> None:
    _compare(records, _specs(UUID_FIELDS), native=True)

"""The pipeline definition: the shipped `pipeline.yaml` loads, defaults derive from the name, and every
invalid key is reported by its dotted path in the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cdc_pipeline.config import (
    CONFIG_ENV_VAR,
    PipelineConfig,
    PipelineConfigError,
    default_config_path,
    load_pipeline_config,
    parse_pipeline_config,
)
from cdc_pipeline_tests.conftest import REPO_ROOT


def minimal(**overrides: Any) -> dict[str, Any]:
    return {"name": "shop", "tables": [{"name": "public.customers"}], **overrides}


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(PipelineConfigError) as excinfo:
        parse_pipeline_config(data)
    return str(excinfo.value)


def test_shipped_pipeline_yaml_loads() -> None:
    pipeline = load_pipeline_config(REPO_ROOT / "pipeline.yaml")
    assert pipeline.name == "shop"
    assert [t.name for t in pipeline.tables] == [
        "public.customers",
        "public.products",
        "public.orders",
        "public.order_items",
    ]
    assert pipeline.table("orders").partition_by == "toYYYYMM(created_at)"
    assert pipeline.table("public.order_items").primary_key == ["order_id", "line_no"]
    assert pipeline.topics() == [f"shop.public.{t}" for t in ("customers", "products", "orders", "order_items")]
    assert pipeline.source.heartbeat_table == "public.cdc_heartbeat"


def test_defaults_derive_from_the_name() -> None:
    pipeline = parse_pipeline_config(minimal(name="billing"))
    table = pipeline.tables[0]
    assert pipeline.topic_prefix == "billing"
    assert pipeline.slot_name == "cdc_billing"
    assert pipeline.publication_name == "cdc_billing"
    assert pipeline.dlq_topic == "billing.dlq"
    assert pipeline.consumer_group == "cdc-billing-stream"
    assert pipeline.query_name == "cdc_billing"
    assert pipeline.checkpoint_location(Path("/state")) == "/state/checkpoints/billing"
    assert pipeline.clickhouse_database("cdc") == "cdc"
    assert pipeline.signal_table_parts == ("public", "cdc_signal")
    assert pipeline.heartbeat_table_parts is None
    assert pipeline.stream.trigger_interval_ms == 1_000
    assert pipeline.topic_for(table) == "billing.public.customers"
    assert pipeline.sink_table(table) == "public_customers"


def test_explicit_values_override_the_defaults() -> None:
    pipeline = parse_pipeline_config(
        minimal(
            source={"topic_prefix": "src", "slot_name": "s1", "publication_name": "p1"},
            sink={"clickhouse": {"database": "replica", "table_name": "{table}"}},
            stream={"dlq_topic": "dead", "consumer_group": "g", "query_name": "q", "checkpoint_location": "s3a://b/c"},
        )
    )
    assert (pipeline.topic_prefix, pipeline.slot_name, pipeline.publication_name) == ("src", "s1", "p1")
    assert (pipeline.dlq_topic, pipeline.consumer_group, pipeline.query_name) == ("dead", "g", "q")
    assert pipeline.checkpoint_location(Path("/state")) == "s3a://b/c"
    assert pipeline.clickhouse_database("cdc") == "replica"
    assert pipeline.sink_table(pipeline.tables[0]) == "customers"
    assert pipeline.topics() == ["src.public.customers"]


def test_unqualified_table_names_take_the_first_schema_and_topics_map_back() -> None:
    pipeline = parse_pipeline_config(
        minimal(source={"schemas": ["sales", "public"]}, tables=[{"name": "orders"}, {"name": "public.orders"}])
    )
    assert [t.name for t in pipeline.tables] == ["sales.orders", "public.orders"]
    assert pipeline.table_for_topic("shop.sales.orders") is pipeline.tables[0]
    assert pipeline.table_for_topic("shop.public.orders") is pipeline.tables[1]
    assert pipeline.table_for_topic("shop.public.cdc_heartbeat") is None
    with pytest.raises(KeyError):
        pipeline.table("public.customers")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"name": "Shop", "tables": [{"name": "a"}]}, "pipeline.yaml: name: String should match pattern"),
        (minimal(tables=[]), "pipeline.yaml: tables: List should have at least 1 item"),
        (minimal(extra_key=1), "pipeline.yaml: extra_key: Extra inputs are not permitted"),
        (
            minimal(tables=[{"name": "a"}, {"name": "b"}, {"name": "c", "primary_key": []}]),
            "pipeline.yaml: tables[2].primary_key: List should have at least 1 item",
        ),
        (
            minimal(tables=[{"name": "a"}, {"name": "b", "primery_key": ["id"]}]),
            "pipeline.yaml: tables[1].primery_key: Extra inputs are not permitted",
        ),
        (
            minimal(tables=[{"name": "public.Orders"}]),
            "pipeline.yaml: tables[0].name: 'public.Orders': unquoted names fold to lower case in PostgreSQL, so "
            'Orders means orders; write public.orders for the lower-case name, or public."Orders" for the exact '
            "one (in YAML: 'public.\"Orders\"')",
        ),
        (
            minimal(tables=[{"name": "a"}, {"name": "public.a"}]),
            "pipeline.yaml: tables[1].name: public.a repeats tables[0]",
        ),
        (
            minimal(tables=[{"name": "sales.a"}]),
            "pipeline.yaml: tables[0].name: schema 'sales' is not in source.schemas",
        ),
        (
            minimal(tables=[{"name": "a", "clickhouse_table": "x"}, {"name": "b", "clickhouse_table": "x"}]),
            "pipeline.yaml: tables[1].clickhouse_table: x repeats tables[0]'s sink table",
        ),
        (
            minimal(tables=[{"name": "a", "columns": {"include": ["id"], "exclude": ["b"]}}]),
            "pipeline.yaml: tables[0].columns: set exactly one of 'include' or 'exclude'",
        ),
        (
            minimal(tables=[{"name": "a", "primary_key": ["id"], "columns": {"exclude": ["id"]}}]),
            "pipeline.yaml: tables[0].primary_key: ['id'] are filtered out by 'columns'",
        ),
        (
            minimal(tables=[{"name": "public.cdc_signal"}]),
            "pipeline.yaml: tables[0].name: public.cdc_signal is the signal or heartbeat table",
        ),
        (minimal(source={"slot_name": "Slot-1"}), "pipeline.yaml: source.slot_name: String should match pattern"),
        (
            minimal(source={"heartbeat_table": "heartbeat"}),
            "pipeline.yaml: source.heartbeat_table: 'heartbeat': expected schema.table",
        ),
        (
            minimal(sink={"clickhouse": {"table_name": "{db}_{table}"}}),
            "pipeline.yaml: sink.clickhouse.table_name: unknown placeholder(s) ['db']",
        ),
        (
            minimal(stream={"trigger_interval": "5 sec"}),
            "pipeline.yaml: stream.trigger_interval: '5 sec' is not '<N> milliseconds|seconds|minutes'",
        ),
        (
            minimal(stream={"max_offsets_per_trigger": 0}),
            "pipeline.yaml: stream.max_offsets_per_trigger: Input should be greater than 0",
        ),
        (
            minimal(stream={"starting_offsets": "beginning"}),
            "pipeline.yaml: stream.starting_offsets: Input should be 'earliest' or 'latest'",
        ),
    ],
)
def test_each_validation_error_names_its_key_path(data: dict[str, Any], expected: str) -> None:
    assert expected in error_of(data)


def test_every_error_is_reported_at_once() -> None:
    message = error_of(minimal(tables=[{"name": "a", "primary_key": []}], stream={"max_offsets_per_trigger": -1}))
    assert message.splitlines()[0].startswith("pipeline.yaml: tables[0].primary_key: ")
    assert message.splitlines()[1].startswith("pipeline.yaml: stream.max_offsets_per_trigger: ")


@pytest.mark.parametrize("interval", ["500 milliseconds", "1 second", "5 seconds", "2 minutes"])
def test_trigger_intervals_parse(interval: str) -> None:
    assert PipelineConfig.model_validate(minimal(stream={"trigger_interval": interval})).stream.trigger_interval_ms > 0


def test_read_parallelism_defaults_to_sparks_and_must_be_positive() -> None:
    assert PipelineConfig.model_validate(minimal()).stream.read_parallelism is None
    assert PipelineConfig.model_validate(minimal(stream={"read_parallelism": 4})).stream.read_parallelism == 4
    assert "stream.read_parallelism: " in error_of(minimal(stream={"read_parallelism": 0}))


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text("name: shop\ntables:\n  - name: [public.a\n")
    with pytest.raises(PipelineConfigError, match=rf"^{path}: invalid YAML: line 4, column 1: "):
        load_pipeline_config(path)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: shop\ntables:\n  - name: a\n    partition: toYYYYMM(ts)\n")
    with pytest.raises(PipelineConfigError, match=rf"^{path}: tables\[0\]\.partition: Extra inputs"):
        load_pipeline_config(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(PipelineConfigError, match=rf"^{path}: expected a mapping at the top level, got list"):
        load_pipeline_config(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(PipelineConfigError, match=rf"^{tmp_path / 'absent.yaml'}: file not found"):
        load_pipeline_config(tmp_path / "absent.yaml")


def test_config_path_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit, from_env = tmp_path / "explicit.yaml", tmp_path / "env.yaml"
    explicit.write_text("name: explicit\ntables: [{name: a}]\n")
    from_env.write_text("name: from_env\ntables: [{name: a}]\n")
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    assert default_config_path() == Path("pipeline.yaml")
    assert load_pipeline_config().name == "shop"
    monkeypatch.setenv(CONFIG_ENV_VAR, str(from_env))
    assert load_pipeline_config().name == "from_env"
    assert load_pipeline_config(explicit).name == "explicit"


def test_quoted_names_keep_their_exact_case_and_characters() -> None:
    pipeline = parse_pipeline_config(
        minimal(
            source={"schemas": ["public", '"Sales"'], "signal_table": '"Sales"."Signals"'},
            tables=[
                {
                    "name": 'public."User"',
                    "primary_key": ['"createdAt"', "id"],
                    "columns": {"exclude": ['"displayName"']},
                },
                {"name": '"Sales"."OrderItem"', "columns": {"include": ['"orderId"', '"line no"', "qty"]}},
                {"name": '"Order Items"'},  # unqualified: the first schema
                {"name": 'public."a.b"'},
                {"name": 'public."say ""hi"" now"'},
                {"name": "public.orders"},
            ],
        )
    )
    user, item, spaced, dotted, quoted, orders = pipeline.tables
    assert [(t.schema_name, t.table_name) for t in pipeline.tables] == [
        ("public", "User"),
        ("Sales", "OrderItem"),
        ("public", "Order Items"),
        ("public", "a.b"),
        ("public", 'say "hi" now'),
        ("public", "orders"),
    ]
    # One canonical spelling (SQL's), whatever the YAML said.
    assert [t.name for t in pipeline.tables] == [
        'public."User"',
        '"Sales"."OrderItem"',
        'public."Order Items"',
        'public."a.b"',
        'public."say ""hi"" now"',
        "public.orders",
    ]
    assert user.primary_key == ["createdAt", "id"]
    assert user.columns.exclude == ["displayName"]
    assert not user.columns.captures("displayName") and user.columns.captures("displayname")
    assert item.columns.include == ["orderId", "line no", "qty"]
    assert pipeline.source.schemas == ["public", "Sales"]
    assert pipeline.signal_table_parts == ("Sales", "Signals")
    # Debezium's names: topics keep the case, characters Kafka refuses become '_'.
    assert [pipeline.topic_for(t) for t in pipeline.tables] == [
        "shop.public.User",
        "shop.Sales.OrderItem",
        "shop.public.Order_Items",
        "shop.public.a.b",
        "shop.public.say__hi__now",
        "shop.public.orders",
    ]
    assert pipeline.table_for_topic("shop.public.User") is user
    assert user.collection_id == "public.User" and dotted.collection_id == "public.a.b"
    # ClickHouse: case kept, anything but letters, digits and '_' becomes '_'.
    assert [pipeline.sink_table(t) for t in pipeline.tables] == [
        "public_User",
        "Sales_OrderItem",
        "public_Order_Items",
        "public_a_b",
        "public_say__hi__now",
        "public_orders",
    ]
    # Lookups by the YAML spelling, or by Debezium's unquoted identifier.
    assert pipeline.table('public."User"') is user
    assert pipeline.table('"User"') is user
    assert pipeline.table("public.User") is user
    assert pipeline.table('"Sales"."OrderItem"') is item
    assert pipeline.table("orders") is orders
    with pytest.raises(KeyError):
        pipeline.table("public.user")
    assert (spaced, quoted) == (pipeline.tables[2], pipeline.tables[4])


def test_lower_case_names_read_the_same_quoted_or_not() -> None:
    pipeline = parse_pipeline_config(minimal(tables=[{"name": '"public"."customers"', "primary_key": ['"id"']}]))
    assert pipeline.tables[0].name == "public.customers"
    assert pipeline.tables[0].primary_key == ["id"]
    assert pipeline.topics() == ["shop.public.customers"]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            minimal(tables=[{"name": 'public."User'}]),
            "pipeline.yaml: tables[0].name: 'public.\"User': unterminated quoted name (close it with \")",
        ),
        (minimal(tables=[{"name": 'public.""'}]), "tables[0].name: 'public.\"\"': a quoted name cannot be empty"),
        (
            minimal(tables=[{"name": "public.order-items"}]),
            "tables[0].name: 'public.order-items': unexpected '-' at position 13: double-quote a name with characters "
            'other than a-z, 0-9 and _, e.g. "order-items" (in YAML: \'"order-items"\')',
        ),
        (
            minimal(tables=[{"name": '"User"s'}]),
            "tables[0].name: '\"User\"s': unexpected 's' at position 7: a quoted name ends at its closing quote",
        ),
        (
            minimal(tables=[{"name": "a.b.c"}]),
            "tables[0].name: 'a.b.c': expected at most 2 dot-separated names, e.g. schema.table",
        ),
        (
            minimal(tables=[{"name": "public.2fa"}]),
            "tables[0].name: 'public.2fa': an unquoted name cannot start with '2'; quote it: \"2fa\"",
        ),
        (
            minimal(tables=[{"name": '"' + "x" * 64 + '"'}]),
            "is longer than PostgreSQL's 63 bytes",
        ),
        (
            minimal(tables=[{"name": 'public."a,b"'}]),
            "tables[0].name: \"a,b\": Debezium cannot capture a name containing ','",
        ),
        (
            minimal(tables=[{"name": 'public."""x"'}]),
            "Debezium cannot capture a name that starts or ends with '\"'",
        ),
        (
            minimal(tables=[{"name": "a", "primary_key": ["createdAt"]}]),
            "pipeline.yaml: tables[0].primary_key[0]: 'createdAt': unquoted names fold to lower case in PostgreSQL, "
            'so createdAt means createdat; write createdat for the lower-case name, or "createdAt" for the exact '
            "one (in YAML: '\"createdAt\"')",
        ),
        (
            minimal(tables=[{"name": "a", "columns": {"exclude": ["password", "SSN"]}}]),
            "pipeline.yaml: tables[0].columns.exclude[1]: 'SSN': unquoted names fold to lower case",
        ),
        (
            minimal(source={"schemas": ["Sales"]}, tables=[{"name": "a"}]),
            "pipeline.yaml: source.schemas[0]: 'Sales': unquoted names fold to lower case",
        ),
        (
            minimal(tables=[{"name": '"Sales".a'}]),
            "pipeline.yaml: tables[0].name: schema 'Sales' is not in source.schemas (add it as '\"Sales\"')",
        ),
        (
            minimal(tables=[{"name": 'public."User"'}, {"name": '"User"'}]),
            'pipeline.yaml: tables[1].name: public."User" repeats tables[0]',
        ),
        (
            minimal(tables=[{"name": 'public."a b"'}, {"name": "public.a_b"}]),
            "pipeline.yaml: tables[1].name: public.a_b would be captured to topic shop.public.a_b, which collides "
            'with the topic of tables[0] public."a b"',
        ),
        (
            minimal(tables=[{"name": 'public."a.b"'}, {"name": "public.a_b"}]),
            'collides with the topic of tables[0] public."a.b" (Debezium replaces characters other than letters, '
            "digits, '.', '_' and '-' with '_', and Kafka treats '.' and '_' alike)",
        ),
        (
            minimal(
                tables=[
                    {"name": 'public."a-b"', "clickhouse_table": "x"},
                    {"name": 'public."a b"'},
                    {"name": 'public."A b"'},
                    {"name": 'public."a/b"'},
                ]
            ),  # fmt: skip
            "pipeline.yaml: tables[3].clickhouse_table: public_a_b repeats tables[1]'s sink table "
            "(set clickhouse_table to tell them apart)",
        ),
        (
            minimal(tables=[{"name": 'public."2fa"'}], sink={"clickhouse": {"table_name": "{table}"}}),
            "pipeline.yaml: tables[0].clickhouse_table: '2fa' is not a valid ClickHouse name "
            "([A-Za-z_][A-Za-z0-9_]*): set clickhouse_table",
        ),
        (
            minimal(source={"signal_table": 'public."cdc,signal"'}),
            "pipeline.yaml: source.signal_table: 'public.\"cdc,signal\"': Debezium cannot use a signal or heartbeat "
            "table with [','] in its name",
        ),
        (
            minimal(tables=[{"name": '"cdc_signal"'}]),
            "pipeline.yaml: tables[0].name: public.cdc_signal is the signal or heartbeat table",
        ),
    ],
)
def test_quoted_name_errors_say_what_to_write(data: dict[str, Any], expected: str) -> None:
    assert expected in error_of(data)

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
    assert pipeline.stream.trigger_interval_ms == 5_000
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
        (minimal(tables=[{"name": "public.Orders"}]), "pipeline.yaml: tables[0].name: String should match pattern"),
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
            "pipeline.yaml: source.heartbeat_table: String should match pattern",
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

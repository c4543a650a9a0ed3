"""`cdc-pipeline demo` end to end on the session's stack: it finds the stack running (and leaves it so),
creates a shop with a history in a schema of its own, provisions, streams, runs the live activity, and ends
with a summary in which every replica equals its source; it stops the stream it started, also on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from cdc_pipeline.control.stream import StreamController
from cdc_pipeline.demo.run import MATCH_LINE
from cdc_pipeline.settings import Settings
from cdc_pipeline.stack.lifecycle import LocalStack
from cdc_pipeline_tests.conftest import demo_argv, stop_process_group, wait_for

pytestmark = pytest.mark.integration


def _services_running(local_stack: LocalStack) -> list[str]:
    return sorted(local_stack.running())


def test_demo_runs_end_to_end_and_every_replica_matches(
    settings: Settings, local_stack: LocalStack, demo_name: str, tmp_path: Path
) -> None:
    before = _services_running(local_stack)
    # The session stack's settings are exported as CDC_* variables; the working directory has no `.env`.
    result = subprocess.run(
        demo_argv(demo_name, "--no-dagster", "--duration", "20"), cwd=tmp_path, env=dict(os.environ),
        capture_output=True, text=True, timeout=1700,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    assert MATCH_LINE in output, output[-8000:]
    for table in ("customers", "products", "orders", "order_items", "payments"):
        assert f"│ {table}" in output  # one summary row per replica table
    assert "MISMATCH" not in output
    assert "initial snapshot" in output and "where to look" in output
    # It stopped the stream it started, and none of the services it found running.
    controller = StreamController(settings.stack_dir.resolve() / "control", demo_name)
    assert not controller.status().running
    assert _services_running(local_stack) == before
    assert all(s.healthy for s in local_stack.status())


def test_ctrl_c_ends_the_demo_with_its_summary_and_stops_its_stream(
    settings: Settings, local_stack: LocalStack, demo_name: str, tmp_path: Path
) -> None:
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            demo_argv(demo_name, "--no-dagster"), cwd=tmp_path, env=dict(os.environ), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        controller = StreamController(settings.stack_dir.resolve() / "control", demo_name)
        wait_for(lambda: "where to look" in log_path.read_text(errors="replace"), 900, "the demo's live phase")
        assert controller.status().running
        time.sleep(5)  # some live activity
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends the terminal's foreground process
        process.wait(timeout=900)
    finally:
        stop_process_group(process)
    output = log_path.read_text(errors="replace")
    assert process.returncode == 0, output[-8000:]
    assert "Ctrl-C" in output and MATCH_LINE in output, output[-8000:]
    assert not controller.status().running
    assert all(s.healthy for s in local_stack.status())


def test_the_shops_money_is_exact_through_history_and_activity(source: psycopg.Connection, unique_name: str) -> None:
    """Every order's total is the sum of its lines, and every order past `new` has one payment of exactly
    its total (captured, or refunded when it was cancelled after payment)."""
    from cdc_pipeline.workload.shop import Shop, create_shop_schema

    create_shop_schema(source, unique_name)
    try:
        shop = Shop(unique_name, seed=7)
        shop.history(source, customers=30, products=20, orders=300)
        for _ in range(1500):
            shop.step(source)
        t = {name: sql.Identifier(unique_name, name) for name in ("orders", "order_items", "payments")}
        wrong_totals = source.execute(
            sql.SQL(
                "SELECT o.id FROM {orders} o LEFT JOIN {order_items} i ON i.order_id = o.id GROUP BY o.id, o.total "
                "HAVING o.total <> coalesce(sum(i.quantity * i.unit_price), 0) OR count(i.*) = 0"
            ).format(**t)
        ).fetchall()
        assert wrong_totals == []
        wrong_payments = source.execute(
            sql.SQL(
                "SELECT o.id, o.status, count(p.*), min(p.amount), min(o.total), string_agg(p.status, ',') "
                "FROM {orders} o LEFT JOIN {payments} p ON p.order_id = o.id GROUP BY o.id "
                "HAVING (o.status IN ('paid', 'shipped', 'delivered')"
                "        AND (count(p.*) <> 1 OR min(p.amount) <> min(o.total)"
                "             OR string_agg(p.status, ',') <> 'captured'))"
                "    OR (o.status = 'new' AND count(p.*) <> 0)"
                "    OR (o.status = 'cancelled' AND count(p.*) = 1 AND string_agg(p.status, ',') <> 'refunded')"
            ).format(**t)
        ).fetchall()
        assert wrong_payments == []
        statuses = dict(
            source.execute(sql.SQL("SELECT status, count(*) FROM {orders} GROUP BY 1").format(**t)).fetchall()
        )
        assert set(statuses) == {"new", "paid", "shipped", "delivered", "cancelled"}
    finally:
        source.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(unique_name)))


def test_the_demos_dagster_gets_the_control_plane_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dagster runs with the demo's own settings (crons, thresholds, webhook), not the defaults: the demo
    drops the caller's CDC_* variables from Dagster's environment and passes its settings instead."""
    from cdc_pipeline.demo.dagster import dagster_env

    monkeypatch.setenv("CDC_CHECKS_CRON", "* * * * *")
    monkeypatch.setenv("CDC_UNRELATED_LEFTOVER", "x")
    settings = Settings(
        _env_file=None, observe_cron="*/2 * * * *", lag_threshold=7, alert_webhook_url="https://hooks.example/T/1"
    )
    env = dagster_env(settings, tmp_path / "shop.yaml", tmp_path / "home")
    assert env["CDC_CHECKS_CRON"] == "* * * * *" and env["CDC_OBSERVE_CRON"] == "*/2 * * * *"
    assert env["CDC_LAG_THRESHOLD"] == "7" and env["CDC_ALERT_WEBHOOK_URL"] == "https://hooks.example/T/1"
    assert "CDC_UNRELATED_LEFTOVER" not in env
    assert env["CDC_PIPELINE_CONFIG"] == str((tmp_path / "shop.yaml").resolve())
    monkeypatch.delenv("CDC_CHECKS_CRON")
    for key, value in env.items():  # the child's Settings() equals the demo's
        if key.startswith("CDC_"):
            monkeypatch.setenv(key, value)
    child = Settings(_env_file=None)
    assert (child.checks_cron, child.observe_cron, child.lag_threshold) == ("* * * * *", "*/2 * * * *", 7)


def test_stopping_the_demos_dagster_leaves_nothing_of_its_group(tmp_path: Path) -> None:
    """A member of Dagster's process group that outlives `dg dev` (as a code server once did) is killed."""
    from cdc_pipeline.demo.dagster import DagsterProcess, _group_alive

    ready = tmp_path / "ignoring-sigterm"
    process = subprocess.Popen(
        ["bash", "-c", f"(trap '' TERM; touch {ready}; exec sleep 300) & wait"], start_new_session=True,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for(ready.exists, 30, "the member that ignores SIGTERM")
    DagsterProcess(process, "http://127.0.0.1:1", tmp_path / "log").stop(timeout=10)
    wait_for(lambda: not _group_alive(process.pid), 30, "every member of the group to end")

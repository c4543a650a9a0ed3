"""The Dagster UI in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright over the
DevTools protocol) opens the UI that `dagster dev` serves against the test stack, finds the pipeline's
assets in the catalog, launches `check_services` from the Launchpad and sees the run succeed.

Chromium is started by this test (not by Playwright, which downloads no browser here) in its own
process group, so it is stopped with `stop_process_group` like `dagster dev`, also on failure."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from playwright.sync_api import Page, sync_playwright

from cdc_pipeline.demo.run import MATCH_LINE
from cdc_pipeline.process import port_open
from cdc_pipeline.stack.lifecycle import LocalStack
from cdc_pipeline_tests.conftest import dagster_dev_server, demo_argv, free_ports, stop_process_group, wait_for

pytestmark = pytest.mark.integration

LOCATION = "cdc_pipeline"  # workspace.yaml's location_name
JOB = "check_services"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # tests run as root in CI
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--remote-debugging-port=0",  # Chromium picks a free port and writes it to DevToolsActivePort
]
RUN_ID = re.compile(r"/runs/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")
# The run page's status tag: the final states of a run as the UI names them.
RUN_FINAL_STATUS = re.compile(r"^(Success|Failure|Canceled)$")


def graphql(url: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    response = requests.post(f"{url}/graphql", json={"query": query, "variables": variables or {}}, timeout=30)
    response.raise_for_status()
    body = response.json()
    assert not body.get("errors"), body["errors"]
    return body["data"]


def log_tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} does not exist)"


def wait_for_job(url: str, job: str, log: Path, timeout: float = 300) -> None:
    """Until the webserver answers and the code location is loaded with `job`."""
    query = "{ repositoriesOrError { ... on RepositoryConnection { nodes { name jobs { name } } } } }"
    deadline = time.monotonic() + timeout
    jobs: list[str] = []
    while time.monotonic() < deadline:
        try:
            nodes = graphql(url, query)["repositoriesOrError"].get("nodes", [])
            jobs = [j["name"] for node in nodes for j in node["jobs"]]
        except (requests.RequestException, ValueError, KeyError, TypeError, AssertionError):
            pass
        if job in jobs:
            return
        time.sleep(2)
    pytest.fail(f"dagster dev did not serve job {job!r} within {timeout:.0f}s (jobs: {jobs}); log:\n{log_tail(log)}")


def asset_key_paths(url: str) -> list[list[str]]:
    return [node["assetKey"]["path"] for node in graphql(url, "{ assetNodes { assetKey { path } } }")["assetNodes"]]


def run_messages(url: str, run_id: str, limit: int = 30) -> str:
    """The last event messages of a run, for a failure message."""
    query = """query ($runId: ID!) { logsForRun(runId: $runId) {
        __typename ... on EventConnection { events { __typename ... on MessageEvent { message } } } } }"""
    try:
        events = graphql(url, query, {"runId": run_id})["logsForRun"].get("events", [])
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        return f"(run events unavailable: {exc})"
    return "\n".join(f"{e['__typename']}: {e.get('message', '')}" for e in events[-limit:])


def assert_assets_visible(page: Page, url: str, asset_paths: list[list[str]], timeout: float = 180) -> None:
    """Each asset key (a path, e.g. ["clickhouse", "cdc", "orders"]) is listed in the UI's asset catalog.

    The catalog shows a key as its path joined by " / " in the `title` of the asset's link (the
    visible text may be middle-truncated), and renders only the rows near the viewport, so the list
    is scrolled to its end while collecting the names. The page is loaded again until `timeout` in
    case the catalog was rendered before the code location finished loading."""
    expected = {" / ".join(path) for path in asset_paths}
    names = page.locator("a[href^='/assets/'] [title]")
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while True:
        page.goto(f"{url}/assets")
        names.first.wait_for()
        unchanged = 0
        while not expected <= seen and unchanged < 5:
            rendered = set(names.evaluate_all("els => els.filter(e => e.checkVisibility()).map(e => e.title)"))
            unchanged = 0 if rendered - seen else unchanged + 1
            seen |= rendered
            names.last.scroll_into_view_if_needed()
            page.wait_for_timeout(300)  # let the virtualized list render the next rows
        if expected <= seen or time.monotonic() + 5 > deadline:
            break
        time.sleep(5)
    missing = sorted(expected - seen)
    assert not missing, f"assets not in the UI's catalog: {missing}; listed: {sorted(seen)}"


def assert_assets_in_lineage_graph(page: Page, url: str, asset_paths: list[list[str]]) -> None:
    """The global lineage graph draws the pipeline's groups (source -> capture -> streaming -> sink),
    and a group's graph draws its assets by name."""
    groups = graphql(url, "{ assetNodes { groupName } }")["assetNodes"]
    names = sorted({node["groupName"] for node in groups})
    page.goto(f"{url}/asset-groups")
    for group in names:
        page.get_by_text(group, exact=True).first.wait_for(timeout=180_000)
    streaming = next(group for group in names if group.endswith("_streaming"))
    page.goto(f"{url}/locations/{LOCATION}/asset-groups/{streaming}")
    page.get_by_text("streaming_query", exact=True).first.wait_for(timeout=180_000)
    sink = next(group for group in names if group.endswith("_sink"))
    page.goto(f"{url}/locations/{LOCATION}/asset-groups/{sink}")
    tables = sorted(path[-1] for path in asset_paths if len(path) > 2 and path[-2] == "clickhouse")
    for table in tables:
        page.get_by_text(table, exact=True).first.wait_for(timeout=60_000)


@pytest.fixture
def dagster_dev_on_stack(local_stack: LocalStack, tmp_path: Path) -> Iterator[str]:
    """`dagster dev` with the session stack's environment (exported by `stack_env`), so runs reach it."""
    with dagster_dev_server(tmp_path) as url:
        wait_for_job(url, JOB, tmp_path / "dagster-dev.log")
        yield url


def _devtools_endpoint(process: subprocess.Popen, profile: Path, log: Path, timeout: float = 120) -> str:
    active_port = profile / "DevToolsActivePort"  # "<port>\n/devtools/browser/<id>\n" once it listens
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = active_port.read_text().split() if active_port.exists() else []
        if len(lines) >= 2:
            return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
        if process.poll() is not None:
            break
        time.sleep(0.5)
    pytest.fail(f"Chromium did not open its DevTools port (exit code {process.poll()}); log:\n{log_tail(log)}")


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[Page]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Chromium is not installed: run scripts/setup.sh (Debian package `chromium`)")
    profile = tmp_path / "chromium-profile"
    log_path = tmp_path / "chromium.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed in the finally below
    process = subprocess.Popen(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the browser, renderer and GPU processes stop together
    )
    try:
        endpoint = _devtools_endpoint(process, profile, log_path)
        with sync_playwright() as playwright:
            browser = playwright.chromium.connect_over_cdp(endpoint, timeout=120_000)
            try:
                context = browser.new_context(viewport={"width": 1600, "height": 1000})
                context.set_default_timeout(120_000)
                context.set_default_navigation_timeout(120_000)
                yield context.new_page()
            finally:
                browser.close()
    finally:
        stop_process_group(process, timeout=30)
        log.close()


@contextmanager
def screenshot_on_failure(page: Page, tmp_path: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        shot = tmp_path / "failure.png"
        try:
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot of the page at the failure ({page.url}): {shot}")
        except Exception as exc:  # noqa: BLE001 - the original failure matters
            print(f"no screenshot: {exc}")
        raise


def test_ui_shows_assets_and_runs_check_services(dagster_dev_on_stack: str, browser_page: Page, tmp_path: Path) -> None:
    url, page = dagster_dev_on_stack, browser_page
    # The first visit from localhost opens a "Join the Dagster community" dialog over the page; mark it
    # seen for this instance, and should it appear anyway, dismiss it before it intercepts a click.
    graphql(url, "mutation { setNuxSeen }")
    page.add_locator_handler(
        page.get_by_text("Join the Dagster community"), lambda: page.get_by_role("button", name="Skip").click()
    )

    with screenshot_on_failure(page, tmp_path):
        asset_paths = asset_key_paths(url)
        assert asset_paths, "the code location defines no assets"
        assert_assets_visible(page, url, asset_paths)
        print(f"{len(asset_paths)} assets listed in the UI's catalog")
        assert_assets_in_lineage_graph(page, url, asset_paths)

        page.goto(f"{url}/locations/{LOCATION}/jobs/{JOB}/playground")
        launch = page.get_by_role("button", name="Launch Run")
        launch.wait_for()
        launch.click()
        page.wait_for_url(RUN_ID)
        run_id = RUN_ID.search(page.url).group(1)

        status = page.get_by_text(RUN_FINAL_STATUS).first
        status.wait_for(timeout=600_000)
        assert status.inner_text().strip() == "Success", (
            f"run {run_id} of {JOB} ended as {status.inner_text()!r} in the UI; events:\n"
            f"{run_messages(url, run_id)}\n--- dagster dev log:\n{log_tail(tmp_path / 'dagster-dev.log')}"
        )
        run_query = "query ($id: ID!) { runOrError(runId: $id) { ... on Run { status jobName } } }"
        assert graphql(url, run_query, {"id": run_id})["runOrError"] == {"status": "SUCCESS", "jobName": JOB}


# The README's picture. A run writes its screenshot to its tmp_path (no diff in git on every run); with
# CDC_UPDATE_SCREENSHOT=1 it writes it here instead, to refresh the README.
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "demo-asset-graph.png"
# The demo's Dagster runs the checks and observes the sources every minute (its settings reach Dagster),
# so the test sees them evaluated by the daemon without launching anything.
AUTOMATION_ENV = {"CDC_CHECKS_CRON": "* * * * *", "CDC_OBSERVE_CRON": "* * * * *"}
CHECKS_SENSOR = "replica_checks_automation"  # prefixed with the pipeline when a location holds several
# Numeric metadata of the stream's observations: the stream_metrics and consumer_lag sensors' ones.
STREAM_PLOTS = ("applied_rows", "num_input_rows", "total_lag")


def screenshot_path(tmp_path: Path) -> Path:
    return SCREENSHOT if os.environ.get("CDC_UPDATE_SCREENSHOT") == "1" else tmp_path / SCREENSHOT.name


def save_expanded_asset_graph(page: Page, url: str, groups: list[str], path: Path) -> None:
    """The global lineage graph with every group expanded (a click on a group's node expands it; the UI
    keeps that in the browser's storage and fits the graph to the page when it loads), saved at `path`."""
    page.goto(f"{url}/asset-groups")
    page.get_by_role("button", name="Hide navigation").click()  # more room for the graph
    for group in groups:
        page.goto(f"{url}/asset-groups")
        page.get_by_text(groups[-1], exact=True).first.wait_for(timeout=180_000)
        page.wait_for_timeout(1500)  # the layout settles
        in_graph = [  # the group's node, not its entry in the list of groups left of the graph
            element for element in page.get_by_text(group, exact=True).all()
            if element.is_visible() and (box := element.bounding_box()) and box["x"] > 380
        ]  # fmt: skip
        assert in_graph, f"group {group} is not drawn in the lineage graph"
        in_graph[0].click()
        page.wait_for_timeout(1000)
    page.goto(f"{url}/asset-groups")
    page.get_by_text("streaming_query", exact=True).first.wait_for(timeout=180_000)
    page.wait_for_timeout(3000)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path))
    print(f"asset graph screenshot: {path}")


def replica_checks(url: str) -> dict[tuple[str, ...], list[str]]:
    """The replica assets (key path) and their checks' names, as the code location defines them."""
    query = "{ assetNodes { assetKey { path } assetChecksOrError { ... on AssetChecks { checks { name } } } } }"
    found: dict[tuple[str, ...], list[str]] = {}
    for node in graphql(url, query)["assetNodes"]:
        names = [c["name"] for c in (node["assetChecksOrError"] or {}).get("checks", [])]
        if "row_count_matches_source" in names:
            found[tuple(node["assetKey"]["path"])] = sorted(names)
    return found


CHECK_EXECUTIONS = """query ($key: AssetKeyInput!, $check: String!) {
    assetCheckExecutions(assetKey: $key, checkName: $check, limit: 20) {
        runId status evaluation { severity description } run { tags { key value } } } }"""


def automated_check_results(url: str, checks: dict[tuple[str, ...], list[str]]) -> dict[str, str]:
    """Per `asset/check`, the status of the newest execution the automation sensor launched and that
    ended (SUCCEEDED, FAILED, EXECUTION_FAILED), or "missing"."""
    results: dict[str, str] = {}
    for path, names in checks.items():
        for name in names:
            executions = graphql(url, CHECK_EXECUTIONS, {"key": {"path": list(path)}, "check": name})
            status = "missing"
            for execution in executions["assetCheckExecutions"]:
                tags = {t["key"]: t["value"] for t in (execution["run"] or {}).get("tags", [])}
                sensor = tags.get("dagster/sensor_name", "")
                if sensor.endswith(CHECKS_SENSOR) and execution["status"] != "IN_PROGRESS":
                    status = execution["status"]
                    break
            results[f"{'/'.join(path)}:{name}"] = status
    return results


def launched_by_hand(url: str) -> list[str]:
    """Runs no sensor or schedule launched (the test launches none; the demo only its stream, outside Dagster)."""
    query = "{ runsOrError { ... on Runs { results { runId jobName tags { key value } } } } }"
    runs = graphql(url, query)["runsOrError"]["results"]
    automatic = ("dagster/sensor_name", "dagster/schedule_name", "dagster/auto_materialize", "dagster/backfill")
    return [
        f"{run['jobName']} {run['runId']}" for run in runs if not any(tag["key"] in automatic for tag in run["tags"])
    ]


def stream_observations(url: str, path: list[str]) -> dict[str, int]:
    """Per plotted metadata key, how many observations of the stream's asset carry it."""
    query = """query ($key: AssetKeyInput!) { assetOrError(assetKey: $key) {
        ... on Asset { assetObservations(limit: 100) { metadataEntries { label } } } } }"""
    observations = graphql(url, query, {"key": {"path": path}})["assetOrError"].get("assetObservations") or []
    labels = [{e["label"] for e in o["metadataEntries"]} for o in observations]
    return {label: sum(label in found for found in labels) for label in STREAM_PLOTS}


def assert_stream_observations_plotted(page: Page, url: str, path: list[str]) -> None:
    """The stream asset's page plots its observations' numeric metadata over time: once each key has been
    observed at least twice, the Metadata section's "Plots" view draws one chart (a canvas under the
    label) per metadata key."""
    counts: dict[str, int] = {}

    def observed_twice() -> bool:
        counts.update(stream_observations(url, path))
        return min(counts.values()) >= 2

    try:
        wait_for(observed_twice, 600, f"observations of {'/'.join(path)} by its sensors", 5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {counts}") from None
    page.goto(f"{url}/assets/{'/'.join(path)}")
    plots = page.get_by_role("button", name="Plots")
    plots.first.wait_for(timeout=180_000)
    plots.first.click()
    for label in STREAM_PLOTS:
        heading = page.get_by_text(label, exact=True).first
        heading.wait_for(timeout=180_000)
        chart = heading.locator("xpath=ancestor::div[.//canvas][1]//canvas").first
        chart.wait_for(timeout=60_000)
        box = chart.bounding_box()
        assert box and box["width"] > 50 and box["height"] > 20, f"the plot of {label} is not drawn: {box}"


# How the checks tab's execution history names the result of an evaluation.
UI_RESULT = {"SUCCEEDED": "Passed", "FAILED": "Failed", "EXECUTION_FAILED": "Execution failed"}


def assert_checks_evaluated_in_ui(page: Page, url: str, path: tuple[str, ...], results: dict[str, str]) -> None:
    """The replica's Checks tab lists each check, and its execution history shows the automation's
    evaluation with its result (the latest one is often still running: the cron ticks every minute)."""
    asset = "/".join(path)
    for name in sorted(results):
        page.goto(f"{url}/assets/{asset}?view=checks&checkDetail={name}")
        page.get_by_text(name, exact=True).first.wait_for(timeout=180_000)
        page.get_by_text("Execution history", exact=True).first.click()
        page.get_by_text("Evaluation result", exact=True).first.wait_for(timeout=180_000)
        result = page.get_by_text(UI_RESULT[results[name]], exact=True).first
        result.wait_for(timeout=180_000)
        assert result.is_visible(), f"{asset}:{name}: no {UI_RESULT[results[name]]!r} in its execution history"


def test_the_demo_serves_dagster_with_the_pipelines_asset_graph(
    demo_name: str, browser_page: Page, tmp_path: Path
) -> None:
    """`cdc-pipeline demo` starts Dagster (webserver + daemon) for its pipeline, and nobody launches anything:
    the UI it prints plots the stream's observations, shows every replica check evaluated by the automation
    (each one passed) and draws the pipeline's asset graph (the README's screenshot); Ctrl-C ends the demo
    with its summary and stops Dagster."""
    (port,) = free_ports(1)
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as log:
        # Pipeline `shop` (the README's names) over a schema and database of the test's own.
        process = subprocess.Popen(
            demo_argv(demo_name, "--dagster-port", str(port), name="shop"), cwd=tmp_path,
            env=dict(os.environ, **AUTOMATION_ENV), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    page = browser_page
    try:
        wait_for(lambda: "where to look" in log_tail(log_path, 100_000), 900, "the demo's live phase")
        found = re.search(r"Dagster:\s+(http://\S+)", log_tail(log_path, 100_000))
        assert found, log_tail(log_path)
        url = found.group(1)
        assert url == f"http://127.0.0.1:{port}"
        wait_for_job(url, JOB, log_path)
        graphql(url, "mutation { setNuxSeen }")
        page.add_locator_handler(
            page.get_by_text("Join the Dagster community"), lambda: page.get_by_role("button", name="Skip").click()
        )
        with screenshot_on_failure(page, tmp_path):
            paths = asset_key_paths(url)
            assert ["shop", "streaming_query"] in paths and ["shop", "clickhouse", "payments"] in paths, paths
            assert_stream_observations_plotted(page, url, ["shop", "streaming_query"])
            page.screenshot(path=str(tmp_path / "stream-plots.png"), full_page=True)

            checks = replica_checks(url)
            assert ("shop", "clickhouse", "payments") in checks, checks
            results: dict[str, str] = {}

            def every_check_evaluated() -> bool:
                results.update(automated_check_results(url, checks))
                return "missing" not in results.values()

            try:
                wait_for(every_check_evaluated, 900, "every replica check evaluated by the automation sensor", 10)
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {results}; demo log:\n{log_tail(log_path)}") from None
            failed = {check: status for check, status in results.items() if status != "SUCCEEDED"}
            assert not failed, f"checks evaluated by the automation did not pass: {failed}"
            for path in checks:
                asset = "/".join(path)
                evaluated = {k.split(":")[1]: v for k, v in results.items() if k.split(":")[0] == asset}
                assert_checks_evaluated_in_ui(page, url, path, evaluated)
            assert not launched_by_hand(url), launched_by_hand(url)

            save_expanded_asset_graph(
                page, url, ["shop_source", "shop_capture", "shop_streaming", "shop_sink"], screenshot_path(tmp_path)
            )
        process.send_signal(signal.SIGINT)
        process.wait(timeout=900)
    finally:
        stop_process_group(process)
    output = log_tail(log_path, 100_000)
    assert process.returncode == 0 and MATCH_LINE in output, output[-8000:]
    assert "stopping Dagster" in output
    wait_for(lambda: not port_open("127.0.0.1", port), 120, "Dagster's port to close")

"""The chDB-backed ClickHouse HTTP endpoint, exercised only through clickhouse-connect (and raw
HTTP for protocol details), the way the product talks to ClickHouse."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import clickhouse_connect
import pandas as pd
import pytest
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError
from clickhouse_connect.driver.summary import QuerySummary

from cdc_pipeline_tests.conftest import wait_for

pytestmark = pytest.mark.integration

PASSWORD_ENV = "CDC_TEST_ENDPOINT_PASSWORD"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


ENDPOINT_PASSWORD = "s3cret-pw"


@contextmanager
def _endpoint(data_dir: Path, password: str = ENDPOINT_PASSWORD) -> Iterator[str]:
    """Run the endpoint as a subprocess until the block exits; yields its base URL."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != PASSWORD_ENV}
    env[PASSWORD_ENV] = password
    log_path = data_dir.parent / f"{data_dir.name}-{port}.log"
    argv = [
        sys.executable, "-m", "cdc_pipeline.stack.clickhouse_local",
        "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir),
        "--password-env", PASSWORD_ENV,
    ]  # fmt: skip
    # A log file, not a pipe: nobody reads the pipe, and a full pipe would block the server.
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(process, port, log_path)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, log_path.read_text()


def _wait_ready(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"endpoint exited early:\n{log_path.read_text()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/ping")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"endpoint not ready after 60s:\n{log_path.read_text()}")


def _client(url: str, **kwargs: object) -> Client:
    """A client of `url` with the test stack's password unless `password` is given."""
    kwargs.setdefault("password", os.environ.get("CDC_CLICKHOUSE_PASSWORD", ""))
    return clickhouse_connect.get_client(dsn=url, **kwargs)


@pytest.fixture
def database(clickhouse_url: str) -> Iterator[str]:
    """A fresh database, dropped afterwards."""
    name = f"endpoint_{uuid.uuid4().hex[:10]}"
    client = _client(clickhouse_url)
    client.command(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        client.command(f"DROP DATABASE IF EXISTS {name}")
        client.close()


def _create_cdc_table(client: Client, table: str) -> None:
    client.command(
        f"CREATE TABLE {table} (id Int64, name String, _version UInt64, _is_deleted UInt8) "
        "ENGINE = ReplacingMergeTree(_version, _is_deleted) ORDER BY id"
    )


CDC_COLUMNS = ["id", "name", "_version", "_is_deleted"]


def test_connect_reports_a_clickhouse_26_server(clickhouse_url: str) -> None:
    client = _client(clickhouse_url)
    assert client.server_version is not None
    assert client.server_version.startswith("26.")
    assert str(client.server_tz) == "UTC"
    assert client.ping()
    assert client.command("SELECT version()") == client.server_version


@pytest.mark.parametrize("compress", [False, "lz4", "zstd"])
def test_insert_rows(clickhouse_url: str, database: str, compress: bool | str) -> None:
    client = _client(clickhouse_url, compress=compress)
    table = f"{database}.rows"
    _create_cdc_table(client, table)
    rows = [[i, f"name-{i}-é", 1, 0] for i in range(1, 2001)]
    summary = client.insert(table, rows, column_names=CDC_COLUMNS)
    assert summary.written_rows == 2000
    assert client.command(f"SELECT count() FROM {table}") == 2000
    assert client.query(f"SELECT name FROM {table} WHERE id = 7").result_rows == [("name-7-é",)]


def test_final_keeps_latest_version_and_hides_deletes(clickhouse_url: str, database: str) -> None:
    client = _client(clickhouse_url)
    table = f"{database}.versions"
    _create_cdc_table(client, table)
    client.insert(table, [[1, "a", 1, 0], [2, "b", 1, 0], [3, "c", 1, 0]], column_names=CDC_COLUMNS)
    client.insert(table, [[1, "a2", 2, 0], [2, "b", 2, 1]], column_names=CDC_COLUMNS)
    client.insert(table, [[3, "stale", 0, 0]], column_names=CDC_COLUMNS)
    result = client.query(f"SELECT id, name, _version FROM {table} FINAL ORDER BY id")
    assert result.result_rows == [(1, "a2", 2), (3, "c", 1)]
    assert client.command(f"SELECT count() FROM {table}") == 6


@pytest.mark.parametrize("compress", [False, "lz4", "zstd"])
def test_insert_df_round_trips_types(clickhouse_url: str, database: str, compress: bool | str) -> None:
    client = _client(clickhouse_url, compress=compress)
    table = f"{database}.typed"
    client.command(
        f"CREATE TABLE {table} (id Int64, qty Nullable(Int64), price Decimal(38, 9), "
        "big Decimal(76, 20), ts DateTime64(6, 'UTC'), label String, tags Array(Int64), "
        "uid UUID, active Bool, note Nullable(String)) ENGINE = MergeTree ORDER BY id"
    )
    uid = uuid.uuid4()
    big = Decimal("12345678901234567890123456789012345678901234567890.12345678901234567890")
    df = pd.DataFrame(
        {
            "id": [1, 2],
            "qty": pd.array([5, None], dtype="Int64"),
            "price": [Decimal("1.123456789"), Decimal("-99999999999999999999999999999.999999999")],
            "big": [big, Decimal("-1.5")],
            "ts": pd.to_datetime(["2024-01-01 00:00:00.123456", "1999-12-31 23:59:59.999999"]),
            "label": ["héllo wörld ✓", "日本語"],
            "tags": [[1, -(2**63)], []],
            "uid": [uid, uuid.UUID(int=0)],
            "active": [True, False],
            "note": ["x", None],
        }
    )
    df["ts"] = df["ts"].dt.tz_localize("UTC")
    assert client.insert_df(table, df).written_rows == 2

    out = client.query_df(f"SELECT * FROM {table} ORDER BY id")
    assert out["id"].tolist() == [1, 2]
    assert out["qty"].iloc[0] == 5 and pd.isna(out["qty"].iloc[1])
    assert out["price"].tolist() == df["price"].tolist()
    assert out["big"].tolist() == [big, Decimal("-1.5")]
    assert out["ts"].tolist() == [
        pd.Timestamp("2024-01-01 00:00:00.123456"),
        pd.Timestamp("1999-12-31 23:59:59.999999"),
    ]
    assert out["label"].tolist() == ["héllo wörld ✓", "日本語"]
    assert [list(tags) for tags in out["tags"]] == [[1, -(2**63)], []]
    assert out["uid"].tolist() == [uid, uuid.UUID(int=0)]
    assert out["active"].tolist() == [True, False]
    assert out["note"].iloc[0] == "x" and pd.isna(out["note"].iloc[1])


def test_server_side_parameters(clickhouse_url: str, database: str) -> None:
    client = _client(clickhouse_url)
    table = f"{database}.params"
    _create_cdc_table(client, table)
    client.insert(table, [[i, f"n{i}", 1, 0] for i in range(10)], column_names=CDC_COLUMNS)
    result = client.query(
        f"SELECT id FROM {table} WHERE id > {{low:Int64}} AND name != {{skip:String}} ORDER BY id",
        parameters={"low": 6, "skip": "n8"},
    )
    assert result.result_rows == [(7,), (9,)]
    text = "it's a\ttab \\ and ünïcode"
    assert client.query("SELECT {s:String}", parameters={"s": text}).result_rows == [(text,)]
    stamp = datetime(2024, 5, 6, 7, 8, 9)
    assert client.query("SELECT {t:DateTime}", parameters={"t": stamp}).result_rows == [(stamp,)]
    # Over 4 KiB of parameters, clickhouse-connect switches to a multipart/form-data request.
    ids = list(range(100_000, 101_500))
    result = client.query(
        "SELECT count() FROM numbers(100000, 5000) WHERE number IN {ids:Array(UInt64)}",
        parameters={"ids": ids},
    )
    assert result.result_rows == [(1500,)]


def test_command(clickhouse_url: str, database: str) -> None:
    client = _client(clickhouse_url)
    table = f"{database}.commands"
    created = client.command(f"CREATE TABLE {table} (id Int64, name String) ENGINE = MergeTree ORDER BY id")
    assert isinstance(created, QuerySummary)
    inserted = client.command(f"INSERT INTO {table} FORMAT CSV", data="1,one\n2,two\n")
    assert isinstance(inserted, QuerySummary) and inserted.written_rows == 2
    assert client.command(f"INSERT INTO {table} VALUES (3, 'three')").written_rows == 1
    assert client.command(f"SELECT count() FROM {table}") == 3
    assert client.command(f"SELECT id, name FROM {table} WHERE id = 2") == ["2", "two"]
    assert client.command(f"SELECT id FROM {table} WHERE id > 100") == ""
    assert client.command(f"EXISTS TABLE {table}") == 1


def test_query_df(clickhouse_url: str) -> None:
    df = _client(clickhouse_url).query_df("SELECT number AS n, toString(number) AS s FROM numbers(5) ORDER BY n")
    assert df["n"].tolist() == [0, 1, 2, 3, 4]
    assert df["s"].tolist() == ["0", "1", "2", "3", "4"]


def test_errors_carry_clickhouse_codes(clickhouse_url: str, database: str) -> None:
    client = _client(clickhouse_url)
    with pytest.raises(DatabaseError, match="Code: 62") as syntax:
        client.query("SELEC 1")
    assert syntax.value.code == 62
    with pytest.raises(DatabaseError, match="Code: 60") as missing:
        client.query(f"SELECT * FROM {database}.missing")
    assert missing.value.code == 60
    with pytest.raises(DatabaseError, match="Code: 60"):
        client.insert(f"{database}.missing", [[1]], column_names=["id"])
    with pytest.raises(DatabaseError, match="Code: 62"):
        client.command("SELECT 1; SELECT 2")
    with pytest.raises(DatabaseError, match="Code: 115"):
        client.query("SELECT 1", settings={"no_such_setting_anywhere": 1})
    # The failed requests leave the connection and server usable.
    assert client.command("SELECT 1") == 1


def test_settings_are_per_request_and_per_session(clickhouse_url: str) -> None:
    first, second = _client(clickhouse_url), _client(clickhouse_url)
    default = second.command("SELECT getSetting('max_threads')")
    first.command("SET max_threads = 3")
    assert first.command("SELECT getSetting('max_threads')") == 3
    assert second.command("SELECT getSetting('max_threads')") == default
    scoped = second.query("SELECT getSetting('max_threads')", settings={"max_threads": 5})
    assert scoped.result_rows == [(5,)]
    assert second.command("SELECT getSetting('max_threads')") == default


def _running(client: Client, marker: str) -> int:
    """How many queries whose text holds `marker` are running (this one excluded)."""
    return int(
        client.command(
            "SELECT count() FROM system.processes WHERE position(query, {m:String}) > 0 "
            "AND position(query, 'system.processes') = 0",
            parameters={"m": marker},
        )
    )


@contextmanager
def _long_query(url: str, method: str = "POST", session_id: str | None = None) -> Iterator[str]:
    """A query that runs until the block ends (then it is killed), sent with `method` on a connection of its
    own; yields the marker its text carries. Nothing here waits on time: the query sleeps 0.5 s per row for an
    hour (max_execution_time caps it at 5 minutes should the kill fail)."""
    marker = f"long_query_{uuid.uuid4().hex[:10]}"
    sql = f"SELECT sleepEachRow(0.5), '{marker}' FROM numbers(7200)"
    params = {"max_block_size": "1", "max_execution_time": "300", **({"session_id": session_id} if session_id else {})}
    credentials = {"X-ClickHouse-User": "default", "X-ClickHouse-Key": os.environ["CDC_CLICKHOUSE_PASSWORD"]}
    outcome: dict[str, bytes] = {}

    def run() -> None:
        conn = http.client.HTTPConnection(urlsplit(url).netloc, timeout=600)
        query = urlencode({**params, **({"query": sql} if method == "GET" else {})})
        conn.request(method, f"/?{query}", body=None if method == "GET" else sql.encode(), headers=credentials)
        outcome["body"] = conn.getresponse().read()
        conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    watcher = _client(url)
    try:
        wait_for(lambda: _running(watcher, marker) == 1, 120, f"the long {method} query to start")
        yield marker
        assert thread.is_alive() and _running(watcher, marker) == 1, "the long query ended before it was killed"
    finally:
        watcher.command(
            "KILL QUERY WHERE position(query, {m:String}) > 0 AND position(query, 'KILL') = 0 SYNC",
            parameters={"m": marker},
        )
        thread.join(120)
        watcher.close()
    assert not thread.is_alive()
    assert b"QUERY_WAS_CANCELLED" in outcome["body"]


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_a_long_query_holds_up_no_insert_and_no_read(clickhouse_url: str, database: str, method: str) -> None:
    """Requests run concurrently: while one query runs (a read-write POST or a read-only GET), inserts, FINAL
    reads, DDL and GET reads complete, and the long query is still running when they have."""
    client = _client(clickhouse_url, compress="lz4")
    table = f"{database}.beside"
    with _long_query(clickhouse_url, method) as marker:
        _create_cdc_table(client, table)
        client.insert(table, [[i, f"n{i}", 1, 0] for i in range(10_000)], column_names=CDC_COLUMNS)
        client.insert(table, [[i, "gone", 2, 1] for i in range(5_000)], column_names=CDC_COLUMNS)
        assert client.query(f"SELECT count(), min(id) FROM {table} FINAL").result_rows == [(5_000, 5_000)]
        conn = http.client.HTTPConnection(urlsplit(clickhouse_url).netloc, timeout=120)
        conn.request(
            "GET",
            "/?" + urlencode({"query": f"SELECT count() FROM {table} FINAL"}),
            headers={"X-ClickHouse-User": "default", "X-ClickHouse-Key": os.environ["CDC_CLICKHOUSE_PASSWORD"]},
        )
        assert conn.getresponse().read() == b"5000\n"
        assert _running(client, marker) == 1


def test_a_session_runs_one_request_at_a_time(clickhouse_url: str) -> None:
    """As on a ClickHouse server: a second request of a busy session is refused (SESSION_IS_LOCKED), other
    sessions go on, and the session is usable again, with its settings, once its request has ended."""
    session = f"busy-{uuid.uuid4().hex[:8]}"
    owner = _client(clickhouse_url, session_id=session)
    owner.command("SET max_threads = 3")
    with _long_query(clickhouse_url, session_id=session):
        with pytest.raises(DatabaseError, match="SESSION_IS_LOCKED") as locked:
            _client(clickhouse_url, session_id=session).command("SELECT 1")
        assert locked.value.code == 373
        assert _client(clickhouse_url).command("SELECT 2") == 2
    assert owner.command("SELECT getSetting('max_threads')") == 3


def test_http_protocol_details(clickhouse_url: str, database: str) -> None:
    client = _client(clickhouse_url)
    _create_cdc_table(client, f"{database}.raw")
    conn = http.client.HTTPConnection(urlsplit(clickhouse_url).netloc, timeout=30)
    credentials = {"X-ClickHouse-User": "default", "X-ClickHouse-Key": os.environ["CDC_CLICKHOUSE_PASSWORD"]}

    def request(
        method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        headers = {**credentials, **(headers or {})}
        chunked = headers.get("Transfer-Encoding") == "chunked"
        conn.request(method, path, body=body, headers=headers, encode_chunked=chunked)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()

    assert request("GET", "/ping")[2] == b"Ok.\n"
    assert request("GET", "/")[2] == b"Ok.\n"
    status, headers, body = request("GET", "/?query=SELECT%201%2C%20%27x%27")
    assert (status, body) == (200, b"1\tx\n")
    assert headers["X-ClickHouse-Format"] == "TabSeparated"
    assert headers["X-ClickHouse-Timezone"] == "UTC"
    assert headers["X-ClickHouse-Query-Id"] and headers["X-ClickHouse-Server-Display-Name"]
    assert json.loads(headers["X-ClickHouse-Summary"])["read_rows"] == "1"

    def chunks() -> Iterator[bytes]:
        yield b"INSERT INTO raw FORMAT CSV\n1,one,1,0\n"
        yield b"2,two,1,0\n"

    status, headers, _ = request("POST", f"/?database={database}", chunks(), {"Transfer-Encoding": "chunked"})
    assert status == 200
    assert json.loads(headers["X-ClickHouse-Summary"])["written_rows"] == "2"
    assert "X-ClickHouse-Format" not in headers
    status, headers, body = request("POST", f"/?query=SELECT%20count()%20FROM%20{database}.raw")
    assert body == b"2\n"

    status, headers, body = request("POST", "/", b"SELECT * FROM nowhere_at_all")
    assert status == 404 and headers["X-ClickHouse-Exception-Code"] == "60"
    assert body.startswith(b"Code: 60. DB::Exception: ") and b"(UNKNOWN_TABLE)" in body
    status, _, body = request("POST", "/", b"xx", {"Content-Encoding": "snappy"})
    assert status == 500 and body.startswith(b"Code: 89.")


def test_authentication(tmp_path: Path) -> None:
    with _endpoint(tmp_path / "data", password="s3cret-pw") as url:
        with pytest.raises(DatabaseError, match="Code: 516") as wrong:
            _client(url, password="nope")
        assert wrong.value.code == 516
        with pytest.raises(DatabaseError, match="Code: 516"):
            _client(url)
        assert _client(url, username="default", password="s3cret-pw").command("SELECT 1") == 1
        conn = http.client.HTTPConnection(urlsplit(url).netloc, timeout=30)
        conn.request(
            "GET",
            "/?query=SELECT%202",
            headers={"X-ClickHouse-User": "default", "X-ClickHouse-Key": "s3cret-pw"},
        )
        assert conn.getresponse().read() == b"2\n"
    assert "s3cret-pw" not in "".join(p.read_text() for p in tmp_path.glob("*.log"))


def test_data_survives_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with _endpoint(data_dir) as url:
        client = _client(url, compress="lz4", password=ENDPOINT_PASSWORD)
        client.command("CREATE DATABASE durable")
        _create_cdc_table(client, "durable.t")
        client.insert("durable.t", [[1, "kept", 1, 0], [2, "gone", 1, 0]], column_names=CDC_COLUMNS)
        client.insert("durable.t", [[2, "gone", 2, 1]], column_names=CDC_COLUMNS)
    with _endpoint(data_dir) as url:
        client = _client(url, password=ENDPOINT_PASSWORD)
        assert client.query("SELECT id, name FROM durable.t FINAL").result_rows == [(1, "kept")]
        assert client.command("SELECT count() FROM durable.t") == 3

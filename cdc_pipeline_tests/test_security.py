"""Issue 10: nothing on the machine is open to whoever asks. Each test tries a door of the local stack
or the product and sees it refused: the ClickHouse endpoint (password, read-only GET, no files, URLs or
other servers), PostgreSQL (passwords everywhere, a private socket), Kafka Connect (no environment to
pull from), the Spark UI, user SQL fragments, and secrets in logs, runs, Connect and argv."""

from __future__ import annotations

import base64
import http.client
import json
import os
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import psutil
import psycopg
import pytest
import requests
from dagster import DagsterInstance, Failure
from psycopg import sql

from cdc_pipeline.config import PipelineConfigError, parse_pipeline_config
from cdc_pipeline.jvm import DEBEZIUM_CONNECTOR_CLASS
from cdc_pipeline.settings import Settings
from cdc_pipeline.sqlcheck import InvalidFragment, check_expression, validate_condition
from cdc_pipeline.stack.lifecycle import LocalStack, is_loopback
from cdc_pipeline.stack.services import CONNECT_CONNECTOR_ENV, JVM_ENV
from cdc_pipeline.streaming.launch import SparkSubmit, submit_env
from cdc_pipeline_tests.conftest import wait_for
from cdc_pipeline_tests.test_connector import cleanup

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


# --- 1. the ClickHouse endpoint -----------------------------------------------------------------


class Endpoint:
    """Raw HTTP to the stack's ClickHouse endpoint, with or without the credentials."""

    def __init__(self, url: str, password: str) -> None:
        self.netloc = urlsplit(url).netloc
        self.password = password

    def request(
        self, method: str, path: str, body: bytes | None = None, auth: str | None = "default"
    ) -> tuple[int, str]:
        headers = {}
        if auth == "default":
            headers = {"X-ClickHouse-User": "default", "X-ClickHouse-Key": self.password}
        elif auth is not None:
            headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}
        conn = http.client.HTTPConnection(self.netloc, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read().decode(errors="replace")
        finally:
            conn.close()

    def post(self, query: str, params: str = "") -> tuple[int, str]:
        return self.request("POST", f"/?{params}", query.encode())

    def get(self, query: str, auth: str | None = "default") -> tuple[int, str]:
        return self.request("GET", f"/?query={quote(query)}", auth=auth)


@pytest.fixture(scope="module")
def endpoint(local_stack: LocalStack) -> Endpoint:
    settings = local_stack.settings
    assert settings.clickhouse_password is not None
    return Endpoint(settings.clickhouse_endpoint, settings.clickhouse_password.get_secret_value())


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file the endpoint's user could read, holding a value no response may ever contain."""
    path = tmp_path_factory.mktemp("secret") / ".env"
    path.write_text(f"CANARY=canary-{uuid.uuid4().hex}\n")
    path.parent.chmod(0o755)
    path.chmod(0o644)
    return path


@pytest.fixture(scope="module")
def ch_database(endpoint: Endpoint) -> Iterator[str]:
    name = f"sec_{uuid.uuid4().hex[:8]}"
    assert endpoint.post(f"CREATE DATABASE {name}")[0] == 200
    assert endpoint.post(f"CREATE TABLE {name}.t (s String) ENGINE = MergeTree ORDER BY s")[0] == 200
    yield name
    endpoint.post(f"DROP DATABASE IF EXISTS {name}")


def test_the_issue_curl_is_refused_without_the_password(
    endpoint: Endpoint, secret_file: Path, local_stack: LocalStack
) -> None:
    query = f"SELECT * FROM file('{secret_file}','LineAsString')"
    canary = secret_file.read_text().strip()
    for auth in (None, "default:", "default:wrong", f"default:{endpoint.password}x"):
        status, body = endpoint.get(query, auth=auth)
        assert status in (401, 403) and "Code: 516" in body, (auth, status, body)
        assert canary not in body
    # Not even a harmless query, on either method.
    assert endpoint.get("SELECT 1", auth=None)[0] == 403
    assert endpoint.request("POST", "/", b"SELECT 1", auth=None)[0] == 403
    # With the password, the file is still not readable.
    status, body = endpoint.get(query)
    assert status != 200 and canary not in body
    assert "Code: 497" in body and "ACCESS_DENIED" in body


def test_get_is_read_only(endpoint: Endpoint, ch_database: str) -> None:
    assert endpoint.get("SELECT 1") == (200, "1\n")
    for statement in (
        f"INSERT INTO {ch_database}.t VALUES ('from-get')",
        f"CREATE TABLE {ch_database}.g (a Int8) ENGINE = Memory",
        f"DROP TABLE {ch_database}.t",
        f"TRUNCATE TABLE {ch_database}.t",
        f"ALTER TABLE {ch_database}.t DELETE WHERE 1",
        "CREATE DATABASE from_get",
        "SET readonly = 0",
    ):
        status, body = endpoint.get(statement)
        assert status != 200 and ("Code: 164" in body or "Code: 48" in body), (statement, body)
    status, body = endpoint.get("SELECT 1 SETTINGS readonly = 0")
    assert status != 200
    assert endpoint.get(f"SELECT count() FROM {ch_database}.t WHERE s = 'from-get'") == (200, "0\n")
    assert endpoint.get(f"EXISTS TABLE {ch_database}.t") == (200, "1\n")
    # The same write over POST works.
    assert endpoint.post(f"INSERT INTO {ch_database}.t VALUES ('from-post')")[0] == 200


REFUSED = [
    "SELECT * FROM file('{secret}', 'LineAsString')",
    "select * from FILE  (  '{secret}' , 'LineAsString' )",
    "SELECT * FROM `file`('{secret}', 'LineAsString')",
    "SELECT * FROM \"File\"('{secret}', 'LineAsString')",
    "SELECT * FROM /* x */ file /* y */ ('{secret}', 'LineAsString') -- z",
    "SELECT file('{secret}')",
    "SELECT file\u00a0('{secret}')",
    "SELECT\u2003file\u3000(\u00a0'{secret}')",
    "CREATE TABLE {db}.f (s String) ENGINE\u00a0=\u00a0FileLog('{secret_dir}', 'LineAsString')",
    "SELECT * FROM `{secret}`",
    "SELECT * FROM default.`{secret}`",
    "SELECT * FROM url('http://127.0.0.1:{connect_port}/connectors', 'LineAsString')",
    "SELECT * FROM remote('127.0.0.1:{pg_port}', system.one)",
    "SELECT * FROM remoteSecure('127.0.0.1:{pg_port}', system.one)",
    "SELECT * FROM postgresql('127.0.0.1:{pg_port}', 'shop', 'pg_class', 'cdc', 'x')",
    "SELECT * FROM mysql('127.0.0.1:{pg_port}', 'a', 'b', 'c', 'd')",
    "SELECT * FROM s3('http://127.0.0.1:{connect_port}/x.csv')",
    "SELECT * FROM gcs('http://127.0.0.1:{connect_port}/x.csv')",
    "SELECT * FROM azureBlobStorage('http://127.0.0.1:{connect_port}', 'c', 'b')",
    "SELECT * FROM hdfs('hdfs://127.0.0.1:{pg_port}/x', 'TSV', 's String')",
    "SELECT * FROM jdbc('x', 'y', 'z')",
    "SELECT * FROM odbc('x', 'y', 'z')",
    "SELECT * FROM sqlite('{secret}', 't')",
    "SELECT * FROM mongodb('127.0.0.1:{pg_port}', 'a', 'b', 'c', 'd', 's String')",
    "SELECT * FROM redis('127.0.0.1:{pg_port}', 'k', 'k String')",
    "SELECT * FROM cluster('default', system.one)",
    "SELECT * FROM executable('cat {secret}', 'LineAsString', 's String')",
    "SELECT * FROM icebergLocal('{secret_dir}')",
    "SELECT * FROM filesystem('{secret_dir}')",
    "SELECT * FROM python(os)",
    "INSERT INTO FUNCTION file('{out}', 'TSV') SELECT 1",
    "SELECT 1 INTO OUTFILE '{out}'",
    "SELECT 1 INTO OUTFILE '{out}' FORMAT TSV",
    "INSERT INTO {db}.t FROM INFILE '{secret}' FORMAT LineAsString",
    "INSERT INTO {db}.t FORMAT Values ('ok'), (file('{secret}'))",
    "INSERT INTO {db}.t VALUES ('ok'), (FILE('{secret}'))",
    "CREATE TABLE {db}.f (s String) ENGINE = File(LineAsString, '{secret}')",
    "CREATE TABLE {db}.f (s String) ENGINE FileLog('{secret_dir}', 'LineAsString')",
    "CREATE TABLE {db}.f (s String) ENGINE = `URL`('http://127.0.0.1:{connect_port}/', 'LineAsString')",
    "CREATE TABLE {db}.f (s String) ENGINE = Executable('cat', 'LineAsString')",
    "CREATE TABLE {db}.f (s String) ENGINE = MergeTree ORDER BY s SETTINGS disk = disk(type = local, path = '{out}/')",
    "CREATE TABLE {db}.f AS file('{secret}', 'LineAsString')",
    "CREATE DATABASE fs_{db} ENGINE = Filesystem('{secret_dir}')",
    "CREATE DICTIONARY {db}.d (s String) PRIMARY KEY s SOURCE(FILE(path '{secret}' format 'LineAsString')) "
    "LAYOUT(FLAT()) LIFETIME(0)",
    "ATTACH TABLE {db}.a FROM '{secret_dir}' (s String) ENGINE = MergeTree ORDER BY s",
    "BACKUP DATABASE {db} TO File('{out}')",
    "SYSTEM RELOAD CONFIG",
    "SELECT 1 SETTINGS format_schema = '{secret}'",
    "SELECT 1; SELECT * FROM file('{secret}', 'LineAsString')",
    "SET readonly = 1",
]


@pytest.mark.parametrize("template", REFUSED)
def test_files_urls_and_other_servers_are_refused(
    endpoint: Endpoint, secret_file: Path, ch_database: str, settings: Settings, template: str, tmp_path: Path
) -> None:
    out = tmp_path / "written"
    query = template.format(
        secret=secret_file, secret_dir=secret_file.parent, out=out, db=ch_database,
        connect_port=settings.connect_host_port[1], pg_port=settings.postgres_params["port"],
    )  # fmt: skip
    status, body = endpoint.post(query)
    assert status != 200, (query, body)
    assert secret_file.read_text().strip() not in body
    assert not out.exists(), f"{query} wrote {out}"
    assert endpoint.post("SELECT 1") == (200, "1\n")  # and the endpoint still serves


def test_values_data_is_checked_too(endpoint: Endpoint, secret_file: Path, ch_database: str) -> None:
    table = f"{ch_database}.t"
    status, body = endpoint.request(
        "POST", "/?query=" + quote(f"INSERT INTO {table} FORMAT Values"), f"(file('{secret_file}'))".encode()
    )
    assert status != 200 and "Code: 497" in body
    assert endpoint.post(f"INSERT INTO {table} FORMAT Values ('values-ok'), (concat('a', 'b'))")[0] == 200
    assert endpoint.post(f"SELECT count() FROM {table} WHERE s IN ('values-ok', 'ab')") == (200, "2\n")
    assert secret_file.read_text().strip() not in endpoint.post(f"SELECT * FROM {table}")[1]


def test_file_naming_settings_are_refused_as_url_parameters(endpoint: Endpoint, secret_file: Path) -> None:
    status, body = endpoint.post("SELECT 1", params=f"format_schema={quote(str(secret_file))}")
    assert status != 200 and "Code: 497" in body


def test_the_endpoint_refuses_to_start_without_a_password(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CDC_CLICKHOUSE_PASSWORD"}
    result = subprocess.run(
        [os.sys.executable, "-m", "cdc_pipeline.stack.clickhouse_local", "--port", "0", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "CDC_CLICKHOUSE_PASSWORD is not set" in result.stderr


def test_the_stack_needs_a_clickhouse_password(tmp_path: Path) -> None:
    from cdc_pipeline.stack.services import ClickHouseService, StackError

    service = ClickHouseService(Settings(_env_file=None, stack_dir=tmp_path, clickhouse_password=None))
    with pytest.raises(StackError, match="CDC_CLICKHOUSE_PASSWORD is not set"):
        service.start()


# --- 2. PostgreSQL ------------------------------------------------------------------------------


def test_postgres_socket_directory_is_private_and_auth_has_no_trust(local_stack: LocalStack) -> None:
    postgres = local_stack.postgres
    assert stat.S_IMODE(postgres.socket_dir.stat().st_mode) == 0o700
    hba = (postgres.data_dir / "pg_hba.conf").read_text()
    rules = [line.split() for line in hba.splitlines() if line.strip() and not line.startswith("#")]
    assert rules and all(rule[-1] == "scram-sha-256" or rule[-2:] == ["peer", "map=stack"] for rule in rules), hba
    assert all(rule[2] == "postgres" for rule in rules if "peer" in rule)
    assert "trust" not in hba


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another OS user needs root")
def test_postgres_socket_refuses_another_os_user(local_stack: LocalStack) -> None:
    psql = local_stack.postgres._bin("psql")
    port = local_stack.settings.postgres_params["port"]
    for role in ("postgres", "cdc"):
        result = subprocess.run(
            ["runuser", "-u", "nobody", "--", psql, "-h", str(local_stack.postgres.socket_dir), "-p", port,
             "-U", role, "-d", "postgres", "-w", "-c", "SELECT 1"],
            capture_output=True, text=True, timeout=60, cwd="/",
        )  # fmt: skip
        assert result.returncode != 0, result.stdout
        assert "Permission denied" in result.stderr or "password" in result.stderr, result.stderr


def test_postgres_tcp_needs_the_right_password(settings: Settings, local_stack: LocalStack) -> None:
    params = settings.postgres_params
    base = {"host": params["host"], "port": params["port"], "dbname": params["dbname"], "connect_timeout": 10}
    for user, password in (("cdc", None), ("cdc", "wrong"), ("postgres", None), ("postgres", "postgres")):
        extra = {"password": password} if password is not None else {}
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(**base, user=user, **extra, sslmode="disable").close()
    with psycopg.connect(settings.postgres_conninfo()) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("cdc",)


def test_stack_up_locks_down_a_cluster_left_with_trust(settings: Settings, local_stack: LocalStack) -> None:
    """A server started by an older version (`trust`) is locked down by the next `stack up`."""
    params = settings.postgres_params
    anyone = {"host": params["host"], "port": params["port"], "dbname": "postgres", "user": "postgres"}
    hba = local_stack.postgres.data_dir / "pg_hba.conf"
    hba.write_text("local all all trust\nhost all all all trust\n")
    with psycopg.connect(host=str(local_stack.postgres.socket_dir), port=params["port"], user="postgres") as conn:
        conn.execute("SELECT pg_reload_conf()")
    wait_for(lambda: _connects(anyone), 30, "the trust rules to apply")
    LocalStack(settings, say=lambda _: None).up()
    assert "trust" not in hba.read_text()
    assert not _connects(anyone)


def _connects(params: dict[str, str]) -> bool:
    try:
        psycopg.connect(**params, connect_timeout=10, sslmode="disable").close()
    except psycopg.OperationalError:
        return False
    return True


# --- 3. Kafka Connect ---------------------------------------------------------------------------


def _listening(pid: int) -> set[str]:
    process = psutil.Process(pid)
    addresses = set()
    for proc in [process, *process.children(recursive=True)]:
        try:
            connections = proc.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        addresses |= {f"{c.laddr.ip}:{c.laddr.port}" for c in connections if c.status == psutil.CONN_LISTEN}
    return addresses


def test_every_stack_service_listens_on_loopback_only(local_stack: LocalStack) -> None:
    for service in local_stack.services:
        process = service.process.running()
        assert process is not None, service.name
        addresses = _listening(process.pid)
        assert addresses and {a.rsplit(":", 1)[0] for a in addresses} <= LOOPBACK, (service.name, addresses)


def test_the_stack_refuses_to_listen_beyond_loopback(tmp_path: Path) -> None:
    from cdc_pipeline.stack.services import StackError

    exposed = Settings(
        _env_file=None, stack_dir=tmp_path, connect_url="http://0.0.0.0:18083", postgres_password="x",
        clickhouse_password="y",
    )  # fmt: skip
    stack = LocalStack(exposed, say=lambda _: None)
    with pytest.raises(StackError, match="loopback only, not on 0.0.0.0:18083"):
        stack._start_if_needed(stack.connect)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10") and not is_loopback("db.example")


def test_connect_worker_gets_only_the_variables_connectors_need(local_stack: LocalStack) -> None:
    process = local_stack.connect.process.running()
    assert process is not None
    environ = process.environ()
    assert set(environ) <= {*JVM_ENV, *CONNECT_CONNECTOR_ENV}, sorted(environ)
    assert "CDC_CLICKHOUSE_PASSWORD" not in environ
    assert "CDC_POSTGRES_PASSWORD" in environ


def test_connector_configs_resolve_only_allow_listed_variables(settings: Settings, local_stack: LocalStack) -> None:
    """Connect resolves config providers when it validates a config, and Debezium's answer for an
    invalid topic prefix quotes the value it got: `${env:NAME}` resolved, or left literal."""
    assert settings.postgres_password is not None

    def topic_prefix_error(value: str) -> str:
        config = {"connector.class": DEBEZIUM_CONNECTOR_CLASS, "topic.prefix": f"! {value}"}
        url = f"{settings.connect_url}/connector-plugins/{DEBEZIUM_CONNECTOR_CLASS}/config/validate"
        response = requests.put(url, json=config, timeout=120)
        response.raise_for_status()
        (entry,) = [c["value"] for c in response.json()["configs"] if c["value"]["name"] == "topic.prefix"]
        assert entry["errors"], entry
        return entry["errors"][0]

    # The control: the one allow-listed variable resolves.
    assert settings.postgres_password.get_secret_value() in topic_prefix_error("${env:CDC_POSTGRES_PASSWORD}")
    # In the worker's environment but not allow-listed, or not in its environment at all: literal.
    for name in ("PATH", "HOME", "CDC_CLICKHOUSE_PASSWORD"):
        error = topic_prefix_error(f"${{env:{name}}}")
        assert f"${{env:{name}}}" in error, error
        if os.environ.get(name):
            assert os.environ[name] not in error


# --- 4. the Spark UI ----------------------------------------------------------------------------


def test_spark_ui_is_off_and_read_only_by_default_and_configurable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SPARK_LOCAL_IP", raising=False)
    config = tmp_path / "pipeline.yaml"

    def confs(argv: list[str]) -> dict[str, str]:
        return dict(argv[i + 1].split("=", 1) for i, arg in enumerate(argv) if arg == "--conf")

    local = confs(SparkSubmit(master="local[2]", jars=("kafka.jar",)).stream_argv(config))
    assert local["spark.ui.enabled"] == local["spark.ui.killEnabled"] == "false"
    assert local["spark.driver.bindAddress"] == local["spark.driver.host"] == "127.0.0.1"
    # An enabled UI binds SPARK_LOCAL_IP (else every interface): loopback for a local master.
    assert submit_env(master="local[2]")["SPARK_LOCAL_IP"] == "127.0.0.1"

    enabled = SparkSubmit(master="local[2]", jars=("kafka.jar",), conf={"spark.ui.enabled": "true"})
    assert confs(enabled.stream_argv(config))["spark.ui.enabled"] == "true"
    assert confs(enabled.stream_argv(config))["spark.ui.killEnabled"] == "false"

    cluster = confs(SparkSubmit(master="spark://spark-master:7077", jars=("kafka.jar",)).stream_argv(config))
    assert cluster["spark.ui.enabled"] == "false"
    assert "spark.driver.bindAddress" not in cluster  # the cluster's executors must reach the driver
    assert "SPARK_LOCAL_IP" not in submit_env(master="spark://spark-master:7077")


# --- 5. user SQL fragments ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "condition",
    [
        "true; DROP TABLE accounts",
        "id > 0;",
        "true) OR (true",
        "id > 0) UNION SELECT (1",
        "true -- the rest",
        "true /* x */",
        "name = 'a' OR 'b",
        "(id > 0",
        "",
    ],
)
def test_backfill_conditions_are_one_expression(condition: str) -> None:
    with pytest.raises(InvalidFragment):
        check_expression(condition, "the backfill condition", "postgresql")


def test_partition_by_is_one_expression() -> None:
    def pipeline(partition_by: str) -> Any:
        return parse_pipeline_config(
            {"name": "shop", "tables": [{"name": "public.orders", "partition_by": partition_by}]}
        )

    assert pipeline("toYYYYMM(created_at)").tables[0].partition_by == "toYYYYMM(created_at)"
    assert pipeline("(toYYYYMM(ts), region)").tables[0].partition_by == "(toYYYYMM(ts), region)"
    for bad in (
        "toYYYYMM(created_at) SETTINGS index_granularity = 1",
        "toYYYYMM(created_at) ORDER BY id --",
        "id); DROP TABLE x; --",
        "toYYYYMM(created_at)) ENGINE = File(TSV, '/etc/passwd'",
    ):
        with pytest.raises(PipelineConfigError, match="partition_by"):
            pipeline(bad)


def test_database_names_from_settings_are_plain_identifiers() -> None:
    with pytest.raises(ValueError, match="CDC_CLICKHOUSE_DATABASE"):
        Settings(_env_file=None, clickhouse_database="cdc`; DROP DATABASE x; --")
    assert Settings(_env_file=None, clickhouse_database="cdc_2").clickhouse_database == "cdc_2"


@pytest.fixture
def source_table(settings: Settings, local_stack: LocalStack, unique_name: str) -> Iterator[tuple[str, str]]:
    with psycopg.connect(settings.postgres_conninfo(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE TABLE public.{} (id int PRIMARY KEY, name text)").format(sql.Identifier(unique_name))
        )
        conn.execute(sql.SQL("INSERT INTO public.{} VALUES (1, 'a;b'), (2, 'c')").format(sql.Identifier(unique_name)))
    yield "public", unique_name
    with psycopg.connect(settings.postgres_conninfo(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS public.{}").format(sql.Identifier(unique_name)))


def test_postgres_checks_the_condition_without_running_it(settings: Settings, source_table: tuple[str, str]) -> None:
    schema, table = source_table
    with psycopg.connect(settings.postgres_conninfo(), autocommit=True) as conn:
        assert validate_condition(conn, schema, table, " name = 'a;b' ") == "(name = 'a;b')"
        assert validate_condition(conn, schema, table, "id > 1 AND name LIKE 'c%'") == "(id > 1 AND name LIKE 'c%')"
        for bad, reason in (
            ("id", "boolean"),
            ("no_such_column > 1", "no_such_column"),
            ("id > 1; DROP TABLE public.x", "single expression"),
            (f"true) ; DROP TABLE {table} ; SELECT (true", "parenthesis"),
        ):
            with pytest.raises(InvalidFragment, match=reason):
                validate_condition(conn, schema, table, bad)
        assert conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))).fetchone() == (2,)


def test_backfill_job_fails_on_a_second_statement_before_debezium_sees_it(
    settings: Settings, source_table: tuple[str, str], tmp_path: Path
) -> None:
    from cdc_pipeline.defs.jobs import run_backfill
    from cdc_pipeline.resources import KafkaConnectResource, KafkaResource, PostgresResource

    schema, table = source_table
    pipeline = parse_pipeline_config({"name": table, "tables": [{"name": f"{schema}.{table}"}]})
    postgres = PostgresResource(dsn=settings.postgres_dsn, password=settings.postgres_password.get_secret_value())
    with pytest.raises(Failure, match="single expression"):
        run_backfill(
            _NoContext(), pipeline, pipeline.tables[0], f"true; DROP TABLE {schema}.{table}", postgres,
            KafkaResource(bootstrap_servers=settings.kafka_bootstrap_servers),
            KafkaConnectResource(url=settings.connect_url), 10, False,
        )  # fmt: skip
    with psycopg.connect(settings.postgres_conninfo()) as conn:
        assert conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))).fetchone() == (2,)


class _NoContext:
    """run_backfill fails before it logs anything."""

    log = None


# --- 6. secrets ---------------------------------------------------------------------------------


def _secrets(settings: Settings) -> dict[str, str]:
    assert settings.postgres_password is not None and settings.clickhouse_password is not None
    return {
        "PostgreSQL password": settings.postgres_password.get_secret_value(),
        "ClickHouse password": settings.clickhouse_password.get_secret_value(),
    }


def _assert_no_secret(text: str, secrets: dict[str, str], where: str) -> None:
    for name, value in secrets.items():
        assert value not in text, f"the {name} appears in {where}"


def test_no_secret_in_a_dagster_run_connect_or_spark_submit(
    settings: Settings, source_table: tuple[str, str], tmp_path: Path
) -> None:
    from cdc_pipeline.connector import connector_config, connector_name
    from cdc_pipeline.definitions import build_definitions
    from cdc_pipeline.defs.common import stream_env
    from cdc_pipeline.resources import (
        ClickHouseResource,
        ControlPlaneResource,
        KafkaConnectResource,
        KafkaResource,
        NotifierResource,
        PostgresResource,
        SparkResource,
    )

    webhook = f"http://127.0.0.1:9/hooks/{uuid.uuid4().hex}"
    secrets = {**_secrets(settings), "webhook URL": webhook}
    schema, table = source_table
    raw = {
        "name": table,
        "source": {"signal_table": f"{schema}.{table}_signal"},
        "tables": [{"name": f"{schema}.{table}"}],
    }
    pipeline = parse_pipeline_config(raw)
    config_path = tmp_path / "pipeline.yaml"
    config_path.write_text(json.dumps(raw))
    resources = {
        "postgres": PostgresResource(dsn=settings.postgres_dsn, password=secrets["PostgreSQL password"]),
        "kafka": KafkaResource(bootstrap_servers=settings.kafka_bootstrap_servers),
        "kafka_connect": KafkaConnectResource(url=settings.connect_url),
        "spark": SparkResource(master="local[2]", jvm_cache_dir=str(settings.jvm_cache_dir)),
        "clickhouse": ClickHouseResource(url=settings.clickhouse_endpoint, password=secrets["ClickHouse password"]),
        "control_plane": ControlPlaneResource(config_path=str(config_path), stack_dir=str(tmp_path)),
        "notifier": NotifierResource(webhook_url=webhook),
    }
    defs = build_definitions(pipeline, config_path, resources)
    instance = DagsterInstance.ephemeral()
    connect = resources["kafka_connect"]
    name = connector_name(pipeline)
    try:
        # provision: source checks, the connector created, its config (masked) in the asset's metadata.
        runs = [
            defs.resolve_job_def(job).execute_in_process(instance=instance, raise_on_error=False)
            for job in ("check_services", "provision")
        ]
        assert all(run.success for run in runs), [run.run_id for run in runs if not run.success]
        for result in runs:
            records = instance.all_logs(result.run_id)
            run = instance.get_run_by_id(result.run_id)
            assert records and run is not None
            dumped = json.dumps([r.to_json() if hasattr(r, "to_json") else str(r) for r in records], default=str)
            dumped += json.dumps({"config": run.run_config, "tags": run.tags}, default=str)
            _assert_no_secret(dumped, secrets, f"the event log, config or tags of the {run.job_name} run")
        materialization = runs[1].get_asset_materialization_events()[0].step_materialization_data.materialization
        assert materialization.metadata["config"].value["database.password"]  # masked, but there

        # The connector as Connect stores and reports it.
        stored = connect.connector_config(name)
        assert stored == {**connector_config(pipeline, settings), "name": name}
        answers = [requests.get(f"{settings.connect_url}/connectors/{name}{path}", timeout=30).text for path in
                   ("", "/config", "/status", "/tasks")]  # fmt: skip
        assert '"RUNNING"' in answers[2]
        _assert_no_secret("\n".join(answers), secrets, "Connect's answers about the connector")
    finally:
        cleanup(connect, settings.postgres_conninfo(), pipeline, name, [f"{table}_signal"])

    # spark-submit's command line (anyone on the machine can read it); the secrets go in its environment.
    argv = resources["spark"].submit().stream_argv(config_path, checkpoint_location=str(tmp_path / "checkpoint"))
    _assert_no_secret(" ".join(argv), secrets, "the spark-submit command line")
    env = stream_env(resources["kafka"], resources["clickhouse"], resources["control_plane"])
    assert env["CDC_CLICKHOUSE_PASSWORD"] == secrets["ClickHouse password"]


# Last: after the tests above made every service log what it does.
def test_no_secret_in_the_stack_logs_or_config_files(settings: Settings, local_stack: LocalStack) -> None:
    secrets = _secrets(settings)
    files = [*(local_stack.state_dir / "logs").glob("*.log"), *(local_stack.state_dir / "conf").glob("*")]
    files += [local_stack.postgres.data_dir / name for name in ("postgresql.conf", "pg_hba.conf", "pg_ident.conf")]
    assert files
    for path in files:
        _assert_no_secret(path.read_text(errors="replace"), secrets, str(path))

"""Static checks of docker-compose.yml and .env.example against the product's settings.

No services and no Docker engine are needed. The one test that runs `docker compose config` (which
needs only the client-side compose plugin, not a daemon) is skipped when the plugin is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict

from cdc_pipeline.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"

SERVICES = {"postgres", "kafka", "connect", "clickhouse"}
PUBLISHED_PORTS = {5432, 9092, 8083, 8123}
SECRET_FIELDS = {name for name, field in Settings.model_fields.items() if "SecretStr" in repr(field.annotation)}
SETTING_NAMES = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
# `$$` is compose's escape for a literal `$` (left to the container's shell); anything else is
# interpolation: `${NAME}`, `${NAME:-default}`, `${NAME:?error}`, ... or bare `$NAME`.
_INTERPOLATION = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)|([A-Za-z_][A-Za-z0-9_]*))")
_ENV_LINE = re.compile(r"^\s*#?\s*(CDC_[A-Z0-9_]+)\s*=", re.MULTILINE)


def _strings(node: object) -> list[str]:
    """Every key and scalar of the parsed file: what compose interpolates (comments are not)."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return [node] if isinstance(node, str) else []


def _interpolated_names(compose: dict) -> set[str]:
    names: set[str] = set()
    for text in _strings(compose):
        text = text.replace("$$", "")
        names |= {braced or bare for braced, bare in _INTERPOLATION.findall(text)}
    return names


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the `- KEY=value` form
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {str(k): ("" if v is None else str(v)) for k, v in env.items()}


def _published_host_ports(service: dict) -> set[int]:
    ports: set[int] = set()
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):  # long syntax
            if entry.get("published") is not None:
                ports.add(int(str(entry["published"])))
            continue
        spec = str(entry).split("/", 1)[0]  # drop /tcp
        parts = spec.rsplit(":", 2)
        if len(parts) >= 2:  # [ip:]host:container; a bare "8123" publishes nothing fixed
            ports.add(int(parts[-2]))
    return ports


@pytest.fixture(scope="module")
def compose_text() -> str:
    return COMPOSE_FILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def compose(compose_text: str) -> dict:
    data = yaml.safe_load(compose_text)
    assert isinstance(data, dict), "docker-compose.yml is not a YAML mapping"
    return data


@pytest.fixture(scope="module")
def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


def test_has_the_four_services(services: dict) -> None:
    assert set(services) >= SERVICES, f"missing services: {SERVICES - set(services)}"


def test_images_are_pinned(services: dict) -> None:
    for name, service in services.items():
        image = service.get("image")
        assert image, f"{name}: no image"
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest", f"{name}: image {image!r} is not pinned"
        # A real version, not a moving major-only tag such as `postgres:17`.
        assert re.match(r"^\d+\.\d+", tag), f"{name}: image {image!r} is not pinned to a version"


def test_interpolated_names_are_settings(compose: dict) -> None:
    names = _interpolated_names(compose)
    assert names, "expected the secrets to be interpolated"
    unknown = names - SETTING_NAMES
    assert not unknown, f"interpolated names that are not Settings fields: {sorted(unknown)}"


def test_secrets_are_required_interpolations(services: dict) -> None:
    """Every secret setting the file uses is interpolated with `:?` (refuse to start without it)."""
    for name, service in services.items():
        for key, value in _environment(service).items():
            if not re.search(r"PASSWORD|SECRET|TOKEN|_KEY$", key):
                continue
            assert re.fullmatch(r"\$\{CDC_[A-Z0-9_]+:\?[^}]*\}", value), (
                f"{name}: {key} must come from a required ${{CDC_...:?...}} interpolation, not {value!r}"
            )
            setting = value[2:].split(":", 1)[0]
            assert setting.removeprefix(ENV_PREFIX).lower() in SECRET_FIELDS, (
                f"{name}: {key} is interpolated from {setting}, which is not a secret setting"
            )


def test_no_secret_literal_in_file(compose_text: str) -> None:
    for line in compose_text.splitlines():
        code = line.split("#", 1)[0]
        match = re.search(r"(PASSWORD|SECRET|TOKEN)\w*\s*[:=]\s*(\S.*)$", code)
        if match:
            assert match.group(2).strip().startswith("${"), f"literal secret? {line.strip()!r}"


def test_ports_are_published(services: dict) -> None:
    published: set[int] = set()
    for service in services.values():
        published |= _published_host_ports(service)
    assert published >= PUBLISHED_PORTS, f"not published: {sorted(PUBLISHED_PORTS - published)}"


def test_postgres_is_logical(services: dict) -> None:
    command = services["postgres"].get("command")
    command = " ".join(command) if isinstance(command, list) else str(command)
    assert re.search(r"wal_level\s*=\s*logical", command), command
    assert "max_replication_slots" in command and "max_wal_senders" in command
    env = _environment(services["postgres"])
    assert env.get("POSTGRES_USER") == "cdc" and env.get("POSTGRES_DB") == "shop"


def test_postgres_matches_default_dsn(services: dict) -> None:
    dsn = conninfo_to_dict(Settings.model_fields["postgres_dsn"].default)
    env = _environment(services["postgres"])
    assert env.get("POSTGRES_USER") == dsn["user"]
    assert env.get("POSTGRES_DB") == dsn["dbname"]
    assert int(dsn["port"]) in _published_host_ports(services["postgres"])


def test_every_service_has_a_healthcheck(services: dict) -> None:
    for name in SERVICES:
        check = services[name].get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name}: no healthcheck"


def test_dependencies_wait_for_health(services: dict) -> None:
    depends = services["connect"].get("depends_on")
    assert isinstance(depends, dict), "connect: depends_on must use the long form with conditions"
    assert {"postgres", "kafka"} <= set(depends)
    for name, spec in depends.items():
        assert spec.get("condition") == "service_healthy", f"connect -> {name}"


def test_named_volumes_are_declared(compose: dict, services: dict) -> None:
    declared = set(compose.get("volumes") or {})
    for name in ("postgres", "kafka", "clickhouse"):
        mounts = services[name].get("volumes") or []
        sources = {str(m).split(":", 1)[0] if not isinstance(m, dict) else m["source"] for m in mounts}
        assert sources and sources <= declared, f"{name}: data not on a declared named volume"


def test_kafka_listeners(services: dict) -> None:
    env = _environment(services["kafka"])
    assert env["KAFKA_NODE_ID"] == "1"
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    advertised = dict(item.split("://", 1) for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    # Host clients use the product's default bootstrap address.
    assert Settings.model_fields["kafka_bootstrap_servers"].default in advertised.values()
    # Connect (a container) bootstraps from a listener advertised under a container-reachable name.
    bootstrap = _environment(services["connect"])["BOOTSTRAP_SERVERS"]
    assert bootstrap in advertised.values() and not bootstrap.startswith("127.0.0.1")
    assert "9093" in env["KAFKA_CONTROLLER_QUORUM_VOTERS"]
    assert env.get("KAFKA_AUTO_CREATE_TOPICS_ENABLE") == "true"
    assert env.get("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR") == "1"


def test_connect_worker(services: dict) -> None:
    connect = services["connect"]
    image = connect["image"]
    assert image.startswith("quay.io/debezium/connect:3."), image
    env = _environment(connect)
    assert env["GROUP_ID"] == "cdc-connect"
    assert env["CONFIG_STORAGE_TOPIC"] == "cdc-connect-configs"
    assert env["OFFSET_STORAGE_TOPIC"] == "cdc-connect-offsets"
    assert env["STATUS_STORAGE_TOPIC"] == "cdc-connect-status"
    for kind in ("CONFIG", "OFFSET", "STATUS"):
        assert env[f"CONNECT_{kind}_STORAGE_REPLICATION_FACTOR"] == "1"
    # The connector reaches PostgreSQL at the DSN's 127.0.0.1:5432: same network namespace.
    assert connect.get("network_mode") == "service:postgres"


def test_env_example_covers_exactly_the_settings() -> None:
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    names = set(_ENV_LINE.findall(text))
    assert not names - SETTING_NAMES, f"not Settings fields: {sorted(names - SETTING_NAMES)}"
    assert not SETTING_NAMES - names, f"missing from .env.example: {sorted(SETTING_NAMES - names)}"


def test_env_example_leaves_secrets_empty_and_url_commented() -> None:
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    for field in SECRET_FIELDS:
        name = ENV_PREFIX + field.upper()
        assert re.search(rf"^{name}=\s*$", text, re.MULTILINE), f"{name} must be present and empty"
    assert re.search(r"^#\s*CDC_CLICKHOUSE_URL=", text, re.MULTILINE)
    assert not re.search(r"^CDC_CLICKHOUSE_URL=", text, re.MULTILINE)


def test_env_example_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """`.env.example` copied to `.env` gives valid settings (secrets filled in)."""
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    settings = Settings(_env_file=str(ENV_EXAMPLE), postgres_password="x", clickhouse_password="y")
    assert settings.clickhouse_url is None


def _compose_cli() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if not shutil.which(cmd[0]):
            continue
        try:
            probe = subprocess.run([*cmd, "version"], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return cmd
    return None


def test_compose_config_validates(tmp_path: Path) -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("docker compose plugin (or docker-compose) not installed")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "CDC_POSTGRES_PASSWORD": "test-postgres-password",
        "CDC_CLICKHOUSE_PASSWORD": "test-clickhouse-password",
    }
    # --project-directory: a directory without `.env`, so a developer's own `.env` stays out.
    result = subprocess.run(
        [*cli, "-f", str(COMPOSE_FILE), "--project-directory", str(tmp_path), "config", "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # Without the required secrets, compose must refuse.
    del env["CDC_POSTGRES_PASSWORD"]
    result = subprocess.run(
        [*cli, "-f", str(COMPOSE_FILE), "--project-directory", str(tmp_path), "config", "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode != 0 and "CDC_POSTGRES_PASSWORD" in result.stderr

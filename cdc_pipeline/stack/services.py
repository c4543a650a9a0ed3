"""The four services of the local stack. Each knows how to prepare its state, start, answer a
health probe in its own protocol, and which ports it holds. Orchestration lives in `lifecycle.py`."""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import uuid
from abc import ABC, abstractmethod
from pathlib import Path

import psycopg
from psycopg import sql

from cdc_pipeline import probes
from cdc_pipeline.jvm import JvmLayout
from cdc_pipeline.process import ManagedProcess
from cdc_pipeline.settings import Settings

CONNECT_GROUP_ID = "cdc-connect"
# Where PostgreSQL data goes, as root, when the postgres user cannot enter the state directory.
OUTSIDE_ROOT = Path("/var/lib/cdc-pipeline")
CONNECT_STORAGE_TOPICS = ("cdc-connect-configs", "cdc-connect-offsets", "cdc-connect-status")


class StackError(RuntimeError):
    """A service of the local stack could not be prepared or started; the message says how to fix it."""


class Service(ABC):
    name: str
    # Stop signal: the one each server treats as "shut down now, cleanly".
    stop_signal: int = signal.SIGTERM

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_dir = settings.stack_dir.resolve()
        self.process = ManagedProcess(
            self.name,
            pid_file=self.state_dir / "run" / f"{self.name}.json",
            log_file=self.state_dir / "logs" / f"{self.name}.log",
        )

    @property
    def managed(self) -> bool:
        """False when the stack only watches the service (it is someone else's)."""
        return True

    @property
    @abstractmethod
    def endpoint(self) -> str: ...

    @abstractmethod
    def ports(self) -> list[tuple[str, int]]: ...

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def health(self) -> probes.Health: ...

    def ready(self) -> probes.Health:
        """The service answers at all (before `after_healthy` has created users and databases)."""
        return self.health()

    def after_healthy(self) -> None:  # noqa: B027 - optional hook, most services need nothing
        """Idempotent setup once the service answers, e.g. users and databases."""

    def purge(self) -> None:  # noqa: B027 - optional hook
        """Delete data kept outside the state directory, if any (the state directory goes anyway)."""


def java_binary() -> str:
    """A JDK 17+ `java`, from JAVA_HOME or PATH."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).exists():
        raise StackError(
            "No Java found: install a JDK 17+ (Debian: apt-get install openjdk-17-jdk-headless) or set JAVA_HOME."
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    match = re.search(r'version "(\d+)', out)
    if not match or int(match.group(1)) < 17:
        raise StackError(
            f"{java} is not Java 17+ ({out.strip().splitlines()[0] if out else 'no version'}); "
            "set JAVA_HOME to a JDK 17+."
        )
    return java


def _log4j_config(state_dir: Path) -> Path:
    """Log to stdout (the service's log file) at INFO: enough to see why something failed."""
    path = state_dir / "conf" / "log4j2.properties"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "status = warn\n"
        "appender.out.type = Console\nappender.out.name = STDOUT\n"
        "appender.out.layout.type = PatternLayout\n"
        "appender.out.layout.pattern = [%d] %p %m (%c)%n\n"
        "rootLogger.level = INFO\nrootLogger.appenderRef.out.ref = STDOUT\n"
        "logger.kafka.name = org.apache.kafka\nlogger.kafka.level = WARN\n"
        "logger.reflections.name = org.reflections\nlogger.reflections.level = ERROR\n"
    )
    return path


def _write_properties(path: Path, values: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))


# --------------------------------------------------------------------------------------------------
class PostgresService(Service):
    name = "postgres"
    stop_signal = signal.SIGINT  # PostgreSQL's "fast" shutdown: roll back sessions, checkpoint, exit
    os_user = "postgres"  # PostgreSQL refuses to run as root; as root we run it as this user

    @property
    def params(self) -> dict[str, str]:
        return self.settings.postgres_params

    @property
    def endpoint(self) -> str:
        p = self.params
        return f"postgresql://{p.get('user', '')}@{p['host']}:{p['port']}/{p.get('dbname', '')}"

    def ports(self) -> list[tuple[str, int]]:
        return [(self.params["host"], int(self.params["port"]))]

    @property
    def link(self) -> Path:
        """`<state>/postgres`; as root, a symlink to a directory the postgres user can reach when the
        state dir itself is not reachable for it (e.g. a checkout under /root)."""
        return self.state_dir / "postgres"

    @property
    def root(self) -> Path:
        return self.link.resolve()  # the real path: the postgres user may not traverse the link's parents

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    def _reachable_by(self, user: str, path: Path) -> bool:
        return subprocess.run(["test", "-x", str(path)], user=user, capture_output=True).returncode == 0

    def _place_root(self, user: str | None) -> None:
        if self.link.exists() or user is None or self._reachable_by(user, self.state_dir):
            return
        outside = OUTSIDE_ROOT / hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:16]
        outside.mkdir(parents=True, exist_ok=True)
        outside.parent.chmod(0o755)
        self.link.symlink_to(outside, target_is_directory=True)

    def purge(self) -> None:
        if self.link.is_symlink():
            shutil.rmtree(self.link.resolve(), ignore_errors=True)

    def _bin(self, tool: str) -> str:
        found = shutil.which(tool)
        if found:
            return found
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
        if versions and (versions[-1] / tool).exists():
            return str(versions[-1] / tool)
        raise StackError(
            f"PostgreSQL's '{tool}' was not found: install the server (Debian: apt-get install postgresql)."
        )

    def _run_as(self) -> tuple[str | None, pwd.struct_passwd | None]:
        if os.geteuid() != 0:
            return None, None
        try:
            return self.os_user, pwd.getpwnam(self.os_user)
        except KeyError as exc:
            raise StackError(
                f"Running as root, PostgreSQL must run as the '{self.os_user}' system user, which does not exist "
                "(Debian's postgresql package creates it)."
            ) from exc

    def _prepare(self) -> None:
        user, entry = self._run_as()
        self._place_root(user)
        for directory in (self.data_dir.parent, self.socket_dir):
            directory.mkdir(parents=True, exist_ok=True)
            if entry:
                os.chown(directory, entry.pw_uid, entry.pw_gid)
        # Only the server's OS user may enter the socket directory (root can anyway).
        self.socket_dir.chmod(0o700)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(user)
        self._write_auth_config(entry)

    def _initdb(self, user: str | None) -> None:
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)  # a half-made cluster from an interrupted initdb
        argv = [
            self._bin("initdb"), "-D", str(self.data_dir), "-U", "postgres", "-E", "UTF8", "--no-locale",
            "--auth-local=peer", "--auth-host=scram-sha-256",  # replaced by _write_auth_config before start
        ]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, user=user)
        if result.returncode != 0:
            hint = f" (the '{user}' user must be able to enter every directory above {self.data_dir})" if user else ""
            raise StackError(f"initdb failed{hint}:\n{result.stdout}{result.stderr}")

    def _write_auth_config(self, entry: pwd.struct_passwd | None) -> None:
        """pg_hba.conf and pg_ident.conf, rewritten at every start (so a cluster made by an older
        version, with `trust`, is locked down too): scram-sha-256 passwords for every connection, local
        and TCP, except the superuser `postgres` over the socket for the OS user that runs the stack and
        the one that runs the server (peer authentication: how the stack creates the login role and
        database with no password to keep)."""
        try:
            me = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError as exc:
            raise StackError(
                f"The stack's OS user (uid {os.geteuid()}) has no passwd entry: PostgreSQL's peer authentication, "
                "which the stack uses to create its role and database, needs one."
            ) from exc
        os_users = sorted({me, entry.pw_name if entry else ""} - {""})
        hba = (
            "# Written by cdc-pipeline at every `stack up`; edits are overwritten.\n"
            "# TYPE  DATABASE     USER      ADDRESS  METHOD\n"
            "local   all          postgres           peer map=stack\n"
            "local   all          all                scram-sha-256\n"
            "local   replication  all                scram-sha-256\n"
            "host    all          all       all      scram-sha-256\n"
            "host    replication  all       all      scram-sha-256\n"
        )
        ident = "# Written by cdc-pipeline: OS users allowed to log in as the superuser over the socket.\n" + "".join(
            f"stack {name} postgres\n" for name in os_users
        )
        for name, text in (("pg_hba.conf", hba), ("pg_ident.conf", ident)):
            path = self.data_dir / name
            path.write_text(text)
            path.chmod(0o600)
            if entry:
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def start(self) -> None:
        if not self.settings.postgres_password:
            raise StackError(
                "CDC_POSTGRES_PASSWORD is not set: set it in the environment or in .env (see .env.example)."
            )
        self._prepare()
        user, _ = self._run_as()
        p = self.params
        settings = {
            "listen_addresses": p["host"],
            "port": p["port"],
            "unix_socket_directories": str(self.socket_dir),
            "unix_socket_permissions": "0700",
            "password_encryption": "scram-sha-256",
            "wal_level": "logical",
            "max_replication_slots": "16",
            "max_wal_senders": "16",
            "shared_buffers": "128MB",
            "logging_collector": "off",
        }
        argv = [self._bin("postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        self.process.start(argv, user=user, cwd=self.data_dir.parent)

    def _superuser_conninfo(self) -> str:
        return psycopg.conninfo.make_conninfo(
            host=str(self.socket_dir), port=self.params["port"], user="postgres", dbname="postgres"
        )

    def ready(self) -> probes.Health:
        return probes.postgres_health(self._superuser_conninfo())

    def after_healthy(self) -> None:
        """Make sure the product's login role (with REPLICATION) and source database exist."""
        role = self.params.get("user") or "cdc"
        dbname = self.params.get("dbname") or role
        password = self.settings.postgres_password.get_secret_value() if self.settings.postgres_password else ""
        with psycopg.connect(self._superuser_conninfo(), autocommit=True) as conn:
            # A server started by an older version (trust, 0755 socket directory) is locked down now.
            _, entry = self._run_as()
            self.socket_dir.chmod(0o700)
            self._write_auth_config(entry)
            conn.execute("SELECT pg_reload_conf()")
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(
                sql.SQL("{} ROLE {} WITH LOGIN REPLICATION PASSWORD {}").format(
                    sql.SQL(verb), sql.Identifier(role), sql.Literal(password)
                )
            )
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone():
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(dbname), sql.Identifier(role))
                )
            self._ensure_warehouse(conn)

    def _ensure_warehouse(self, conn: psycopg.Connection) -> None:
        """The warehouse (a second sink): its own role (no REPLICATION) and database in this server,
        when CDC_WAREHOUSE_DSN points here."""
        params = self.settings.warehouse_params
        if not params or (params["host"], params["port"]) != (self.params["host"], self.params["port"]):
            return
        role = params.get("user") or "cdc_warehouse"
        dbname = params.get("dbname") or "warehouse"
        if dbname == (self.params.get("dbname") or "") or role == (self.params.get("user") or ""):
            raise StackError(
                "CDC_WAREHOUSE_DSN names the source's database or role: the warehouse must be its own database "
                "with its own role (e.g. postgresql://cdc_warehouse@127.0.0.1:5432/warehouse)"
            )
        secret = self.settings.warehouse_password
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        conn.execute(
            sql.SQL("{} ROLE {} WITH LOGIN PASSWORD {}").format(
                sql.SQL("ALTER" if exists else "CREATE"),
                sql.Identifier(role),
                sql.Literal(secret.get_secret_value() if secret else ""),
            )
        )
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(dbname), sql.Identifier(role)))

    def health(self) -> probes.Health:
        return probes.postgres_health(self.settings.postgres_conninfo())


# --------------------------------------------------------------------------------------------------
class KafkaService(Service):
    name = "kafka"
    node_id = 1

    def __init__(self, settings: Settings, layout: JvmLayout | None) -> None:
        super().__init__(settings)
        self.layout = layout

    @property
    def endpoint(self) -> str:
        host, port = self.settings.kafka_host_port
        return f"{host}:{port}"

    def ports(self) -> list[tuple[str, int]]:
        host, port = self.settings.kafka_host_port
        return [(host, port), (host, self.settings.kafka_controller_port)]

    def _config(self) -> Path:
        host, port = self.settings.kafka_host_port
        controller = self.settings.kafka_controller_port
        path = self.state_dir / "conf" / "kafka-server.properties"
        _write_properties(
            path,
            {
                "process.roles": "broker,controller",
                "node.id": self.node_id,
                "controller.quorum.voters": f"{self.node_id}@{host}:{controller}",
                "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller}",
                "advertised.listeners": f"PLAINTEXT://{host}:{port}",
                "controller.listener.names": "CONTROLLER",
                "inter.broker.listener.name": "PLAINTEXT",
                "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                "log.dirs": self.state_dir / "kafka" / "data",
                "num.partitions": 1,
                "auto.create.topics.enable": "true",
                "offsets.topic.replication.factor": 1,
                "transaction.state.log.replication.factor": 1,
                "transaction.state.log.min.isr": 1,
                "share.coordinator.state.topic.replication.factor": 1,
                "share.coordinator.state.topic.min.isr": 1,
                "group.initial.rebalance.delay.ms": 0,
                "log.retention.hours": 168,
            },
        )
        return path

    def _java(self, main: str, *args: str, heap: str = "512m") -> list[str]:
        assert self.layout is not None
        return [
            java_binary(), f"-Xmx{heap}", f"-Xms{min(256, int(heap.rstrip('m')))}m", "-XX:+UseG1GC",
            "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={_log4j_config(self.state_dir)}",
            "-cp", self.layout.broker_classpath, main, *args,
        ]  # fmt: skip

    def start(self) -> None:
        config = self._config()
        data = self.state_dir / "kafka" / "data"
        if not (data / "meta.properties").exists():
            cluster_id = "-"
            while cluster_id.startswith("-"):  # like Kafka's Uuid.randomUuid(): the tool would read "-x" as an option
                cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            argv = self._java(
                "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config), "--ignore-formatted"
            )
            result = subprocess.run(argv, capture_output=True, text=True)
            if result.returncode != 0:
                raise StackError(f"Formatting Kafka's KRaft storage failed:\n{result.stdout}{result.stderr}")
        self.process.start(self._java("kafka.Kafka", str(config)))

    def health(self) -> probes.Health:
        return probes.kafka_health(self.settings.kafka_bootstrap_servers)


# The only variables connectors may reference as ${env:NAME}.
CONNECT_CONNECTOR_ENV = ("CDC_POSTGRES_PASSWORD",)
CONNECT_ENV_ALLOWLIST_PATTERN = "^(" + "|".join(re.escape(name) for name in CONNECT_CONNECTOR_ENV) + ")$"
# What the JVM needs from the environment of whoever ran `stack up`; nothing else reaches the worker.
JVM_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "JAVA_HOME")


def connect_worker_env(settings: Settings) -> dict[str, str]:
    """The Kafka Connect worker's whole environment: the JVM's variables and the connectors' secrets."""
    env = {name: os.environ[name] for name in JVM_ENV if name in os.environ}
    if settings.postgres_password:
        env["CDC_POSTGRES_PASSWORD"] = settings.postgres_password.get_secret_value()
    return env


# --------------------------------------------------------------------------------------------------
class ConnectService(Service):
    name = "connect"

    def __init__(self, settings: Settings, layout: JvmLayout | None) -> None:
        super().__init__(settings)
        self.layout = layout

    @property
    def endpoint(self) -> str:
        return self.settings.connect_url

    def ports(self) -> list[tuple[str, int]]:
        return [self.settings.connect_host_port]

    def start(self) -> None:
        assert self.layout is not None
        host, port = self.settings.connect_host_port
        config = self.state_dir / "conf" / "connect-distributed.properties"
        _write_properties(
            config,
            {
                "bootstrap.servers": self.settings.kafka_bootstrap_servers,
                "group.id": CONNECT_GROUP_ID,
                "config.storage.topic": CONNECT_STORAGE_TOPICS[0],
                "offset.storage.topic": CONNECT_STORAGE_TOPICS[1],
                "status.storage.topic": CONNECT_STORAGE_TOPICS[2],
                "config.storage.replication.factor": 1,
                "offset.storage.replication.factor": 1,
                "status.storage.replication.factor": 1,
                "offset.flush.interval.ms": 5000,
                # Producer batches of many change events, compressed: a JsonConverter event repeats its
                # ~6 KiB schema, so lz4 shrinks a batch ~10x (less for Kafka to write and the stream to
                # read). The default 16 KiB batch holds two or three events.
                "producer.batch.size": 512 << 10,
                "producer.linger.ms": 10,
                "producer.compression.type": "lz4",
                "key.converter": "org.apache.kafka.connect.json.JsonConverter",
                "value.converter": "org.apache.kafka.connect.json.JsonConverter",
                "listeners": f"http://{host}:{port}",
                "rest.advertised.host.name": host,
                "rest.advertised.port": port,
                "plugin.path": self.layout.plugin_path,
                # Secrets stay in the worker's environment: connector configs say ${env:CDC_...}, and
                # only the variables connectors need resolve (a config naming any other stays literal).
                "config.providers": "env",
                "config.providers.env.class": "org.apache.kafka.common.config.provider.EnvVarConfigProvider",
                "config.providers.env.param.allowlist.pattern": CONNECT_ENV_ALLOWLIST_PATTERN,
                # Connector configs cannot override the worker's Kafka client settings (e.g. JAAS).
                "connector.client.config.override.policy": "None",
                "plugin.discovery": "service_load",
            },
        )
        argv = [
            java_binary(), "-Xmx768m", "-Xms256m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={_log4j_config(self.state_dir)}",
            "-cp", self.layout.connect_classpath,
            "org.apache.kafka.connect.cli.ConnectDistributed", str(config),
        ]  # fmt: skip
        self.process.start(argv, env=connect_worker_env(self.settings))

    def health(self) -> probes.Health:
        return probes.connect_health(self.settings.connect_url)


# --------------------------------------------------------------------------------------------------
class ClickHouseService(Service):
    name = "clickhouse"

    @property
    def managed(self) -> bool:
        return not self.settings.clickhouse_is_external

    @property
    def endpoint(self) -> str:
        return self.settings.clickhouse_endpoint

    def ports(self) -> list[tuple[str, int]]:
        host, port, _ = self.settings.clickhouse_host_port
        return [(host, port)] if self.managed else []

    def start(self) -> None:
        if not self.settings.clickhouse_password:
            raise StackError(
                "CDC_CLICKHOUSE_PASSWORD is not set: the local ClickHouse endpoint requires a password. Set it in "
                "the environment or in .env (scripts/setup.sh generates one; see .env.example)."
            )
        host, port, _ = self.settings.clickhouse_host_port
        data = self.state_dir / "clickhouse"
        data.mkdir(parents=True, exist_ok=True)
        data.chmod(0o700)
        argv = [
            sys.executable, "-m", "cdc_pipeline.stack.clickhouse_local",
            "--host", host, "--port", str(port), "--data-dir", str(data),
            "--user", self.settings.clickhouse_user,
        ]  # fmt: skip
        # No other CDC_* secret reaches the endpoint's process.
        env = {name: value for name, value in os.environ.items() if not name.startswith("CDC_")}
        env["CDC_CLICKHOUSE_PASSWORD"] = self.settings.clickhouse_password.get_secret_value()
        self.process.start(argv, env=env)

    def _password(self) -> str | None:
        return self.settings.clickhouse_password.get_secret_value() if self.settings.clickhouse_password else None

    def after_healthy(self) -> None:
        from cdc_pipeline.clickhouse_client import connect_clickhouse

        client = connect_clickhouse(self.endpoint, self.settings.clickhouse_user, self._password())
        try:
            client.command(f"CREATE DATABASE IF NOT EXISTS `{self.settings.clickhouse_database}`")
        finally:
            client.close()

    def health(self) -> probes.Health:
        return probes.clickhouse_health(self.endpoint, self.settings.clickhouse_user, self._password())

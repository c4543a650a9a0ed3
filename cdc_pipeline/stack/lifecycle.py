"""`cdc-pipeline stack up | down | status`: the whole local stack's lifecycle on loopback, without Docker."""

from __future__ import annotations

import ipaddress
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

from cdc_pipeline.jvm import MavenProgress, ensure_artifacts, layout_for
from cdc_pipeline.process import port_open, wait_port_closed
from cdc_pipeline.settings import Settings
from cdc_pipeline.stack.services import (
    ClickHouseService,
    ConnectService,
    KafkaService,
    PostgresService,
    Service,
    StackError,
)

START_TIMEOUT_S = 180.0


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback interface (what the stack's services may bind)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    endpoint: str
    managed: bool
    pid: int | None
    healthy: bool
    detail: str
    log: str | None

    def as_dict(self) -> dict[str, object]:
        return self.__dict__.copy()


class LocalStack:
    """The four services, started in dependency order and stopped in reverse."""

    def __init__(
        self,
        settings: Settings,
        say: Callable[[str], None] = print,
        maven_progress: Callable[[MavenProgress], None] | None = None,
    ) -> None:
        self.settings = settings
        self.say = say
        self.maven_progress = maven_progress  # called while Maven resolves the JVM artifacts (first `up`)
        self.state_dir = settings.stack_dir.resolve()
        layout = layout_for(settings.jvm_cache_dir)  # paths only; resolved on `up`
        self.postgres = PostgresService(settings)
        self.clickhouse = ClickHouseService(settings)
        self.kafka = KafkaService(settings, layout)
        self.connect = ConnectService(settings, layout)

    @property
    def services(self) -> list[Service]:
        return [self.postgres, self.clickhouse, self.kafka, self.connect]

    # ---------------------------------------------------------------------------------------------
    def up(self) -> list[ServiceStatus]:
        """Start whatever is not running and wait until every service answers. Idempotent."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o755)  # the postgres system user must be able to enter it
        if not (self.kafka.process.running() and self.connect.process.running()):
            self.say("Resolving Kafka, Kafka Connect and Debezium with Maven (cached after the first run)...")
            layout = ensure_artifacts(self.settings.jvm_cache_dir, progress=self.maven_progress)
            self.kafka.layout = self.connect.layout = layout
        # Independent services start together; Connect needs a healthy broker first.
        waves = [[self.postgres, self.clickhouse, self.kafka], [self.connect]]
        for wave in waves:
            started = [service for service in wave if self._start_if_needed(service)]
            for service in wave:
                self._wait_healthy(service, fresh=service in started)
        return self.status()

    def _start_if_needed(self, service: Service) -> bool:
        if not service.managed:
            return False
        if service.process.running():
            return False
        for host, port in service.ports():
            if not is_loopback(host):
                raise StackError(
                    f"{service.name}: the local stack listens on loopback only, not on {host}:{port}. Point its "
                    f"endpoint at 127.0.0.1 (see .env.example), or run your own {service.name} server there."
                )
            if port_open(host, port):
                raise StackError(
                    f"{service.name}: port {host}:{port} is already in use by a process this stack did not "
                    f"start. Stop that process, or move the {service.name} endpoint (see .env.example)."
                )
        self.say(f"Starting {service.name}...")
        service.start()
        return True

    def _wait_healthy(self, service: Service, *, fresh: bool) -> None:
        deadline = time.monotonic() + (START_TIMEOUT_S if fresh else 30.0)
        result = service.ready()
        while not result.ok and time.monotonic() < deadline:
            if service.managed and service.process.running() is None:
                break  # it died: waiting longer will not help
            time.sleep(1.0)
            result = service.ready()
        if result.ok:
            service.after_healthy()
            result = service.health()
        if not result.ok:
            died = service.managed and service.process.running() is None
            where = (
                f"Last lines of {service.process.log_file}:\n{service.process.log_tail()}"
                if service.managed
                else f"It is not managed by this stack: check the server at {service.endpoint}."
            )
            raise StackError(
                f"{service.name} did not become healthy ({'process exited' if died else result.detail}).\n{where}"
            )
        self.say(f"  {service.name:<10} {service.endpoint:<45} {result.detail}")

    # ---------------------------------------------------------------------------------------------
    def running(self) -> list[str]:
        """The services of this stack whose process runs (whether or not they answer yet)."""
        return [s.name for s in self.services if s.managed and s.process.running()]

    def down(self, *, purge: bool = False, only: list[str] | None = None) -> list[str]:
        """Stop every service this stack started (or those named in `only`) and wait for their ports to
        close."""
        stopped: list[str] = []
        for service in reversed(self.services):
            if not service.managed or (only is not None and service.name not in only):
                continue
            if service.process.stop(sig=service.stop_signal):
                stopped.append(service.name)
                self.say(f"Stopped {service.name}.")
            for host, port in service.ports():
                if not wait_port_closed(host, port, timeout=30):
                    self.say(f"Warning: {host}:{port} ({service.name}) is still in use by another process.")
        if purge and self.state_dir.exists():
            for service in self.services:
                service.purge()
            shutil.rmtree(self.state_dir)
            self.say(f"Removed {self.state_dir}.")
        return stopped

    def status(self) -> list[ServiceStatus]:
        statuses = []
        for service in self.services:
            proc = service.process.running() if service.managed else None
            result = service.health()
            statuses.append(
                ServiceStatus(
                    name=service.name,
                    endpoint=service.endpoint,
                    managed=service.managed,
                    pid=proc.pid if proc else None,
                    healthy=result.ok,
                    detail=result.detail,
                    log=str(service.process.log_file) if service.managed else None,
                )
            )
        return statuses

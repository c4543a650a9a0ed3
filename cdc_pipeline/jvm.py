"""JVM artifacts, resolved by Maven from `pom.xml` beside this file into a cache directory outside git:
the Kafka source jars `spark-submit` needs (production and local), and the local stack's Kafka broker,
Kafka Connect and Debezium PostgreSQL plugin. The first
`stack up` (or stream start) downloads; later ones find the finished directories and never call Maven again."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

POM = Path(__file__).with_name("pom.xml")
DEBEZIUM_CONNECTOR_CLASS = "io.debezium.connector.postgresql.PostgresConnector"
STACK_PROFILES = ("broker", "connect", "debezium-postgres")


class ArtifactError(RuntimeError):
    """Maven could not provide the JVM parts of the stack."""


@dataclass(frozen=True)
class JvmLayout:
    root: Path

    @property
    def broker_classpath(self) -> str:
        return str(self.root / "broker" / "*")

    @property
    def connect_classpath(self) -> str:
        return str(self.root / "connect" / "*")

    @property
    def plugin_path(self) -> Path:
        """Kafka Connect's plugin.path: one sub-directory per plugin."""
        return self.root / "plugins"

    def directory(self, profile: str) -> Path:
        if profile == "debezium-postgres":
            return self.plugin_path / "debezium-connector-postgres"
        return self.root / profile

    def jars(self, profile: str) -> list[str]:
        return sorted(str(p) for p in self.directory(profile).glob("*.jar"))


def layout_for(cache_dir: Path, overrides: dict[str, str] | None = None) -> JvmLayout:
    """Where the artifacts for this pom (and version overrides) live; versions change the path."""
    digest = hashlib.sha256(POM.read_bytes())
    for key, value in sorted((overrides or {}).items()):
        digest.update(f"{key}={value}".encode())
    return JvmLayout(cache_dir.expanduser().resolve() / "jvm" / digest.hexdigest()[:16])


def ensure_artifacts(
    cache_dir: Path, overrides: dict[str, str] | None = None, profiles: tuple[str, ...] = STACK_PROFILES
) -> JvmLayout:
    """Resolve the profiles once; idempotent and offline after the first success."""
    layout = layout_for(cache_dir, overrides)
    targets = {profile: layout.directory(profile) for profile in profiles}
    missing = {p: d for p, d in targets.items() if not (d / ".complete").exists()}
    if not missing:
        return layout
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ArtifactError(
            "Maven ('mvn') is not on PATH: it is needed once to download Kafka, Kafka Connect and "
            "Debezium from Maven Central. Install it (Debian: apt-get install maven) and retry."
        )
    repo = cache_dir.expanduser().resolve() / "m2"
    for profile, target in missing.items():
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        argv = [
            mvn, "-B", "-q", "-f", str(POM), "-P", profile,
            f"-Dmaven.repo.local={repo}",
            "dependency:copy-dependencies", f"-DoutputDirectory={staging}",
            *(f"-D{k}={v}" for k, v in sorted((overrides or {}).items())),
        ]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-25:])
            raise ArtifactError(f"Maven could not resolve the '{profile}' artifacts:\n{tail}")
        # Rename into place only when complete, so an interrupted download is retried next time.
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        (target / ".complete").touch()
    return layout

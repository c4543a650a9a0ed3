"""JVM artifacts, resolved by Maven from `pom.xml` beside this file into a cache directory outside git:
the Kafka source jars `spark-submit` needs (production and local), and the local stack's Kafka broker,
Kafka Connect and Debezium PostgreSQL plugin. The first
`stack up` (or stream start) downloads; later ones find the finished directories and never call Maven again."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

POM = Path(__file__).with_name("pom.xml")
DEBEZIUM_CONNECTOR_CLASS = "io.debezium.connector.postgresql.PostgresConnector"
STACK_PROFILES = ("broker", "connect", "debezium-postgres")


class ArtifactError(RuntimeError):
    """Maven could not provide the JVM parts of the stack."""


@dataclass(frozen=True)
class MavenProgress:
    """Where a resolution is: profile `index` (1-based) of `total`, files downloaded so far in all."""

    profile: str
    index: int
    total: int
    downloaded: int
    last: str = ""  # the artifact Maven reported last


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
    cache_dir: Path,
    overrides: dict[str, str] | None = None,
    profiles: tuple[str, ...] = STACK_PROFILES,
    progress: Callable[[MavenProgress], None] | None = None,
) -> JvmLayout:
    """Resolve the profiles once; idempotent and offline after the first success. `progress` is called
    as each profile starts and as each file is downloaded."""
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
    downloaded = 0
    for index, (profile, target) in enumerate(missing.items(), start=1):
        if progress:
            progress(MavenProgress(profile, index, len(missing), downloaded))
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        argv = [
            mvn, "-B", "-f", str(POM), "-P", profile,
            f"-Dmaven.repo.local={repo}",
            "dependency:copy-dependencies", f"-DoutputDirectory={staging}",
            *(f"-D{k}={v}" for k, v in sorted((overrides or {}).items())),
        ]  # fmt: skip
        # Not quiet: each "Downloaded from <repo>: <url>" line is a file done, reported as progress.
        tail: deque[str] = deque(maxlen=25)
        with subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True
        ) as process:
            assert process.stdout is not None
            for line in process.stdout:
                tail.append(line.rstrip())
                if "Downloaded from " in line:
                    downloaded += 1
                    if progress:
                        name = line.split(": ", 1)[-1].split(" (", 1)[0].rsplit("/", 1)[-1]
                        progress(MavenProgress(profile, index, len(missing), downloaded, name))
        if process.returncode != 0:
            raise ArtifactError(f"Maven could not resolve the '{profile}' artifacts:\n" + "\n".join(tail))
        # Rename into place only when complete, so an interrupted download is retried next time.
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        (target / ".complete").touch()
    return layout

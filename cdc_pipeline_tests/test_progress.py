"""Long work reports progress: the Maven resolution of `stack up` (with a stand-in `mvn` on PATH that
prints what Maven prints in batch mode), and the shop's generated history keeps its money exact."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cdc_pipeline.jvm import ArtifactError, MavenProgress, ensure_artifacts

FAKE_MVN = """#!/bin/sh
for arg in "$@"; do
  case "$arg" in -DoutputDirectory=*) out="${arg#-DoutputDirectory=}";; esac
done
echo "[INFO] Scanning for projects..."
if [ -n "$FAIL" ]; then echo "[ERROR] Could not transfer artifact: network unreachable"; exit 1; fi
for name in kafka-clients-4.3.1.jar zstd-jni-1.5.6.jar lz4-java-1.8.0.jar; do
  echo "[INFO] Downloading from central: https://repo.maven.apache.org/maven2/x/$name"
  echo "[INFO] Downloaded from central: https://repo.maven.apache.org/maven2/x/$name (10 kB at 1.2 MB/s)"
done
mkdir -p "$out" && touch "$out/a.jar"
"""


@pytest.fixture
def fake_mvn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mvn = bin_dir / "mvn"
    mvn.write_text(FAKE_MVN)
    mvn.chmod(mvn.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return mvn


def test_maven_resolution_reports_each_profile_and_download(fake_mvn: Path, tmp_path: Path) -> None:
    events: list[MavenProgress] = []
    layout = ensure_artifacts(tmp_path / "cache", profiles=("broker", "connect"), progress=events.append)
    assert events[0] == MavenProgress("broker", 1, 2, 0)
    assert [e.downloaded for e in events if e.profile == "broker"] == [0, 1, 2, 3]
    assert events[3].last == "lz4-java-1.8.0.jar"
    assert events[4] == MavenProgress("connect", 2, 2, 3)
    assert events[-1].downloaded == 6
    assert (layout.directory("connect") / ".complete").exists()
    # Cached: no Maven, no progress.
    again: list[MavenProgress] = []
    ensure_artifacts(tmp_path / "cache", profiles=("broker", "connect"), progress=again.append)
    assert again == []


def test_maven_failure_names_the_profile_and_shows_mavens_error(
    fake_mvn: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAIL", "1")
    with pytest.raises(ArtifactError, match="'broker' artifacts") as excinfo:
        ensure_artifacts(tmp_path / "cache", profiles=("broker",))
    assert "network unreachable" in str(excinfo.value)

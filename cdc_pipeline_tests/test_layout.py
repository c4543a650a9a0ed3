"""The package's dependency rules, read from the import graph (no stack needed)."""

from __future__ import annotations

import ast
from pathlib import Path

import cdc_pipeline

PACKAGE = Path(cdc_pipeline.__file__).parent
# The local dev stack is imported only by itself and by the commands that start it.
MAY_IMPORT_STACK = {"stack", "cli.py", "bench/main.py", "demo"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _allowed(relative: Path) -> bool:
    text = relative.as_posix()
    return any(text == rule or text.startswith(f"{rule}/") for rule in MAY_IMPORT_STACK)


def test_production_code_does_not_import_the_local_stack() -> None:
    offenders = {
        path.relative_to(PACKAGE).as_posix(): sorted(n for n in _imports(path) if n.startswith("cdc_pipeline.stack"))
        for path in PACKAGE.rglob("*.py")
        if not _allowed(path.relative_to(PACKAGE))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


# Module names that two modules at different levels share, each clear within its own package: the
# streaming application's aggregates and the Dagster side's would otherwise read as one. Add none.
SHARED_MODULE_NAMES: set[str] = set()


def test_no_new_module_name_is_used_at_two_levels() -> None:
    where: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*")):
        if "__pycache__" in path.parts or path.name == "__init__.py":
            continue
        if path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").exists()):
            where.setdefault(path.stem, []).append(path.relative_to(PACKAGE).as_posix())
    shared = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert {name: paths for name, paths in shared.items() if name not in SHARED_MODULE_NAMES} == {}


def _layout_section() -> str:
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("\n## Layout\n", 1)[1]
    return section.split("```", 2)[1]  # the tree between the fences


def test_the_readme_layout_names_every_module() -> None:
    """README's Layout section matches the tree: every top-level module and package, and every module of
    the packages a reader opens first (control/, defs/ and its subpackages, streaming/, resources/), is
    named there."""
    import re

    layout = _layout_section()
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", layout))
    missing: list[str] = []
    entries = [p for p in PACKAGE.iterdir() if p.name != "__pycache__" and not p.name.startswith(".")]
    for folder in ("control", "defs", "defs/jobs", "defs/sensors", "streaming", "resources"):
        entries += [p for p in (PACKAGE / folder).iterdir() if p.suffix == ".py" or p.is_dir()]
    for path in entries:
        if path.name in {"__init__.py", "__pycache__"} or path.suffix not in {".py", ".xml", ""}:
            continue
        if path.stem not in words:
            missing.append(path.relative_to(PACKAGE).as_posix())
    assert not missing, f"README's Layout section does not name: {sorted(missing)}"

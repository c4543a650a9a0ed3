"""The replica table contract (cdc_pipeline/contract.py) is spelled out in one module: the bookkeeping
column names and the progress table's name appear in the string literals (SQL included; docstrings
and comments excepted) of exactly that module under cdc_pipeline/, and everyone else imports them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import cdc_pipeline
from cdc_pipeline import contract

PACKAGE = Path(cdc_pipeline.__file__).parent
NAMES = (contract.VERSION, contract.IS_DELETED, contract.SOURCE_TS, contract.PROGRESS_TABLE)


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes of the module, classes and functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _literals(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    docstrings = _docstrings(tree)
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


@pytest.mark.parametrize("name", NAMES)
def test_each_contract_name_is_spelled_out_in_one_module(name: str) -> None:
    word = re.compile(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])")
    modules = sorted(
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if any(word.search(text) for text in _literals(path))
    )
    assert modules == ["contract.py"], f"{name!r} is spelled out in {modules}: import it from cdc_pipeline.contract"


def test_the_contract_is_consistent() -> None:
    assert tuple(n for n, _ in contract.CLICKHOUSE_META_COLUMNS) == contract.META_NAMES
    assert tuple(n for n, _ in contract.WAREHOUSE_META_COLUMNS) == contract.META_NAMES
    assert set(contract.PROGRESS_ADDED_COLUMNS) <= set(contract.PROGRESS_COLUMNS)
    assert set(contract.PROGRESS_ORDER_BY) <= set(contract.PROGRESS_COLUMNS)

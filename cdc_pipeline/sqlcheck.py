"""Checks for the SQL fragments users write into the pipeline (a backfill's `condition`, a table's
`partition_by`) before they are pasted into a statement: one expression, nothing around it.

The lexical check refuses what could end the expression early or hide the rest of the statement:
a `;` (another statement), a comment (`--`, `/*`), and a `)` closing a parenthesis the fragment did
not open. String literals, quoted identifiers and dollar quotes are skipped, so `name = 'a;b'` is
fine. The PostgreSQL condition is then planned by the server itself (`validate_condition`)."""

from __future__ import annotations

import re
from collections.abc import Iterable

import psycopg
from psycopg import sql

# PostgreSQL (standard_conforming_strings on, the default since 9.1): backslashes escape only in E'...'.
_POSTGRES_TOKEN = re.compile(
    r"""
    (?P<string>[eE]'(?:[^'\\]|\\.|'')*'|'(?:[^']|'')*')
  | (?P<identifier>"(?:[^"]|"")*")
  | (?P<dollar>\$(?P<tag>[A-Za-z_][A-Za-z0-9_]*)?\$.*?\$(?P=tag)\$)
  | (?P<comment>--|/\*)
  | (?P<quote>['"]|\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$)
  | (?P<word>[A-Za-z_][A-Za-z0-9_$]*)
  | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)
# ClickHouse: backslash escapes in strings and quoted identifiers, `#` comments, heredocs.
_CLICKHOUSE_TOKEN = re.compile(
    r"""
    (?P<string>'(?:[^'\\]|\\.|'')*')
  | (?P<identifier>"(?:[^"\\]|\\.|"")*"|`(?:[^`\\]|\\.|``)*`)
  | (?P<dollar>\$(?P<tag>[A-Za-z0-9_]*)\$.*?\$(?P=tag)\$)
  | (?P<comment>--|/\*|\#)
  | (?P<quote>['"`]|\$[A-Za-z0-9_]*\$)
  | (?P<word>[A-Za-z_][A-Za-z0-9_$]*)
  | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_TOKENS = {"postgresql": _POSTGRES_TOKEN, "clickhouse": _CLICKHOUSE_TOKEN}

# Clauses that may follow PARTITION BY in ClickHouse DDL: a partition expression never contains them
# outside parentheses.
CLICKHOUSE_CLAUSES = frozenset(
    {"ORDER", "PRIMARY", "SAMPLE", "TTL", "SETTINGS", "ENGINE", "FORMAT", "COMMENT", "AS", "SELECT", "UNION", "INTO"}
)


class InvalidFragment(ValueError):
    """A user-supplied SQL fragment is not a single expression; the message says why."""


def check_expression(text: str, what: str, dialect: str, refused_words: Iterable[str] = ()) -> str:
    """`text` stripped, if it is one expression by the rules above in `dialect` (`postgresql` or
    `clickhouse`); else InvalidFragment naming `what`."""
    token_re = _TOKENS[dialect]
    fragment = text.strip()
    if not fragment:
        raise InvalidFragment(f"{what} is empty")
    refused = {word.upper() for word in refused_words}
    depth = 0
    pos = 0
    while pos < len(fragment):
        match = token_re.match(fragment, pos)
        assert match is not None and match.lastgroup is not None  # the punct branch matches anything
        kind, token = match.lastgroup, match.group()
        pos = match.end()
        if kind == "quote":
            raise InvalidFragment(f"{what} has an unterminated quote ({token}): {fragment!r}")
        if kind == "comment":
            raise InvalidFragment(f"{what} must not contain comments ({token!r}): {fragment!r}")
        if kind == "punct" and token == ";":
            raise InvalidFragment(f"{what} must be a single expression, without ';': {fragment!r}")
        if kind == "punct" and token == "(":
            depth += 1
        elif kind == "punct" and token == ")":
            depth -= 1
            if depth < 0:
                raise InvalidFragment(f"{what} closes a parenthesis it did not open: {fragment!r}")
        elif kind == "word" and depth == 0 and token.upper() in refused:
            raise InvalidFragment(f"{what} must be a single expression, not contain {token.upper()}: {fragment!r}")
    if depth:
        raise InvalidFragment(f"{what} leaves a parenthesis open: {fragment!r}")
    return fragment


def validate_condition(conn: psycopg.Connection, schema: str, table: str, condition: str) -> str:
    """A backfill filter as Debezium and the row count will use it: `(<condition>)`, once PostgreSQL
    planned `SELECT 1 FROM <table> WHERE (<condition>)` without running it. The statement goes through
    the extended query protocol (a prepared statement), which refuses several statements in one, and
    WHERE refuses anything but a boolean. InvalidFragment says what is wrong."""
    fragment = check_expression(condition, "the backfill condition", "postgresql")
    query = sql.SQL("EXPLAIN SELECT 1 FROM {} WHERE ({})").format(sql.Identifier(schema, table), sql.SQL(fragment))
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(query, prepare=True)
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InvalidFragment(
            f"the backfill condition is not a boolean expression on {schema}.{table}: {first} ({fragment!r})"
        ) from None
    return f"({fragment})"

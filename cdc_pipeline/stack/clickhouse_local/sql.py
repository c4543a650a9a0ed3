"""Just enough SQL lexing to find statement boundaries, FORMAT clauses and SET assignments."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from cdc_pipeline.stack.clickhouse_local.errors import syntax_error

_TOKEN_RE = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<comment>--[^\n]*|\#[ !][^\n]*|/\*.*?\*/)
  | (?P<string>'(?:[^'\\]|\\.|'')*')
  | (?P<identifier>"(?:[^"\\]|\\.|"")*"|`(?:[^`\\]|\\.|``)*`)
  | (?P<heredoc>\$(?P<tag>[A-Za-z0-9_]*)\$.*?\$(?P=tag)\$)
  | (?P<unterminated>['"`]|/\*|\$[A-Za-z0-9_]*\$)
  | (?P<word>[A-Za-z_][A-Za-z0-9_$]*)
  | (?P<number>[0-9][0-9A-Za-z_.]*)
  | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)


class Token(NamedTuple):
    kind: str
    text: str
    start: int
    end: int


class Incomplete(Exception):
    """The text ends inside a token, so more input is needed to decide."""


def tokenize(text: str) -> Iterator[Token]:
    """Yield the tokens of ``text`` lazily, skipping whitespace and comments."""
    pos = 0
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        # The catch-all punct branch means every position matches.
        assert match is not None and match.lastgroup is not None
        kind = match.lastgroup
        if kind == "unterminated":
            raise Incomplete
        pos = match.end()
        if kind not in ("space", "comment"):
            yield Token(kind, match.group(), match.start(), pos)


def _top_level(tokens: Iterable[Token]) -> Iterator[Token]:
    """Yield the tokens outside any brackets; the brackets themselves are dropped."""
    depth = 0
    for token in tokens:
        if token.kind == "punct" and token.text in "([{":
            depth += 1
        elif token.kind == "punct" and token.text in ")]}":
            depth = max(depth - 1, 0)
        elif depth == 0:
            yield token


def first_keyword(text: str) -> str:
    """The statement's first keyword, upper-cased; ``(`` for a parenthesized query."""
    try:
        first = next(tokenize(text), None)
    except Incomplete:
        return ""
    return "" if first is None else first.text.upper()


@dataclass(frozen=True)
class InsertData:
    """Where an ``INSERT ... FORMAT <fmt>`` statement ends and its inline data begins."""

    statement_end: int
    fmt: str
    data_start: int


def locate_insert_data(text: str, complete: bool) -> InsertData | None:
    """Split ``INSERT ... FORMAT <fmt> <data>``; None when the data is SQL (VALUES, SELECT, ...).

    ``text`` is the start of the request (latin-1 decoded, so offsets are byte offsets); raises
    ``Incomplete`` when it ends before the statement does and ``complete`` is false.
    """
    tokens = _top_level(tokenize(text))
    for token in tokens:
        keyword = token.text.upper() if token.kind == "word" else ""
        if keyword in ("VALUES", "SELECT", "WITH", "INFILE"):
            return None
        if keyword != "FORMAT":
            continue
        name = next(tokens, None)
        if name is None or (name.end == len(text) and not complete):
            if complete:
                return None
            raise Incomplete
        if name.kind != "word":
            return None
        return InsertData(token.start, name.text, _data_start(text, name.end, complete))
    if complete:
        return None
    raise Incomplete


def _data_start(text: str, pos: int, complete: bool) -> int:
    """Skip what ClickHouse skips after the format name: blanks, then one line break."""
    if text.startswith(";", pos):
        raise syntax_error(
            "You have excessive ';' symbol before data for INSERT. Note that there is no ';' just "
            "after format name, you need to put at least one whitespace symbol before the data."
        )
    while pos < len(text) and text[pos] in " \t\f":
        pos += 1
    if text.startswith("\r", pos):
        pos += 1
    if text.startswith("\n", pos):
        pos += 1
    if pos == len(text) and not complete:
        raise Incomplete
    return pos


@dataclass(frozen=True)
class SqlInfo:
    """What the HTTP layer needs to know about a (non-INSERT-data) SQL request."""

    keyword: str
    output_format: str | None
    multi_statement: bool


def inspect_sql(text: str) -> SqlInfo:
    """Find the statement's explicit output format and whether more statements follow it."""
    keyword = first_keyword(text)
    output_format: str | None = None
    tokens = list(_top_level(_tokens_until_incomplete(text)))
    for index, token in enumerate(tokens):
        if token.kind == "punct" and token.text == ";":
            return SqlInfo(keyword, output_format, multi_statement=index + 1 < len(tokens))
        if token.kind != "word" or token.text.upper() != "FORMAT" or index + 1 >= len(tokens):
            continue
        name = tokens[index + 1]
        after = tokens[index + 2] if index + 2 < len(tokens) else None
        # FORMAT <name> is the last clause but SETTINGS; anything else means "format" is a name.
        if name.kind == "word" and (after is None or after.text == ";" or after.text.upper() == "SETTINGS"):
            output_format = name.text
    return SqlInfo(keyword, output_format, multi_statement=False)


def _tokens_until_incomplete(text: str) -> Iterator[Token]:
    """Tokens up to an unterminated literal; chDB reports the syntax error itself."""
    try:
        yield from tokenize(text)
    except Incomplete:
        return


def set_assignments(text: str) -> dict[str, str]:
    """The ``name -> value literal`` pairs of a ``SET a = 1, b = 'x'`` statement."""
    tokens = list(_tokens_until_incomplete(text))
    assignments: dict[str, str] = {}
    groups: list[list[Token]] = [[]]
    depth = 0
    for token in tokens[1:]:
        if token.kind == "punct" and token.text in "([{":
            depth += 1
        elif token.kind == "punct" and token.text in ")]}":
            depth -= 1
        elif depth == 0 and token.kind == "punct" and token.text in ",;":
            groups.append([])
            continue
        groups[-1].append(token)
    for group in groups:
        # SET ROLE / SET DEFAULT ROLE and other shapes carry no settings.
        if len(group) >= 3 and group[0].kind == "word" and group[1].text == "=":
            assignments[group[0].text] = text[group[2].start : group[-1].end]
    return assignments


def quote_literal(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def quote_identifier(name: str) -> str:
    escaped = name.replace("\\", "\\\\").replace("`", "\\`")
    return f"`{escaped}`"

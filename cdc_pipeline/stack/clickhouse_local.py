"""Local ClickHouse HTTP endpoint backed by chDB (the ClickHouse engine running in-process).

This is a development/test stand-in: production uses a real ClickHouse server. It speaks the
part of ClickHouse's HTTP interface that ``clickhouse-connect`` uses, so code that talks to
ClickHouse only through ``clickhouse-connect`` cannot tell it from a real server:

* queries arrive as the ``query`` URL parameter, the request body, or both (ClickHouse joins
  them with a newline), or as ``multipart/form-data`` fields; ``param_<name>`` parameters bind
  ``{name:Type}`` placeholders; other URL parameters are ClickHouse settings;
* ``INSERT ... FORMAT <fmt>`` requests stream their data (chunked and/or compressed with lz4,
  zstd, gzip or deflate) into chDB's streaming insert;
* responses carry the ``X-ClickHouse-*`` headers clients read, and errors are reported the way
  ClickHouse reports them (HTTP status, ``X-ClickHouse-Exception-Code``, ``Code: N. ...`` body);
* ``session_id`` keeps ``SET``/``USE`` state between requests of one session.

It is locked down like a real server configured for one application user:

* every request but ``/ping`` (and an empty ``GET /``) needs the user and password; the endpoint refuses
  to start without a password;
* GET requests are read-only (``readonly=2``, as ClickHouse makes them), on a second chDB connection;
* the engine runs with its own users config: the user may read, write and create/alter/drop tables and
  databases, but has no SOURCES grants (``file``, ``url``, ``s3``, ``remote``, ``mysql``, ``postgresql``,
  ... and the clickhouse-local file overlay of the ``default`` database), no access management, SYSTEM,
  BACKUP, dictionaries or named collections; ``user_files_path`` is an empty private directory;
* what grants do not cover in clickhouse-local mode is refused before chDB sees it (``_check_statement``):
  ``INTO OUTFILE``, ``FROM INFILE``, the ``file()`` function, chDB's ``python()`` table function, every
  table function but the local ones (``numbers``, ``values``, ``view``, ...), table and database engines
  but the local ones (MergeTree family, Memory, Log, ...), ``ATTACH``, ``disk(...)`` and settings that
  name files (``format_schema``, ``format_template_*``, ``output_format_schema``).

One process owns the chDB data directory; MergeTree data persists there across restarts. Requests
run concurrently, each on a chDB connection of its own (read-write for POST, read-only for GET, from
two pools of up to 16 each): chDB runs the queries of different connections in parallel, so a long
read does not hold up an insert, nor the other way round.

Run it with ``python -m cdc_pipeline.stack.clickhouse_local --port 8123 --data-dir DIR``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import email.policy
import hmac
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol, cast
from urllib.parse import parse_qsl, urlsplit
from xml.sax.saxutils import escape as xml_escape

import lz4.frame
import zstandard

logger = logging.getLogger(__name__)

DEFAULT_PASSWORD_ENV = "CDC_CLICKHOUSE_PASSWORD"
# Statement text scanned for the start of INSERT data; ClickHouse's own max_query_size is 256 KiB.
_MAX_STATEMENT_BYTES = 1 << 20
# Request bodies above this size are spooled to a temporary file instead of memory.
_SPOOL_MEMORY_BYTES = 64 << 20
_COPY_CHUNK_BYTES = 1 << 20
_MAX_CHUNK_LINE = 65537
_KEEP_ALIVE_SECONDS = 30
_DEFAULT_SESSION_TIMEOUT_SECONDS = 60
_DEFAULT_OUTPUT_FORMAT = "TabSeparated"
_LOGGED_QUERY_CHARS = 200
# Requests of each kind (read-write POST, read-only GET) that run at once; more wait for a connection.
_MAX_CONNECTIONS_PER_KIND = 16

# URL parameters that the HTTP layer consumes; everything else is treated as a setting.
_TRANSPORT_PARAMS = frozenset(
    {
        "query",
        "database",
        "default_format",
        "user",
        "password",
        "quota_key",
        "query_id",
        "session_id",
        "session_timeout",
        "session_check",
        "close_session",
        "compress",
        "decompress",
        "buffer_size",
        "wait_end_of_query",
        "client_protocol_version",
        "role",
        "stacktrace",
        "enable_http_compression",
        "send_progress_in_http_headers",
        "http_headers_progress_interval_ms",
        # SET readonly=1 on the shared chDB connection could never be undone.
        "readonly",
    }
)

# Leading keywords of statements that produce a result set (ClickHouse's "pulling" pipelines).
_RESULT_KEYWORDS = frozenset(
    {
        "SELECT",
        "WITH",
        "SHOW",
        "DESCRIBE",
        "DESC",
        "EXISTS",
        "EXPLAIN",
        "CHECK",
        "FROM",
        "KILL",
        "(",
    }
)

# ClickHouse's exceptionCodeToHTTPStatus, keyed by error name (the name is in every message).
_HTTP_STATUS_BY_ERROR: dict[str, int] = {
    "REQUIRED_PASSWORD": 401,
    **dict.fromkeys(
        (
            "UNKNOWN_USER",
            "WRONG_PASSWORD",
            "AUTHENTICATION_FAILED",
            "SET_NON_GRANTED_ROLE",
            "ACCESS_DENIED",
        ),
        403,
    ),
    **dict.fromkeys(
        (
            "BAD_ARGUMENTS",
            "CANNOT_COMPILE_REGEXP",
            "CANNOT_PARSE_TEXT",
            "CANNOT_PARSE_ESCAPE_SEQUENCE",
            "CANNOT_PARSE_QUOTED_STRING",
            "CANNOT_PARSE_DATE",
            "CANNOT_PARSE_DATETIME",
            "CANNOT_PARSE_NUMBER",
            "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING",
            "CANNOT_PARSE_IPV4",
            "CANNOT_PARSE_IPV6",
            "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
            "CANNOT_PARSE_UUID",
            "DUPLICATE_COLUMN",
            "ILLEGAL_COLUMN",
            "UNKNOWN_ELEMENT_IN_AST",
            "UNKNOWN_TYPE_OF_AST_NODE",
            "THERE_IS_NO_COLUMN",
            "TOO_DEEP_AST",
            "TOO_BIG_AST",
            "UNEXPECTED_AST_STRUCTURE",
            "SYNTAX_ERROR",
            "INCORRECT_DATA",
            "TYPE_MISMATCH",
            "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
        ),
        400,
    ),
    **dict.fromkeys(
        (
            "UNKNOWN_TABLE",
            "UNKNOWN_FUNCTION",
            "UNKNOWN_IDENTIFIER",
            "UNKNOWN_TYPE",
            "UNKNOWN_STORAGE",
            "UNKNOWN_DATABASE",
            "UNKNOWN_SETTING",
            "UNKNOWN_DIRECTION_OF_SORTING",
            "UNKNOWN_AGGREGATE_FUNCTION",
            "UNKNOWN_FORMAT",
            "UNKNOWN_DATABASE_ENGINE",
            "UNKNOWN_TYPE_OF_QUERY",
            "UNKNOWN_ROLE",
        ),
        404,
    ),
    "QUERY_IS_TOO_LARGE": 413,
    "NOT_IMPLEMENTED": 501,
    "SOCKET_TIMEOUT": 503,
    "CANNOT_OPEN_FILE": 503,
    "HTTP_LENGTH_REQUIRED": 411,
    "TIMEOUT_EXCEEDED": 408,
    "CANNOT_SCHEDULE_TASK": 503,
    "UNSUPPORTED_MEDIA_TYPE": 415,
}

_ENGINE_ERROR_RE = re.compile(r"Code: (\d+)\. (?:DB::Exception: )?(.*)", re.DOTALL)
_ERROR_NAME_RE = re.compile(r"\(([A-Z][A-Z0-9_]*)\)\s*$")
# Some chDB messages already end with "(version X)"; it is re-added in ClickHouse's own form.
_VERSION_TRAILER_RE = re.compile(r"\s*\(version [^()]*(?:\([^()]*\))?\)\s*$")
_SETTING_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Hides passwords in logged statements (CREATE USER ... IDENTIFIED WITH ... BY '...').
_SECRET_RE = re.compile(r"(\bIDENTIFIED\b.*?\bBY\s+)'(?:[^'\\]|\\.)*'", re.IGNORECASE | re.DOTALL)

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


class ClickHouseError(Exception):
    """An error reported to the client the way ClickHouse reports it."""

    def __init__(self, code: int, name: str, message: str) -> None:
        suffix = f" ({name})" if name else ""
        super().__init__(f"Code: {code}. DB::Exception: {message}{suffix}")
        self.code = code
        self.name = name

    @classmethod
    def from_engine(cls, exc: BaseException) -> ClickHouseError:
        """Wrap a chDB exception, whose text embeds ``Code: N. DB::Exception: ... (NAME)``."""
        text = str(exc)
        match = _ENGINE_ERROR_RE.search(text)
        if match is None:
            return cls(1001, "STD_EXCEPTION", text.strip() or type(exc).__name__)
        message = _VERSION_TRAILER_RE.sub("", match.group(2)).strip()
        name_match = _ERROR_NAME_RE.search(message)
        name = name_match.group(1) if name_match else ""
        if name_match:
            message = message[: name_match.start()].rstrip()
        return cls(int(match.group(1)), name, message)

    @property
    def http_status(self) -> int:
        """The HTTP status ClickHouse answers this error with."""
        return _HTTP_STATUS_BY_ERROR.get(self.name, 500)

    def body(self, version: str) -> bytes:
        """The response body, including ClickHouse's version trailer."""
        return f"{self} (version {version} (official build))\n".encode()


def _syntax_error(message: str) -> ClickHouseError:
    return ClickHouseError(62, "SYNTAX_ERROR", message)


# ------------------------------------------------------------------------------------------------
# Just enough SQL lexing to find statement boundaries, FORMAT clauses and SET assignments.


class _Token(NamedTuple):
    kind: str
    text: str
    start: int
    end: int


class _Incomplete(Exception):
    """The text ends inside a token, so more input is needed to decide."""


def _tokens(text: str) -> Iterator[_Token]:
    """Yield the tokens of ``text`` lazily, skipping whitespace and comments."""
    pos = 0
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        # The catch-all punct branch means every position matches.
        assert match is not None and match.lastgroup is not None
        kind = match.lastgroup
        if kind == "unterminated":
            raise _Incomplete
        pos = match.end()
        if kind not in ("space", "comment"):
            yield _Token(kind, match.group(), match.start(), pos)


def _top_level(tokens: Iterable[_Token]) -> Iterator[_Token]:
    """Yield the tokens outside any brackets; the brackets themselves are dropped."""
    depth = 0
    for token in tokens:
        if token.kind == "punct" and token.text in "([{":
            depth += 1
        elif token.kind == "punct" and token.text in ")]}":
            depth = max(depth - 1, 0)
        elif depth == 0:
            yield token


def _first_keyword(text: str) -> str:
    """The statement's first keyword, upper-cased; ``(`` for a parenthesized query."""
    try:
        first = next(_tokens(text), None)
    except _Incomplete:
        return ""
    return "" if first is None else first.text.upper()


@dataclass(frozen=True)
class _InsertData:
    """Where an ``INSERT ... FORMAT <fmt>`` statement ends and its inline data begins."""

    statement_end: int
    fmt: str
    data_start: int


def _locate_insert_data(text: str, complete: bool) -> _InsertData | None:
    """Split ``INSERT ... FORMAT <fmt> <data>``; None when the data is SQL (VALUES, SELECT, ...).

    ``text`` is the start of the request (latin-1 decoded, so offsets are byte offsets); raises
    ``_Incomplete`` when it ends before the statement does and ``complete`` is false.
    """
    tokens = _top_level(_tokens(text))
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
            raise _Incomplete
        if name.kind != "word":
            return None
        return _InsertData(token.start, name.text, _data_start(text, name.end, complete))
    if complete:
        return None
    raise _Incomplete


def _data_start(text: str, pos: int, complete: bool) -> int:
    """Skip what ClickHouse skips after the format name: blanks, then one line break."""
    if text.startswith(";", pos):
        raise _syntax_error(
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
        raise _Incomplete
    return pos


@dataclass(frozen=True)
class _SqlInfo:
    """What the HTTP layer needs to know about a (non-INSERT-data) SQL request."""

    keyword: str
    output_format: str | None
    multi_statement: bool


def _inspect_sql(text: str) -> _SqlInfo:
    """Find the statement's explicit output format and whether more statements follow it."""
    keyword = _first_keyword(text)
    output_format: str | None = None
    tokens = list(_top_level(_tokens_until_incomplete(text)))
    for index, token in enumerate(tokens):
        if token.kind == "punct" and token.text == ";":
            return _SqlInfo(keyword, output_format, multi_statement=index + 1 < len(tokens))
        if token.kind != "word" or token.text.upper() != "FORMAT" or index + 1 >= len(tokens):
            continue
        name = tokens[index + 1]
        after = tokens[index + 2] if index + 2 < len(tokens) else None
        # FORMAT <name> is the last clause but SETTINGS; anything else means "format" is a name.
        if name.kind == "word" and (after is None or after.text == ";" or after.text.upper() == "SETTINGS"):
            output_format = name.text
    return _SqlInfo(keyword, output_format, multi_statement=False)


def _tokens_until_incomplete(text: str) -> Iterator[_Token]:
    """Tokens up to an unterminated literal; chDB reports the syntax error itself."""
    try:
        yield from _tokens(text)
    except _Incomplete:
        return


def _set_assignments(text: str) -> dict[str, str]:
    """The ``name -> value literal`` pairs of a ``SET a = 1, b = 'x'`` statement."""
    tokens = list(_tokens_until_incomplete(text))
    assignments: dict[str, str] = {}
    groups: list[list[_Token]] = [[]]
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


def _quote_literal(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def _quote_identifier(name: str) -> str:
    escaped = name.replace("\\", "\\\\").replace("`", "\\`")
    return f"`{escaped}`"


# ------------------------------------------------------------------------------------------------
# Lock-down of what grants do not cover: in clickhouse-local mode chDB ignores user_files_path, and
# some statements, functions and engines reach files, other servers or the host process without
# any grant. They are refused here, on ClickHouse's own tokens (case, comments and quoting included).

# Table functions that only compute or read this server's own tables; every other one is refused.
_LOCAL_TABLE_FUNCTIONS = frozenset(
    {
        "numbers", "numbers_mt", "zeros", "zeros_mt", "generaterandom", "generate_series", "generateseries",
        "values", "null", "view", "merge", "loop", "format", "input", "primes",
    }
)  # fmt: skip
# Refused whatever the engine lists: the file() scalar function, dynamic disks, chDB's python().
_REFUSED_FUNCTIONS = frozenset(
    {
        "file", "disk", "python", "url", "s3", "remote", "remotesecure", "mysql", "postgresql", "hdfs", "jdbc",
        "odbc", "sqlite", "mongodb", "redis", "azureblobstorage", "gcs", "cluster", "clusterallreplicas",
        "executable", "dictionary", "filesystem", "catboostevaluate",
    }
)  # fmt: skip
# Table and database engines that keep data in this server's own storage; every other one is refused.
_LOCAL_ENGINES = frozenset(
    {
        "mergetree", "replacingmergetree", "summingmergetree", "aggregatingmergetree", "collapsingmergetree",
        "versionedcollapsingmergetree", "coalescingmergetree", "graphitemergetree", "memory", "log", "tinylog",
        "stripelog", "null", "set", "join", "buffer", "view", "materializedview", "merge", "generaterandom",
        "atomic", "ordinary",
    }
)  # fmt: skip
# Statements that read or write paths of the host, whatever the grants.
_REFUSED_STATEMENTS = frozenset({"ATTACH", "BACKUP", "RESTORE", "SYSTEM", "INSTALL"})
_REFUSED_KEYWORDS = frozenset({"OUTFILE", "INFILE"})
# Settings that name files to read or write (format schemas and templates).
_REFUSED_SETTING_RE = re.compile(r"^(format_schema|format_template|output_format_schema)", re.IGNORECASE)


def _access_denied(what: str) -> ClickHouseError:
    return ClickHouseError(
        497,
        "ACCESS_DENIED",
        f"{what} is not allowed on this endpoint: it reaches files, other servers or the host process "
        "(the local development endpoint is locked down like a server without SOURCES grants)",
    )


def _check_setting_name(name: str) -> None:
    if _REFUSED_SETTING_RE.match(name):
        raise _access_denied(f"Setting {name}")


def _token_name(token: _Token) -> str | None:
    """A bare or quoted name's text (ClickHouse accepts `file`('x') as a call of file); else None."""
    if token.kind == "word":
        return token.text
    if token.kind == "identifier":
        quote = token.text[0]
        return token.text[1:-1].replace(quote * 2, quote).replace("\\" + quote, quote)
    return None


def _plain_reattach(tokens: list[_Token]) -> bool:
    """`ATTACH TABLE [IF NOT EXISTS] [db.]name`: re-attaching a detached table of this server, which a real
    server allows with grants. Every other ATTACH (FROM a path, a column list, a dictionary) is refused."""
    words = [t for t in tokens if not (t.kind == "punct" and t.text == ";")]
    if len(words) < 3 or words[0].text.upper() != "ATTACH" or words[1].text.upper() != "TABLE":
        return False
    rest = words[2:]
    if len(rest) >= 3 and [t.text.upper() for t in rest[:3]] == ["IF", "NOT", "EXISTS"]:
        rest = rest[3:]
    if len(rest) == 3 and rest[1].text == ".":
        rest = [rest[0], rest[2]]
    return 1 <= len(rest) <= 2 and all(t.kind in ("word", "identifier") for t in rest)


def _check_statement(text: str, refused_functions: frozenset[str]) -> None:
    """Refuse what a locked-down server would refuse but chDB in clickhouse-local mode runs anyway."""
    try:
        # ClickHouse skips Unicode whitespace (e.g. U+00A0) between tokens and allows no other
        # non-ASCII character outside literals: so `file\u00a0(...)` is a call of file().
        tokens = [t for t in _tokens(text) if not (t.kind == "punct" and ord(t.text) > 0x7F)]
    except _Incomplete:
        # Unterminated quote or comment: refused before the engine guesses where it ends.
        raise _syntax_error("Unterminated quoted string, identifier or comment") from None
    refused = tokens and tokens[0].kind == "word" and tokens[0].text.upper() in _REFUSED_STATEMENTS
    if refused and not _plain_reattach(tokens):
        raise _access_denied(f"{tokens[0].text.upper()} statement")
    for index, token in enumerate(tokens):
        name = _token_name(token)
        if name is None:
            continue
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if token.kind == "word" and name.upper() in _REFUSED_KEYWORDS:
            raise _access_denied(f"{'INTO OUTFILE' if name.upper() == 'OUTFILE' else 'FROM INFILE'}")
        if following is not None and following.text == "(" and name.lower() in refused_functions:
            raise _access_denied(f"Function {name}()")
        if following is not None and following.text == "=" and _REFUSED_SETTING_RE.match(name):
            raise _access_denied(f"Setting {name}")
        if token.kind == "word" and name.upper() == "ENGINE":
            position = index + 2 if following is not None and following.text == "=" else index + 1
            engine = _token_name(tokens[position]) if position < len(tokens) else None
            if engine is not None and engine.lower() not in _LOCAL_ENGINES:
                raise _access_denied(f"Engine {engine}")


# ------------------------------------------------------------------------------------------------
# Request bodies: framing (Content-Length / chunked) and Content-Encoding.


class _Decompressor(Protocol):
    eof: bool
    unused_data: bytes

    def decompress(self, data: bytes) -> bytes: ...


_DECOMPRESSORS: dict[str, Callable[[], _Decompressor]] = {
    "lz4": lambda: cast(_Decompressor, lz4.frame.LZ4FrameDecompressor()),
    "zstd": lambda: cast(_Decompressor, zstandard.ZstdDecompressor().decompressobj()),
    "gzip": lambda: cast(_Decompressor, zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)),
    "x-gzip": lambda: cast(_Decompressor, zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)),
    "deflate": lambda: cast(_Decompressor, zlib.decompressobj()),
}


def _decompress(chunks: Iterable[bytes], encoding: str) -> Iterator[bytes]:
    """Decode a Content-Encoding stream made of one or more concatenated frames.

    clickhouse-connect compresses every insert block as its own lz4/zstd frame.
    """
    factory = _DECOMPRESSORS.get(encoding)
    if factory is None:
        raise ClickHouseError(89, "UNKNOWN_COMPRESSION_METHOD", f"Unknown HTTP Content-Encoding: {encoding!r}")
    decoder = factory()
    pending = False
    try:
        for chunk in chunks:
            while chunk:
                pending = True
                output = decoder.decompress(chunk)
                if output:
                    yield output
                if not decoder.eof:
                    break
                chunk = decoder.unused_data
                decoder = factory()
                pending = False
    except (RuntimeError, zlib.error, zstandard.ZstdError) as exc:
        raise ClickHouseError(271, "CANNOT_DECOMPRESS", f"Cannot decompress request body: {exc}") from exc
    if pending:
        raise ClickHouseError(271, "CANNOT_DECOMPRESS", "Unexpected end of compressed request body")


def _content_length_body(rfile: IO[bytes], length: int) -> Iterator[bytes]:
    remaining = length
    while remaining > 0:
        data = rfile.read(min(remaining, _COPY_CHUNK_BYTES))
        if not data:
            raise ClickHouseError(33, "CANNOT_READ_ALL_DATA", "Request body ended early")
        remaining -= len(data)
        yield data


def _chunked_body(rfile: IO[bytes]) -> Iterator[bytes]:
    while True:
        line = rfile.readline(_MAX_CHUNK_LINE)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError as exc:
            raise ClickHouseError(33, "CANNOT_READ_ALL_DATA", "Malformed chunked body") from exc
        if size == 0:
            # Drain optional trailer fields up to the terminating blank line.
            while rfile.readline(_MAX_CHUNK_LINE) not in (b"\r\n", b"\n", b""):
                pass
            return
        yield from _content_length_body(rfile, size)
        rfile.readline(_MAX_CHUNK_LINE)


def _parse_form(content_type: str, body: bytes) -> dict[str, str]:
    """The fields of a ``multipart/form-data`` body (query text and ``param_*`` bindings)."""
    raw = f"Content-Type: {content_type}\r\n\r\n".encode() + body
    message = cast(EmailMessage, BytesParser(policy=email.policy.HTTP).parsebytes(raw))
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if part.get_filename() is not None:
            raise ClickHouseError(48, "NOT_IMPLEMENTED", "External data tables are not supported by this endpoint")
        if isinstance(name, str):
            payload = part.get_payload(decode=True)
            fields[name] = payload.decode() if isinstance(payload, bytes) else ""
    return fields


# ------------------------------------------------------------------------------------------------
# The chDB engine.


@dataclass
class _Session:
    """What a ClickHouse HTTP session keeps between requests: SET values (as SQL literals), USE."""

    settings: dict[str, str] = field(default_factory=dict)
    database: str | None = None
    expires_at: float = 0.0
    in_use: bool = False


@dataclass(frozen=True)
class RequestContext:
    """Per-request execution state taken from the HTTP request."""

    database: str | None = None
    settings: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    session_id: str | None = None
    session_timeout: float = _DEFAULT_SESSION_TIMEOUT_SECONDS
    close_session: bool = False


@dataclass(frozen=True)
class QueryOutcome:
    """A finished statement: its output bytes and ClickHouse-style summary counters."""

    body: bytes
    summary: dict[str, str]


@dataclass
class _Connection:
    """One chDB connection and the settings and current database applied to it."""

    conn: Any
    applied: dict[str, str] = field(default_factory=dict)
    database: str = "default"


# The engine's users config: what a real server's administrator would grant an application user.
# No SOURCES (FILE, URL, S3, REMOTE, MYSQL, POSTGRES, ...: also the clickhouse-local file overlay of the
# `default` database), no access management, SYSTEM, BACKUP, dictionaries, functions or named collections.
_GRANTS = (
    "GRANT SHOW, SELECT, INSERT, ALTER, CREATE DATABASE, CREATE TABLE, CREATE VIEW, CREATE TEMPORARY TABLE, "
    "DROP DATABASE, DROP TABLE, DROP VIEW, TRUNCATE, OPTIMIZE, KILL QUERY ON *.*"
)


def _write_engine_config(directory: Path) -> Path:
    """The clickhouse-local config chDB starts with: the users config above and empty private
    directories for user files, scripts and format schemas. Returns the config file."""
    paths = {name: directory / name for name in ("user_files", "user_scripts", "format_schemas")}
    for path in paths.values():
        path.mkdir(mode=0o700)
    users = directory / "users.xml"
    users.write_text(
        "<clickhouse>\n"
        "  <profiles><default/></profiles>\n"
        "  <quotas><default/></quotas>\n"
        "  <users><default>\n"
        "    <password/>\n"
        "    <networks><ip>::1</ip><ip>127.0.0.1</ip></networks>\n"
        "    <profile>default</profile><quota>default</quota>\n"
        f"    <grants><query>{xml_escape(_GRANTS)}</query></grants>\n"
        "  </default></users>\n"
        "</clickhouse>\n"
    )
    config = directory / "config.xml"
    config.write_text(
        "<clickhouse>\n"
        f"  <users_config>{xml_escape(str(users))}</users_config>\n"
        f"  <user_files_path>{xml_escape(str(paths['user_files']))}/</user_files_path>\n"
        f"  <user_scripts_path>{xml_escape(str(paths['user_scripts']))}/</user_scripts_path>\n"
        f"  <format_schema_path>{xml_escape(str(paths['format_schemas']))}/</format_schema_path>\n"
        "</clickhouse>\n"
    )
    return config


class _ConnectionPool:
    """The chDB connections of one kind (read-write, or read-only for GET), each used by one request at a
    time. chDB runs the queries of different connections in parallel (its engine releases the GIL), so a
    request waits for another only when ``limit`` connections of its kind are busy. Connections are opened
    on demand (another connection to the running engine costs about 0.1 ms) and kept until ``close``."""

    def __init__(self, open_connection: Callable[[], _Connection], limit: int) -> None:
        self._open = open_connection
        self._limit = limit
        self._idle: list[_Connection] = []
        self._busy = 0
        self._closed = False
        self._changed = threading.Condition()

    def add(self, connection: _Connection) -> None:
        """Hand an already open connection to the pool."""
        with self._changed:
            self._idle.append(connection)
            self._changed.notify_all()

    @contextmanager
    def acquire(self) -> Iterator[_Connection]:
        """A connection for the block, used by nothing else meanwhile."""
        with self._changed:
            while not self._closed and not self._idle and self._busy >= self._limit:
                self._changed.wait()
            if self._closed:
                raise ClickHouseError(236, "ABORTED", "Server is shutting down")
            connection = self._idle.pop() if self._idle else None
            self._busy += 1
        try:
            if connection is None:
                connection = self._open()
            yield connection
        finally:
            with self._changed:
                self._busy -= 1
                if connection is not None:
                    self._idle.append(connection)
                self._changed.notify_all()

    def close(self) -> None:
        """Refuse new requests, wait for the running ones, then close every connection."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            while self._busy:
                self._changed.wait()
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.conn.close()


class ChdbEngine:
    """The chDB engine of the process, with HTTP-session semantics layered on top.

    ClickHouse gives every HTTP request fresh settings and database (or those of its session),
    whereas chDB keeps ``SET``/``USE`` state on the connection. The engine tracks the state it
    has applied to each connection and diffs it against what each request needs, so requests never
    see each other's settings and repeated identical settings cost nothing.

    Requests run concurrently, each on a chDB connection of its own taken from one of two pools that
    share the data: read-write connections for POST requests, and connections fixed at ``readonly = 2``
    for GET requests. As on a ClickHouse server, a session runs one request at a time: a request of a
    session that is busy with another one fails with ``SESSION_IS_LOCKED``.
    """

    def __init__(self, data_dir: str, timezone: str = "UTC", max_connections: int = _MAX_CONNECTIONS_PER_KIND) -> None:
        """Open (or create) the chDB data in ``data_dir``.

        ``timezone`` becomes the server time zone; it is set as the process's TZ, which only
        takes effect if chDB has not been imported yet (the actual zone is read back).
        ``max_connections`` bounds the requests of each kind (read-write, read-only) that run at once;
        more wait for a connection.
        """
        data_path = os.path.abspath(data_dir)
        if "?" in data_path or "&" in data_path:
            raise ValueError(f"The chDB data directory path must not contain '?' or '&': {data_path}")
        os.makedirs(data_path, exist_ok=True)
        # ClickHouse takes its default time zone from TZ when the engine starts.
        os.environ["TZ"] = timezone
        time.tzset()
        import chdb  # noqa: PLC0415 - deferred so the TZ above applies to the engine

        self._sessions_lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._config_dir = Path(tempfile.mkdtemp(prefix="cdc-chdb-config-"))
        url = f"file:{data_path}?config-file={_write_engine_config(self._config_dir)}"

        def open_read_write() -> _Connection:
            return _Connection(chdb.connect(url))

        def open_readonly() -> _Connection:
            connection = _Connection(chdb.connect(url))
            try:
                # Like ClickHouse's GET: no writes, no DDL, settings may change but readonly may not.
                self._run(connection, b"SET readonly = 2", "TabSeparated", {})
            except BaseException:
                connection.conn.close()
                raise
            return connection

        self._pools = {
            False: _ConnectionPool(open_read_write, max_connections),
            True: _ConnectionPool(open_readonly, max_connections),
        }
        try:
            # The first connection starts the engine, which stops when the last one is closed.
            self._pools[False].add(open_read_write())
            self._pools[True].add(open_readonly())
            with self._pools[False].acquire() as connection:
                row = self._run(connection, b"SELECT version(), timezone()", "TabSeparated", {})
                names = self._run(connection, b"SELECT name FROM system.table_functions", "TSV", {})
        except BaseException:
            self.close()
            raise
        self.version, self.timezone = row.bytes().decode().rstrip("\n").split("\t")
        available = {name.lower() for name in names.bytes().decode().split()}
        self.refused_functions = frozenset((available - _LOCAL_TABLE_FUNCTIONS) | _REFUSED_FUNCTIONS)

    def query(self, ctx: RequestContext, sql: bytes, fmt: str, keyword: str, *, readonly: bool = False) -> QueryOutcome:
        """Run one SQL statement, returning its output in ``fmt`` unless it names a FORMAT."""
        assignments = _set_assignments(sql.decode(errors="replace")) if keyword == "SET" else {}
        if "readonly" in assignments:
            raise ClickHouseError(48, "NOT_IMPLEMENTED", "SET readonly would lock this endpoint's shared chDB session")
        with self._session(ctx) as session, self._pools[readonly].acquire() as connection:
            self._prepare(connection, ctx, session)
            started = time.monotonic()
            result = self._run(connection, sql, fmt, ctx.params)
            elapsed = time.monotonic() - started
            if keyword == "USE":
                current = self._run(connection, b"SELECT currentDatabase()", "TabSeparated", {})
                connection.database = current.bytes().decode().rstrip("\n")
                if session is not None:
                    session.database = connection.database
            elif assignments:
                # Without a session the next request resets these, as ClickHouse forgets them.
                connection.applied.update(assignments)
                if session is not None:
                    session.settings.update(assignments)
            body = result.bytes()
        return QueryOutcome(
            body,
            {
                "read_rows": str(result.rows_read()),
                "read_bytes": str(result.bytes_read()),
                "written_rows": str(result.rows_written()),
                "written_bytes": str(result.bytes_written()),
                "total_rows_to_read": "0",
                "result_bytes": str(len(body)),
                "elapsed_ns": str(int(elapsed * 1e9)),
            },
        )

    def insert(self, ctx: RequestContext, statement: str, fmt: str, data: Iterable[bytes]) -> QueryOutcome:
        """Stream ``data`` (encoded in ``fmt``) into ``statement`` (an INSERT without FORMAT)."""
        with self._session(ctx) as session, self._pools[False].acquire() as connection:
            self._prepare(connection, ctx, session)
            started = time.monotonic()
            try:
                # Leaving the block without finish() cancels the insert: nothing is committed.
                with connection.conn.send_insert(statement, fmt) as inserter:
                    for chunk in data:
                        inserter.append(chunk)
                    written = inserter.finish()
            except Exception as exc:
                raise ClickHouseError.from_engine(exc) from exc
            elapsed = time.monotonic() - started
        return QueryOutcome(
            b"",
            {
                "read_rows": str(written.rows_written),
                "read_bytes": str(written.bytes_written),
                "written_rows": str(written.rows_written),
                "written_bytes": str(written.bytes_written),
                "total_rows_to_read": "0",
                "result_bytes": "0",
                "elapsed_ns": str(int(elapsed * 1e9)),
            },
        )

    def close(self) -> None:
        """Refuse new requests (ABORTED), wait for the running ones, and close the chDB connections."""
        for pool in self._pools.values():
            pool.close()
        shutil.rmtree(self._config_dir, ignore_errors=True)

    def _run(self, connection: _Connection, sql: bytes, fmt: str, params: Mapping[str, str]) -> Any:
        try:
            return connection.conn.query(sql, fmt, params=dict(params))
        except Exception as exc:
            error = ClickHouseError.from_engine(exc)
            if error.name == "ACCESS_DENIED" and "READ ON FILE" in str(error):
                # clickhouse-local looks an unknown table of `default` up as a file, which the missing
                # grant refuses: to a client, as on a real server, it is an unknown table.
                raise ClickHouseError(
                    60, "UNKNOWN_TABLE", "Unknown table expression identifier (files are not tables here)"
                ) from exc
            raise error from exc

    def _prepare(self, connection: _Connection, ctx: RequestContext, session: _Session | None) -> None:
        """Bring the connection's settings and current database to what ``ctx`` (and its session) asks for."""
        desired = dict(session.settings) if session is not None else {}
        for name, value in ctx.settings.items():
            if not _SETTING_NAME_RE.fullmatch(name):
                raise ClickHouseError(115, "UNKNOWN_SETTING", f"Unknown setting '{name}'")
            _check_setting_name(name)
            desired[name] = _quote_literal(value)
        for name in [name for name in connection.applied if name not in desired]:
            del connection.applied[name]
            try:
                self._run(connection, f"SET {name} = DEFAULT".encode(), "TabSeparated", {})
            except ClickHouseError as exc:
                logger.warning("Could not reset setting %s: %s", name, exc)
        for name, literal in desired.items():
            if connection.applied.get(name) != literal:
                self._run(connection, f"SET {name} = {literal}".encode(), "TabSeparated", {})
                connection.applied[name] = literal
        database = ctx.database or (session.database if session else None) or "default"
        if database != connection.database:
            self._run(connection, f"USE {_quote_identifier(database)}".encode(), "TabSeparated", {})
            connection.database = database

    @contextmanager
    def _session(self, ctx: RequestContext) -> Iterator[_Session | None]:
        """The request's session (None without ``session_id``), held by this request for the block."""
        if ctx.session_id is None:
            yield None
            return
        with self._sessions_lock:
            now = time.monotonic()
            for session_id in [sid for sid, s in self._sessions.items() if s.expires_at < now and not s.in_use]:
                del self._sessions[session_id]
            session = self._sessions.setdefault(ctx.session_id, _Session())
            if session.in_use:
                raise ClickHouseError(
                    373, "SESSION_IS_LOCKED", f"Session {ctx.session_id} is locked by a concurrent client"
                )
            session.in_use = True
            session.expires_at = now + ctx.session_timeout
        try:
            yield session
        finally:
            with self._sessions_lock:
                session.in_use = False
                session.expires_at = time.monotonic() + ctx.session_timeout
                if ctx.close_session:
                    self._sessions.pop(ctx.session_id, None)


# ------------------------------------------------------------------------------------------------
# HTTP layer.


@dataclass(frozen=True)
class Credentials:
    """The one user the endpoint accepts, with its password."""

    user: str = "default"
    password: str | None = None

    def check(self, headers: Mapping[str, str], params: Mapping[str, str]) -> None:
        """Raise AUTHENTICATION_FAILED unless the request carries the configured credentials."""
        if not self.password:
            raise ClickHouseError(516, "AUTHENTICATION_FAILED", "No password is configured: every request is refused")
        user, password = _request_credentials(headers, params)
        user_ok = hmac.compare_digest(user.encode(), self.user.encode())
        password_ok = hmac.compare_digest(password.encode(), self.password.encode())
        if not (user_ok and password_ok):
            raise ClickHouseError(
                516,
                "AUTHENTICATION_FAILED",
                f"{user}: Authentication failed: password is incorrect, or there is no user with such name.",
            )


def _request_credentials(headers: Mapping[str, str], params: Mapping[str, str]) -> tuple[str, str]:
    """User and password from X-ClickHouse-* headers, else Basic auth, else URL parameters."""
    if headers.get("X-ClickHouse-User") is not None or headers.get("X-ClickHouse-Key") is not None:
        return headers.get("X-ClickHouse-User") or "default", headers.get("X-ClickHouse-Key") or ""
    authorization = headers.get("Authorization") or ""
    if authorization[:6].lower() == "basic ":
        try:
            decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise ClickHouseError(516, "AUTHENTICATION_FAILED", "Malformed Basic authorization header") from exc
        user, _, password = decoded.partition(":")
        return user or "default", password
    return params.get("user") or "default", params.get("password", "")


def _content_type(fmt: str) -> str:
    """The Content-Type ClickHouse sends for an output format."""
    name = fmt.lower()
    if name.startswith(("tabseparated", "tsv")):
        return "text/tab-separated-values; charset=UTF-8"
    if name.startswith("csv"):
        header = "present" if "withnames" in name else "absent"
        return f"text/csv; charset=UTF-8; header={header}"
    if name.startswith("json"):
        return "application/json; charset=UTF-8"
    if name in ("native", "arrow", "arrowstream", "parquet", "orc", "avro") or name.startswith("rowbinary"):
        return "application/octet-stream"
    return "text/plain; charset=UTF-8"


def _log_text(statement: str) -> str:
    """A statement shortened to one line for the request log, with passwords hidden."""
    text = " ".join(_SECRET_RE.sub(r"\1'[HIDDEN]'", statement).split())
    if len(text) > _LOGGED_QUERY_CHARS:
        return text[:_LOGGED_QUERY_CHARS] + "..."
    return text


@dataclass
class _Response:
    status: int
    body: bytes
    headers: dict[str, str]


class _SpooledBody:
    """A decoded request body, spooled to memory or a temporary file."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._file = tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY_BYTES)  # noqa: SIM115
        self.size = 0
        try:
            for chunk in chunks:
                self._file.write(chunk)
                self.size += len(chunk)
        except BaseException:
            self._file.close()
            raise
        self._file.seek(0)

    def read(self, size: int = -1) -> bytes:
        return self._file.read(size)

    def chunks(self) -> Iterator[bytes]:
        return iter(lambda: self._file.read(_COPY_CHUNK_BYTES), b"")

    def close(self) -> None:
        self._file.close()


class ClickHouseLocalServer(ThreadingHTTPServer):
    """A threading HTTP server exposing a ``ChdbEngine`` through ClickHouse's HTTP protocol."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], engine: ChdbEngine, credentials: Credentials) -> None:
        """Bind ``address`` (port 0 picks a free port) and serve ``engine``."""
        super().__init__(address, _Handler)
        self.engine = engine
        self.credentials = credentials
        self.display_name = socket.gethostname()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log connection-level failures (e.g. a client hanging up) instead of printing them."""
        logger.warning("Connection from %s failed", client_address[0], exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "clickhouse-local-chdb"
    # Idle keep-alive connections are closed after this many seconds.
    timeout = _KEEP_ALIVE_SECONDS
    # Headers and body go out in separate writes; Nagle + delayed ACK would stall each reply.
    disable_nagle_algorithm = True
    server: ClickHouseLocalServer

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._handle()

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        self._handle()

    def version_string(self) -> str:
        """The Server header value."""
        return self.server_version

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Suppress http.server's access log; ``_handle`` logs one line per request."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server signature
        """Route http.server's own messages (bad request lines, idle timeouts) to debug logging."""
        logger.debug("%s: %s", self.address_string(), format % args)

    def _handle(self) -> None:
        started = time.monotonic()
        url = urlsplit(self.path)
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        query_id = params.get("query_id") or str(uuid.uuid4())
        self._body_read = False
        self._statement = ""
        try:
            if url.path.rstrip("/").endswith("/ping") or self._is_bare_get(params):
                response = _Response(200, b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"})
            else:
                self.server.credentials.check(self.headers, params)
                response = self._execute(params)
        except ClickHouseError as exc:
            response = self._error_response(exc)
        except Exception as exc:
            logger.exception("Unexpected error handling %s %s", self.command, url.path)
            response = self._error_response(ClickHouseError(1001, "STD_EXCEPTION", repr(exc)))
        response.headers["X-ClickHouse-Query-Id"] = query_id
        self._send(response)
        error_code = response.headers.get("X-ClickHouse-Exception-Code")
        logger.info(
            "%s %s %d %.1fms query_id=%s%s %s",
            self.command,
            url.path,
            response.status,
            (time.monotonic() - started) * 1000,
            query_id,
            f" code={error_code}" if error_code else "",
            _log_text(self._statement),
        )

    def _is_bare_get(self, params: Mapping[str, str]) -> bool:
        """``GET /`` with no query: ClickHouse's (unauthenticated) "Ok." page."""
        return (
            self.command == "GET"
            and not params.get("query")
            and self.headers.get("Content-Length", "0") in ("", "0")
            and not self.headers.get("Transfer-Encoding")
        )

    def _execute(self, params: dict[str, str]) -> _Response:
        body = self._read_body()
        try:
            content_type = self.headers.get("Content-Type") or ""
            if content_type.lower().startswith("multipart/form-data"):
                params.update(_parse_form(content_type, body.read()))
                # The form carried the whole request; nothing is left to treat as query text.
                body.close()
                body = _SpooledBody(())
            query_param = params.get("query", "")
            if not query_param and body.size == 0:
                if self.command == "GET":
                    return _Response(200, b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"})
                raise _syntax_error("Empty query")
            return self._run(params, query_param, body)
        finally:
            body.close()

    def _run(self, params: dict[str, str], query_param: str, body: _SpooledBody) -> _Response:
        ctx = _request_context(params)
        engine = self.server.engine
        head = (query_param.encode() + b"\n" if query_param else b"") + body.read(_MAX_STATEMENT_BYTES)
        complete = body.size <= _MAX_STATEMENT_BYTES
        # latin-1 maps bytes 1:1 to characters, so text offsets are byte offsets.
        head_text = head.decode("latin-1")
        keyword = _first_keyword(head_text)
        split = None
        if keyword == "INSERT":
            try:
                split = _locate_insert_data(head_text, complete)
            except _Incomplete:
                raise _syntax_error("Max query size exceeded") from None
        readonly = self.command == "GET"
        if split is not None and split.fmt.lower() == "values":
            # Values data may hold SQL expressions (file(...) included), which ClickHouse evaluates:
            # the request is checked and run as one SQL text, like INSERT ... VALUES.
            split = None
        if split is not None:
            statement = head[: split.statement_end].decode(errors="replace").strip()
            self._statement = f"{statement} FORMAT {split.fmt}"
            _check_statement(head_text[: split.statement_end], engine.refused_functions)
            if readonly:
                raise _readonly_error()
            data = itertools.chain([head[split.data_start :]], body.chunks())
            return self._ok(engine.insert(ctx, statement, split.fmt, data), None)
        sql = head + body.read()
        self._statement = sql.decode(errors="replace")
        info = _inspect_sql(sql.decode("latin-1"))
        if info.multi_statement:
            raise _syntax_error("Multi-statements are not allowed")
        _check_statement(sql.decode("latin-1"), engine.refused_functions)
        fmt = info.output_format or params.get("default_format") or _DEFAULT_OUTPUT_FORMAT
        try:
            outcome = engine.query(ctx, sql, fmt, keyword, readonly=readonly)
        except ClickHouseError as exc:
            if readonly and exc.name == "READONLY":
                raise _readonly_error() from None
            raise
        produces_result = keyword in _RESULT_KEYWORDS or bool(outcome.body)
        return self._ok(outcome, fmt if produces_result else None)

    def _ok(self, outcome: QueryOutcome, fmt: str | None) -> _Response:
        headers = {
            "Content-Type": _content_type(fmt) if fmt else "text/plain; charset=UTF-8",
            "X-ClickHouse-Server-Display-Name": self.server.display_name,
            "X-ClickHouse-Timezone": self.server.engine.timezone,
            "X-ClickHouse-Summary": json.dumps(outcome.summary, separators=(",", ":")),
        }
        # clickhouse-connect's command() reads this header to tell result sets from DDL.
        if fmt:
            headers["X-ClickHouse-Format"] = fmt
        return _Response(200, outcome.body, headers)

    def _error_response(self, error: ClickHouseError) -> _Response:
        headers = {
            "Content-Type": "text/plain; charset=UTF-8",
            "X-ClickHouse-Server-Display-Name": self.server.display_name,
            "X-ClickHouse-Exception-Code": str(error.code),
        }
        return _Response(error.http_status, error.body(self.server.engine.version), headers)

    def _read_body(self) -> _SpooledBody:
        """Read and decode the whole request body, so the connection stays usable on errors."""
        chunks: Iterable[bytes]
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = _chunked_body(self.rfile)
        else:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError as exc:
                raise ClickHouseError(33, "CANNOT_READ_ALL_DATA", "Bad Content-Length") from exc
            chunks = _content_length_body(self.rfile, length)
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding != "identity":
            chunks = _decompress(chunks, encoding)
        body = _SpooledBody(chunks)
        self._body_read = True
        return body

    def _send(self, response: _Response) -> None:
        has_body = self.headers.get("Content-Length", "0") not in ("", "0") or bool(
            self.headers.get("Transfer-Encoding")
        )
        if has_body and not self._body_read:
            # Unread request bytes would be parsed as the next request on this connection.
            self.close_connection = True
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        else:
            self.send_header("Keep-Alive", f"timeout={_KEEP_ALIVE_SECONDS}")
        self.end_headers()
        self.wfile.write(response.body)


def _readonly_error() -> ClickHouseError:
    return ClickHouseError(
        164,
        "READONLY",
        "Cannot execute query in readonly mode. For queries over HTTP, method GET implies readonly. "
        "You should use method POST for modifying queries",
    )


def _request_context(params: Mapping[str, str]) -> RequestContext:
    """Split URL parameters into query parameters, settings and session controls."""
    for name in ("compress", "decompress"):
        if params.get(name) in ("1", "true"):
            raise ClickHouseError(
                48,
                "NOT_IMPLEMENTED",
                f"{name}=1 (ClickHouse's native block compression) is not supported by this "
                "endpoint; use the Content-Encoding / Accept-Encoding HTTP headers",
            )
    settings = {
        name: value for name, value in params.items() if name not in _TRANSPORT_PARAMS and not name.startswith("param_")
    }
    query_params = {name[6:]: value for name, value in params.items() if name.startswith("param_")}
    try:
        timeout = float(params.get("session_timeout") or _DEFAULT_SESSION_TIMEOUT_SECONDS)
    except ValueError as exc:
        raise ClickHouseError(
            374,
            "INVALID_SESSION_TIMEOUT",
            f"Invalid session timeout: '{params['session_timeout']}'",
        ) from exc
    return RequestContext(
        database=params.get("database") or None,
        settings=settings,
        params=query_params,
        session_id=params.get("session_id") or None,
        session_timeout=timeout,
        close_session=params.get("close_session") in ("1", "true"),
    )


# ------------------------------------------------------------------------------------------------
# Entry points.


def serve(
    host: str,
    port: int,
    data_dir: str,
    user: str = "default",
    password: str | None = None,
    timezone: str = "UTC",
) -> None:
    """Serve ClickHouse's HTTP interface on ``host:port`` from the chDB data in ``data_dir``.

    Blocks until SIGTERM or SIGINT (handled when called from the main thread), then stops
    accepting requests and closes the chDB connection cleanly. Every request but ``/ping`` needs
    ``user`` and ``password``; a missing password is a ValueError.
    """
    if not password:
        raise ValueError("a password is required: the endpoint never serves requests without authentication")
    engine = ChdbEngine(data_dir, timezone)
    try:
        server = ClickHouseLocalServer((host, port), engine, Credentials(user, password or None))
    except BaseException:
        engine.close()
        raise

    def stop(signum: int, _frame: object) -> None:
        logger.info("Received %s, shutting down", signal.Signals(signum).name)
        # shutdown() waits for serve_forever(), which runs on this (the main) thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, stop)
    bound_host, bound_port = server.server_address[:2]
    logger.info(
        "ClickHouse %s (chDB) listening on http://%s:%d, data in %s, auth %s",
        engine.version,
        bound_host,
        bound_port,
        os.path.abspath(data_dir),
        "on",
    )
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        engine.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        logger.info("Stopped")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m cdc_pipeline.stack.clickhouse_local",
        description="Local ClickHouse HTTP endpoint backed by chDB (development/test only).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind")
    parser.add_argument("--port", type=int, default=8123, help="port to bind (0 = any free port)")
    parser.add_argument("--data-dir", required=True, help="chDB data directory (persistent)")
    parser.add_argument("--user", default="default", help="user name accepted with the password")
    parser.add_argument(
        "--password-env",
        default=DEFAULT_PASSWORD_ENV,
        help="environment variable holding the password (required)",
    )
    parser.add_argument("--timezone", default="UTC", help="server time zone")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    password = os.environ.get(args.password_env)
    if not password:
        parser.error(
            f"{args.password_env} is not set: the endpoint refuses to run without a password "
            "(scripts/setup.sh generates CDC_CLICKHOUSE_PASSWORD into .env)"
        )
    serve(args.host, args.port, args.data_dir, user=args.user, password=password, timezone=args.timezone)
    return 0


if __name__ == "__main__":
    sys.exit(main())

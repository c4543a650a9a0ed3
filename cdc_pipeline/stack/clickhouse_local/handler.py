"""The HTTP layer: one request of ClickHouse's HTTP interface, from URL parameters and body to the engine
and back to ClickHouse's response headers and error format."""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from cdc_pipeline.stack.clickhouse_local.body import (
    SpooledBody,
    chunked_body,
    content_length_body,
    decompress,
    parse_form,
)
from cdc_pipeline.stack.clickhouse_local.engine import DEFAULT_SESSION_TIMEOUT_SECONDS, QueryOutcome, RequestContext
from cdc_pipeline.stack.clickhouse_local.errors import ClickHouseError, readonly_error, syntax_error
from cdc_pipeline.stack.clickhouse_local.lockdown import check_statement
from cdc_pipeline.stack.clickhouse_local.sql import Incomplete, first_keyword, inspect_sql, locate_insert_data

if TYPE_CHECKING:
    from cdc_pipeline.stack.clickhouse_local.server import ClickHouseLocalServer

logger = logging.getLogger(__name__)

# Statement text scanned for the start of INSERT data; ClickHouse's own max_query_size is 256 KiB.
_MAX_STATEMENT_BYTES = 1 << 20
_KEEP_ALIVE_SECONDS = 30
_DEFAULT_OUTPUT_FORMAT = "TabSeparated"
_LOGGED_QUERY_CHARS = 200

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

# Hides passwords in logged statements (CREATE USER ... IDENTIFIED WITH ... BY '...').
_SECRET_RE = re.compile(r"(\bIDENTIFIED\b.*?\bBY\s+)'(?:[^'\\]|\\.)*'", re.IGNORECASE | re.DOTALL)


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


class Handler(BaseHTTPRequestHandler):
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
                params.update(parse_form(content_type, body.read()))
                # The form carried the whole request; nothing is left to treat as query text.
                body.close()
                body = SpooledBody(())
            query_param = params.get("query", "")
            if not query_param and body.size == 0:
                if self.command == "GET":
                    return _Response(200, b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"})
                raise syntax_error("Empty query")
            return self._run(params, query_param, body)
        finally:
            body.close()

    def _run(self, params: dict[str, str], query_param: str, body: SpooledBody) -> _Response:
        ctx = _request_context(params)
        engine = self.server.engine
        head = (query_param.encode() + b"\n" if query_param else b"") + body.read(_MAX_STATEMENT_BYTES)
        complete = body.size <= _MAX_STATEMENT_BYTES
        # latin-1 maps bytes 1:1 to characters, so text offsets are byte offsets.
        head_text = head.decode("latin-1")
        keyword = first_keyword(head_text)
        split = None
        if keyword == "INSERT":
            try:
                split = locate_insert_data(head_text, complete)
            except Incomplete:
                raise syntax_error("Max query size exceeded") from None
        readonly = self.command == "GET"
        if split is not None and split.fmt.lower() == "values":
            # Values data may hold SQL expressions (file(...) included), which ClickHouse evaluates:
            # the request is checked and run as one SQL text, like INSERT ... VALUES.
            split = None
        if split is not None:
            statement = head[: split.statement_end].decode(errors="replace").strip()
            self._statement = f"{statement} FORMAT {split.fmt}"
            check_statement(head_text[: split.statement_end], engine.refused_functions)
            if readonly:
                raise readonly_error()
            data = itertools.chain([head[split.data_start :]], body.chunks())
            return self._ok(engine.insert(ctx, statement, split.fmt, data), None)
        sql = head + body.read()
        self._statement = sql.decode(errors="replace")
        info = inspect_sql(sql.decode("latin-1"))
        if info.multi_statement:
            raise syntax_error("Multi-statements are not allowed")
        check_statement(sql.decode("latin-1"), engine.refused_functions)
        fmt = info.output_format or params.get("default_format") or _DEFAULT_OUTPUT_FORMAT
        try:
            outcome = engine.query(ctx, sql, fmt, keyword, readonly=readonly)
        except ClickHouseError as exc:
            if readonly and exc.name == "READONLY":
                raise readonly_error() from None
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

    def _read_body(self) -> SpooledBody:
        """Read and decode the whole request body, so the connection stays usable on errors."""
        chunks: Iterable[bytes]
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = chunked_body(self.rfile)
        else:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError as exc:
                raise ClickHouseError(33, "CANNOT_READ_ALL_DATA", "Bad Content-Length") from exc
            chunks = content_length_body(self.rfile, length)
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding != "identity":
            chunks = decompress(chunks, encoding)
        body = SpooledBody(chunks)
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
        timeout = float(params.get("session_timeout") or DEFAULT_SESSION_TIMEOUT_SECONDS)
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

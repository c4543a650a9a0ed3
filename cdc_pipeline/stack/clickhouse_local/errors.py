"""Errors reported the way ClickHouse reports them: code, name, HTTP status and message."""

from __future__ import annotations

import re

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


def syntax_error(message: str) -> ClickHouseError:
    return ClickHouseError(62, "SYNTAX_ERROR", message)


def access_denied(what: str) -> ClickHouseError:
    return ClickHouseError(
        497,
        "ACCESS_DENIED",
        f"{what} is not allowed on this endpoint: it reaches files, other servers or the host process "
        "(the local development endpoint is locked down like a server without SOURCES grants)",
    )


def readonly_error() -> ClickHouseError:
    return ClickHouseError(
        164,
        "READONLY",
        "Cannot execute query in readonly mode. For queries over HTTP, method GET implies readonly. "
        "You should use method POST for modifying queries",
    )

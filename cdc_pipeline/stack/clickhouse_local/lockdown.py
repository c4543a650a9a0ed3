"""The lock-down of the engine: the users config with the application user's grants, and the refusal of
what grants do not cover. In clickhouse-local mode chDB ignores user_files_path, and some statements,
functions and engines reach files, other servers or the host process without any grant. They are refused
here, on ClickHouse's own tokens (case, comments and quoting included)."""

from __future__ import annotations

import re
from pathlib import Path
from xml.sax.saxutils import escape as xml_escape

from cdc_pipeline.stack.clickhouse_local.errors import access_denied, syntax_error
from cdc_pipeline.stack.clickhouse_local.sql import Incomplete, Token, tokenize

# Table functions that only compute or read this server's own tables; every other one is refused.
LOCAL_TABLE_FUNCTIONS = frozenset(
    {
        "numbers", "numbers_mt", "zeros", "zeros_mt", "generaterandom", "generate_series", "generateseries",
        "values", "null", "view", "merge", "loop", "format", "input", "primes",
    }
)  # fmt: skip
# Refused whatever the engine lists: the file() scalar function, dynamic disks, chDB's python().
REFUSED_FUNCTIONS = frozenset(
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


def check_setting_name(name: str) -> None:
    if _REFUSED_SETTING_RE.match(name):
        raise access_denied(f"Setting {name}")


def _token_name(token: Token) -> str | None:
    """A bare or quoted name's text (ClickHouse accepts `file`('x') as a call of file); else None."""
    if token.kind == "word":
        return token.text
    if token.kind == "identifier":
        quote = token.text[0]
        return token.text[1:-1].replace(quote * 2, quote).replace("\\" + quote, quote)
    return None


def _plain_reattach(tokens: list[Token]) -> bool:
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


def check_statement(text: str, refused_functions: frozenset[str]) -> None:
    """Refuse what a locked-down server would refuse but chDB in clickhouse-local mode runs anyway."""
    try:
        # ClickHouse skips Unicode whitespace (e.g. U+00A0) between tokens and allows no other
        # non-ASCII character outside literals: so `file\u00a0(...)` is a call of file().
        tokens = [t for t in tokenize(text) if not (t.kind == "punct" and ord(t.text) > 0x7F)]
    except Incomplete:
        # Unterminated quote or comment: refused before the engine guesses where it ends.
        raise syntax_error("Unterminated quoted string, identifier or comment") from None
    refused = tokens and tokens[0].kind == "word" and tokens[0].text.upper() in _REFUSED_STATEMENTS
    if refused and not _plain_reattach(tokens):
        raise access_denied(f"{tokens[0].text.upper()} statement")
    for index, token in enumerate(tokens):
        name = _token_name(token)
        if name is None:
            continue
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if token.kind == "word" and name.upper() in _REFUSED_KEYWORDS:
            raise access_denied(f"{'INTO OUTFILE' if name.upper() == 'OUTFILE' else 'FROM INFILE'}")
        if following is not None and following.text == "(" and name.lower() in refused_functions:
            raise access_denied(f"Function {name}()")
        if following is not None and following.text == "=" and _REFUSED_SETTING_RE.match(name):
            raise access_denied(f"Setting {name}")
        if token.kind == "word" and name.upper() == "ENGINE":
            position = index + 2 if following is not None and following.text == "=" else index + 1
            engine = _token_name(tokens[position]) if position < len(tokens) else None
            if engine is not None and engine.lower() not in _LOCAL_ENGINES:
                raise access_denied(f"Engine {engine}")


# The engine's users config: what a real server's administrator would grant an application user.
# No SOURCES (FILE, URL, S3, REMOTE, MYSQL, POSTGRES, ...: also the clickhouse-local file overlay of the
# `default` database), no access management, SYSTEM, BACKUP, dictionaries, functions or named collections.
_GRANTS = (
    "GRANT SHOW, SELECT, INSERT, ALTER, CREATE DATABASE, CREATE TABLE, CREATE VIEW, CREATE TEMPORARY TABLE, "
    "DROP DATABASE, DROP TABLE, DROP VIEW, TRUNCATE, OPTIMIZE, KILL QUERY ON *.*"
)


def write_engine_config(directory: Path) -> Path:
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

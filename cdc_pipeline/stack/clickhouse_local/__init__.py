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
* what grants do not cover in clickhouse-local mode is refused before chDB sees it (``lockdown.check_statement``):
  ``INTO OUTFILE``, ``FROM INFILE``, the ``file()`` function, chDB's ``python()`` table function, every
  table function but the local ones (``numbers``, ``values``, ``view``, ...), table and database engines
  but the local ones (MergeTree family, Memory, Log, ...), ``ATTACH``, ``disk(...)`` and settings that
  name files (``format_schema``, ``format_template_*``, ``output_format_schema``).

One process owns the chDB data directory; MergeTree data persists there across restarts. Requests
run concurrently, each on a chDB connection of its own (read-write for POST, read-only for GET, from
two pools of up to 16 each): chDB runs the queries of different connections in parallel, so a long
read does not hold up an insert, nor the other way round.

Run it with ``python -m cdc_pipeline.stack.clickhouse_local --port 8123 --data-dir DIR``.

Modules, from the outside in:

* ``__main__``: the command line (``main``);
* ``server``: the threading HTTP server and ``serve`` (signals, clean stop);
* ``handler``: one HTTP request, from URL parameters and body to the engine and back to ClickHouse's
  headers and error format; ``auth``: the credentials check; ``body``: request framing, decompression,
  multipart forms and spooling;
* ``engine``: the chDB engine with ClickHouse's per-request settings and sessions on top; ``pool``: its
  two connection pools;
* ``sql``: just enough SQL lexing (statement boundaries, FORMAT clauses, SET assignments);
  ``lockdown``: the engine's grants and the refusal of what grants do not cover;
* ``errors``: ``ClickHouseError``, reported the way ClickHouse reports errors.
"""

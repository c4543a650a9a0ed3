"""``python -m cdc_pipeline.stack.clickhouse_local``: the endpoint's command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from cdc_pipeline.stack.clickhouse_local.server import serve

DEFAULT_PASSWORD_ENV = "CDC_CLICKHOUSE_PASSWORD"


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

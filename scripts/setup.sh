#!/usr/bin/env bash
# Sets up a fresh machine for cdc-pipeline: system prerequisites (PostgreSQL server, a JDK 17+,
# Maven, Chromium for the browser test of the Dagster UI), a virtualenv in .venv with the project,
# and a .env with generated PostgreSQL and ClickHouse passwords.
# Idempotent: run it again any time. Installs system packages only when missing, and only with
# apt-get as root; otherwise it says what to install.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*"; }

have_postgres() { command -v postgres >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; }
have_java17() {
  command -v java >/dev/null 2>&1 || return 1
  local major
  major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)
  [ -n "$major" ] && [ "$major" -ge 17 ]
}
have_python311() { command -v python3 >/dev/null 2>&1 && python3 -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

missing=()
have_postgres || missing+=(postgresql)
have_java17 || missing+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
have_python311 || missing+=(python3 python3-venv)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)  # headless, for cdc_pipeline_tests/test_dagster_ui.py

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "Installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "Missing prerequisites: ${missing[*]}." >&2
    echo "Install them with your package manager (they are: a PostgreSQL 14+ server, a JDK 17+, Maven, Python 3.11+, Chromium) and rerun." >&2
    exit 1
  fi
fi

if [ ! -x .venv/bin/python ]; then
  say "Creating .venv"
  python3 -m venv .venv
fi
say "Installing the project into .venv"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"

new_password() { .venv/bin/python -c 'import secrets; print(secrets.token_hex(16))'; }
if [ ! -f .env ]; then
  say "Writing .env from .env.example with generated passwords"
  cp .env.example .env
fi
chmod 600 .env
# Fill in a password that is missing or empty (also in a .env written by an older version), never replace one.
for name in CDC_POSTGRES_PASSWORD CDC_CLICKHOUSE_PASSWORD CDC_WAREHOUSE_PASSWORD; do
  if ! grep -Eq "^${name}=.+" .env; then
    say "Generating ${name} into .env"
    password=$(new_password)
    if grep -q "^${name}=" .env; then
      sed -i "s/^${name}=.*/${name}=${password}/" .env
    else
      printf '%s=%s\n' "$name" "$password" >> .env
    fi
  fi
done
say "Setup done. Next: .venv/bin/cdc-pipeline stack up"

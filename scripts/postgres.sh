#!/usr/bin/env bash
# Installs (Debian's package) and starts a local PostgreSQL for the platform tests, creates a login role and
# database for them, and prints their SQLAlchemy URL on stdout:
#   export GLMSTACK_TEST_POSTGRES_URL="$(bash scripts/postgres.sh)"
# Idempotent: a second run finds everything in place and prints the same URL. Progress goes to stderr; when
# PostgreSQL cannot be installed or started (no apt, not root) it says why and prints nothing, so the
# PostgreSQL half of the tests skips instead of failing CI for a reason that is not the code's.
set -euo pipefail

ROLE=glmstack
PASSWORD=glmstack
DATABASE=glmstack_test

say() { echo "postgres.sh: $*" >&2; }
skip() { say "$* — skipping the PostgreSQL tests"; exit 0; }

if [ -n "${GLMSTACK_TEST_POSTGRES_URL:-}" ]; then
  say "GLMSTACK_TEST_POSTGRES_URL is already set; using it"
  echo "$GLMSTACK_TEST_POSTGRES_URL"
  exit 0
fi

[ "$(id -u)" = 0 ] || skip "not running as root (needed to install and start the Debian cluster)"

if ! command -v pg_ctlcluster >/dev/null; then
  command -v apt-get >/dev/null || skip "apt-get is not available"
  say "installing Debian's postgresql package"
  if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2; }; then
    skip "apt-get install postgresql failed"
  fi
fi

# The newest installed server version; the Debian package creates cluster "main" for it, but a container
# image may have removed it, so create it when missing.
VERSION=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1 || true)
[ -n "$VERSION" ] || skip "no PostgreSQL server binaries under /usr/lib/postgresql"
if ! pg_lsclusters -h | awk '{print $1, $2}' | grep -qx "$VERSION main"; then
  say "creating cluster $VERSION/main"
  pg_createcluster "$VERSION" main >&2
fi
if ! pg_lsclusters -h | awk -v v="$VERSION" '$1 == v && $2 == "main" {print $4}' | grep -qx online; then
  say "starting cluster $VERSION/main"
  pg_ctlcluster "$VERSION" main start >&2 || skip "could not start PostgreSQL $VERSION/main"
fi
PORT=$(pg_lsclusters -h | awk -v v="$VERSION" '$1 == v && $2 == "main" {print $3}')

psql_admin() { su postgres -c "psql -p $PORT -v ON_ERROR_STOP=1 -qtA $*"; }
# CREATEDB because tests may make throwaway databases; each test otherwise gets its own schema.
if [ "$(psql_admin "-c \"SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'\"")" != 1 ]; then
  psql_admin "-c \"CREATE ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD'\"" >&2
fi
if [ "$(psql_admin "-c \"SELECT 1 FROM pg_database WHERE datname = '$DATABASE'\"")" != 1 ]; then
  psql_admin "-c \"CREATE DATABASE $DATABASE OWNER $ROLE\"" >&2
fi
say "PostgreSQL $VERSION is up on port $PORT (database $DATABASE)"
echo "postgresql+psycopg://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DATABASE"

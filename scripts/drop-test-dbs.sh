#!/usr/bin/env bash
# Drop the per-test databases earlier test runs left behind (refunds_test_*), so the server does
# not fill up. A database still in use (a test running elsewhere) refuses the drop and is kept.
set -euo pipefail
command -v psql >/dev/null 2>&1 || exit 0
psql -h 127.0.0.1 -U postgres -tAc \
  "SELECT datname FROM pg_database WHERE datname LIKE 'refunds\_test\_%'" |
while read -r db; do
  [ -n "$db" ] && psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS \"$db\"" 2>/dev/null || true
done

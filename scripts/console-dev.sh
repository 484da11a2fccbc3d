#!/usr/bin/env bash
# `just console`: the operator console on the local configuration (config/refunds.toml), at
# http://127.0.0.1:9470/. On first use it writes target/console-operators.toml with three
# operators, one per role, each with a fresh random password that is printed once (the file
# holds only argon2 hashes). Delete the file to get new ones.
#
# It shows the database `just demo` left behind (refunds_demo, with the demo's queue names, so
# a replay from the console reaches the demo's queue) when there is one, else the configured
# database (created and migrated if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
console=target/debug/refund-console
file=target/console-operators.toml
if [ ! -f "$file" ]; then
  mkdir -p target
  tmp="$(mktemp)"
  echo "console: new development operators (passwords shown once):"
  for pair in dev-operator:operator dev-approver:approver dev-viewer:viewer; do
    name="${pair%%:*}"; role="${pair##*:}"
    password="$(head -c 18 /dev/urandom | base64 | tr -d '/+=')"
    hash="$(printf '%s\n' "$password" | "$console" hash-password)"
    printf '[[operators]]\nname = "%s"\nrole = "%s"\npassword_hash = "%s"\n\n' "$name" "$role" "$hash" >> "$tmp"
    printf '  %-13s %-9s %s\n' "$name" "$role" "$password"
  done
  mv "$tmp" "$file"
fi
admin="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
if psql "$admin" -tAc "SELECT 1 FROM pg_database WHERE datname = 'refunds_demo'" | grep -q 1; then
  export REFUNDS__DATABASE_URL="${admin%/*}/refunds_demo"
  export REFUNDS__AMQP__EXCHANGE=demo.refunds REFUNDS__AMQP__QUEUE=demo.refunds.requested \
    REFUNDS__AMQP__DEAD_LETTER_EXCHANGE=demo.refunds.dlx REFUNDS__AMQP__DEAD_LETTER_QUEUE=demo.refunds.dead \
    REFUNDS__AMQP__EVENTS_EXCHANGE=demo.refunds.events
  echo "console: showing the demo's database (refunds_demo)"
else
  if ! psql "$admin" -tAc "SELECT 1 FROM pg_database WHERE datname = 'refunds'" | grep -q 1; then
    psql "$admin" -qc "CREATE DATABASE refunds"
  fi
  target/debug/refundctl --config config/refunds.toml migrate
fi
echo "console: http://127.0.0.1:9470/ (operators in $file)"
exec "$console" --config config/refunds.toml

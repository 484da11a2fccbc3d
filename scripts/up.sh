#!/usr/bin/env bash
# Make sure PostgreSQL (127.0.0.1:5432) and RabbitMQ (127.0.0.1:5672) answer; start them if they
# are installed but stopped. Exits non-zero, naming the service, when one cannot be had.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 name=$2 secs=$3
  for _ in $(seq 1 "$secs"); do
    port_open "$port" && return 0
    sleep 1
  done
  echo "up: $name did not start listening on 127.0.0.1:$port within ${secs}s" >&2
  return 1
}

if port_open 5432; then
  echo "up: PostgreSQL answers on 127.0.0.1:5432"
elif command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  echo "up: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
  wait_port 5432 PostgreSQL 30
else
  echo "up: PostgreSQL is not running on 127.0.0.1:5432 and is not installed here (apt-get install postgresql)" >&2
  exit 1
fi

if port_open 5672; then
  echo "up: RabbitMQ answers on 127.0.0.1:5672"
elif command -v rabbitmq-server >/dev/null 2>&1; then
  echo "up: starting RabbitMQ"
  rabbitmq-server -detached
  wait_port 5672 RabbitMQ 60
else
  echo "up: RabbitMQ is not running on 127.0.0.1:5672 and is not installed here (apt-get install rabbitmq-server)" >&2
  exit 1
fi

# The demo and `just worker` use the `refunds` database.
if command -v psql >/dev/null 2>&1; then
  psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'refunds'" | grep -q 1 \
    || psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE refunds"
fi

#!/usr/bin/env bash
# `just bench`: runs refund-bench (tools/bench/src/main.rs, tools/bench/src/) from the
# workspace root after `cargo build --release --bins`. Everything is local: PostgreSQL and
# RabbitMQ (DATABASE_URL / AMQP_URL, see the justfile), and the simulator and worker, which
# refund-bench starts itself from target/release/.
#
# Writes the table to the terminal, the JSON report to target/bench.json and the results
# section of docs/benchmarks.md. Extra arguments go to refund-bench, e.g.
#   scripts/bench.sh --quick                     # a smoke run of every scenario, results in
#                                                # target/bench.md instead of docs/
#   scripts/bench.sh --scenarios S0,S1 --repeat 3
# A full run (the defaults) takes about 16 minutes on 2 cores (S6 and S7 about 2 of them).
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${CARGO_TARGET_DIR:-target}/release/refund-bench"
if [ ! -x "$bin" ]; then
  echo "bench: $bin is not built: run \`cargo build --release --bins\` (just bench does)" >&2
  exit 2
fi
mkdir -p target
# A smoke run (--quick) does not replace the recorded results in docs/.
markdown=docs/benchmarks.md
for a in "$@"; do
  [ "$a" = "--quick" ] && markdown=target/bench.md
done
exec "$bin" \
  --bin-dir "$(dirname "$bin")" \
  --json target/bench.json \
  --markdown "$markdown" \
  "$@"

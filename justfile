# Day-to-day commands. `just` lists them.

set shell := ["bash", "-euo", "pipefail", "-c"]

export DATABASE_URL := env_var_or_default("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
export AMQP_URL := env_var_or_default("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")

default:
    @just --list

# Check PostgreSQL and RabbitMQ answer; start them where installed but stopped.
up:
    scripts/up.sh

# The main job end to end: simulator, worker, a mixed batch, reconciliation, a summary.
demo: up
    cargo build --release --bins
    scripts/demo.sh

# Every test: unit, integration (real PostgreSQL and RabbitMQ) and the fault suite.
test: up
    scripts/drop-test-dbs.sh
    cargo test --workspace --all-targets --no-fail-fast -- --skip fault_suite
    # The fault-injection suite, with its per-scenario table.
    cargo test -p worker --test faults -- --nocapture

# Formatting, clippy with warnings as errors, the supply chain (cargo-deny: bans, licences,
# sources; offline, no advisory fetch), the Kubernetes manifests, the production image's
# contents, and the alert rules (promtool: valid, each tested, each with its runbook).
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    cargo deny --offline check bans licenses sources
    k8s/validate.sh
    scripts/check-image.py
    scripts/check-alerts.sh

# The benchmark: throughput, latency and cost per refund against this machine's ceilings.
bench *ARGS: up
    cargo build --release --bins
    scripts/bench.sh {{ARGS}}

# Apply migrations to the configured database.
migrate:
    cargo run --quiet --bin refundctl -- --config config/refunds.toml migrate

# Run the provider simulator in the foreground (config/sim.toml).
sim:
    cargo run --bin refund-sim -- --config config/sim.toml

# The operator web console on config/refunds.toml, http://127.0.0.1:9470/, over the demo's
# database when `just demo` has run (first run prints the development operators' passwords).
console: up
    cargo build --quiet --bin refund-console --bin refundctl
    scripts/console-dev.sh

# Run a worker in the foreground (config/refunds.toml).
worker:
    cargo run --bin refund-worker -- --config config/refunds.toml

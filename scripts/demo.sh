#!/usr/bin/env bash
# `just demo`: runs refund-demo (tools/demo/src/main.rs) from the workspace root.
set -euo pipefail
cd "$(dirname "$0")/.."
exec target/release/refund-demo "$@"

#!/usr/bin/env bash
# The test command CI runs (README: "Run the tests"). Installs what a fresh machine lacks,
# then builds and runs every test of the workspace, plus fmt and clippy.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
cargo fmt --all -- --check
cargo build --workspace --all-targets
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --no-fail-fast 2>&1 | tee /tmp/quring-test.log
# One closing line with the totals over every test binary.
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f; exit (f > 0) }' /tmp/quring-test.log

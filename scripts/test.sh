#!/usr/bin/env bash
# The test command CI runs (README: "Run the tests"). Installs what a fresh machine lacks,
# then builds and runs every test of the workspace, plus fmt and clippy.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
# The vhost-user guest (QEMU's system emulator, a Debian kernel, an initramfs) is installed
# and assembled while cargo builds: on a fresh machine that is mostly download time.
mkdir -p target
sh scripts/build-guest.sh target/guest >target/build-guest.log 2>&1 &
guest=$!
cargo fmt --all -- --check
cargo build --workspace --all-targets
cargo clippy --workspace --all-targets -- -D warnings
wait "$guest" || { cat target/build-guest.log >&2; exit 1; }
cargo test --workspace --no-fail-fast 2>&1 | tee /tmp/quring-test.log
# One closing line with the totals over every test binary.
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f; exit (f > 0) }' /tmp/quring-test.log

#!/usr/bin/env bash
# Model-checks the metadata cache's concurrency protocol with loom (engine/src/meta/cache,
# mod loom_tests) and the wait/wake protocols outside it (engine/src/meta/waiters, mod
# loom_tests: the metadata lock, fill claims, group-flush joins, MSG_RING teardown): every
# interleaving of small configurations (one set of 2 ways, 2-3 threads, a few operations
# each), with a bounded number of preemptions per execution.
#   scripts/loom.sh                  # all loom tests
#   scripts/loom.sh one_claimer      # tests whose name contains the filter
#   LOOM_MAX_PREEMPTIONS=3 scripts/loom.sh
# Exits non-zero when a test fails. A failing model prints the interleaving's panic; rerun
# with LOOM_LOG=trace LOOM_LOCATION=1 for a trace of it.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTFLAGS="${RUSTFLAGS:-} --cfg loom"
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-2}"
# Separate target directory: the cfg changes every crate's build, so sharing target/
# would rebuild the normal build afterwards.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/loom}"
filters=("meta::cache::loom_tests${1:+::$1}" "meta::waiters::loom_tests${1:+::$1}")
log=$(mktemp)
trap 'rm -f "$log"' EXIT
start=$(date +%s)
set +e
cargo test -p quring --lib --release -- "${filters[@]}" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
secs=$(($(date +%s) - start))
passed=$(awk '/^test result:/ { p += $4 } END { print p + 0 }' "$log")
failed=$(awk '/^test result:/ { f += $6 } END { print f + 0 }' "$log")
echo "loom: $passed passed, $failed failed (LOOM_MAX_PREEMPTIONS=$LOOM_MAX_PREEMPTIONS, ${secs}s)"
if [ "$rc" -ne 0 ] || [ "$passed" -eq 0 ]; then
    echo "loom: FAILED" >&2
    exit 1
fi

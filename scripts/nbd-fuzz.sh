#!/usr/bin/env bash
# NBD protocol fuzz campaign: `quring serve --nbd` against three fuzzing clients (random,
# invalid and mutated handshakes and requests, connections dropped at random points) and a
# verifying client, for MINUTES (default 10), in rounds of one minute with fresh seeds.
# Every round checks: no crash, no hang (every reply within 20 s), replies that follow the
# protocol, the verifier's data intact, nothing changed outside the ranges the fuzz
# requests could write, SIGTERM exits 0, qemu-img check 0 (tests/nbd.rs, `fuzz_protocol`).
# Stops at the first failure with the seed to replay it:
#   QURING_NBD_FUZZ_SEED=<seed> QURING_NBD_FUZZ_SECS=60 cargo test --release -p quring-tests --test nbd -- --exact fuzz_protocol --nocapture
#
#   scripts/nbd-fuzz.sh [MINUTES]
#   SEED_BASE=1234 ROUND_SECS=120 scripts/nbd-fuzz.sh 30
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
MINUTES=${1:-10}
ROUND_SECS=${ROUND_SECS:-60}
SEED_BASE=${SEED_BASE:-$(( $(date +%s) % 1000000 * 1000 ))}
# The test finds the quring binary of its own profile (tests/common build_dir).
cargo build --release -q -p quring-cli
cargo build --release -q -p quring-tests --test nbd
rounds=$(( (MINUTES * 60 + ROUND_SECS - 1) / ROUND_SECS ))
echo "nbd fuzz campaign: $MINUTES min in $rounds round(s) of ${ROUND_SECS}s, seeds from $SEED_BASE" >&2
start=$(date +%s)
log=$(mktemp /tmp/nbd-fuzz.XXXXXX.log)
for ((i = 0; i < rounds; i++)); do
    seed=$((SEED_BASE + i))
    echo "== round $((i + 1))/$rounds, seed $seed" >&2
    # pipefail: the round fails when the test does, whatever grep prints.
    if ! QURING_NBD_FUZZ_SEED=$seed QURING_NBD_FUZZ_SECS=$ROUND_SECS \
        cargo test --release -p quring-tests --test nbd -- --exact fuzz_protocol --nocapture >"$log" 2>&1; then
        cat "$log" >&2
        echo "nbd fuzz campaign: round $((i + 1)) failed; replay with QURING_NBD_FUZZ_SEED=$seed" >&2
        exit 1
    fi
    grep -E "^nbd fuzz" "$log" >&2 || true
done
rm -f "$log"
echo "nbd fuzz campaign: $rounds round(s), $(( $(date +%s) - start )) s, no failure" >&2
